"""The run layer: a plan and its bindings to tensors, streamed. Imports torch.

Binding, layout checks, the reduction passes, the whole-tensor and chunked step
interpreters and the drivers (``run``, ``stream``, ``validate``) live here;
readers and the writer are in ``tvlang.io``, kernels in ``tvlang.ops``.
"""
