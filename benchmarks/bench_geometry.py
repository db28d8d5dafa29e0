"""CPU time of the geometric kernels on one tensor, one thread: tvlang's whole-tensor kernel,
its chunk form (pieces of 1,048,576 entries, passes included) and mergekit 0.1.5's
computation of the same merge, on the same float32 tensors (issue 14).

    OMP_NUM_THREADS=1 python benchmarks/bench_geometry.py                 # every case
    OMP_NUM_THREADS=1 python benchmarks/bench_geometry.py model_stock     # some cases
    SRC=/tmp/tvlang-base OMP_NUM_THREADS=1 python benchmarks/bench_geometry.py   # another tree

Inputs: a 4096x4096 ``pre`` (std 0.02) and three fine-tunes ``pre + N(0, 0.001)``. Cases:
``nuslerp`` (flattened) and ``nuslerp_rows`` (``flatten=false``) of two deltas, ``multislerp``
of three deltas (equal weights), ``karcher`` of the three fine-tunes, ``model_stock`` of
``pre`` and the three fine-tunes. CPU time (user + system, the best of 3) is measured rather
than wall, so that a loaded machine disturbs less. Each line also gives the largest
difference from mergekit's result and whether the chunk form equals the whole kernel
(bit for bit). mergekit's ``karcher`` and ``nuslerp`` functions are called directly; its
``multislerp`` and ``model_stock`` bodies (which take a mergekit TensorGroup) are
transcribed here, the same tensor operations (without model_stock's branch for a zero
denominator, which these inputs never reach).
"""

from __future__ import annotations

import os
import resource
import sys

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
sys.path.insert(0, os.environ.get("SRC", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tvlang.ops.context import TensorContext  # noqa: E402
from tvlang.ops.registry import CHUNKED, KERNELS  # noqa: E402

PIECE = 1 << 20
CASES = {  # name -> (kernel, which inputs, options)
    "nuslerp": ("nuslerp", "deltas2", {"t": 0.5, "flatten": True, "row_wise": False}),
    "nuslerp_rows": ("nuslerp", "deltas2", {"t": 0.5, "flatten": False, "row_wise": False}),
    "multislerp": ("multislerp", "deltas", {"weights": (1.0, 1.0, 1.0), "normalize_weights": True, "eps": 1e-8}),
    "karcher": ("karcher", "models", {"weights": (), "max_iter": 10, "tol": 1e-5}),
    "model_stock": ("model_stock", "stock", {"filter_wise": False}),
}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        start = cpu()
        fn()
        times.append(cpu() - start)
    return min(times)


def chunked(kernel: str, ctx: TensorContext, inputs: list[torch.Tensor], options: dict) -> torch.Tensor | None:
    form = CHUNKED[kernel](ctx, inputs[0].numel(), len(inputs), torch.float32, **options)
    if form is None:
        return None
    flat = [x.reshape(-1) for x in inputs]
    count = flat[0].numel()
    out = torch.empty(count)
    for index in range(form.passes):
        for start in range(0, count, PIECE):
            form.observe(index, [f[start:start + PIECE] for f in flat])
        form.end_pass(index)
    form.restart()
    for start in range(0, count, PIECE):
        form.apply([f[start:start + PIECE] for f in flat], out[start:start + PIECE])
    return out.view(inputs[0].shape)


def mergekit(name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    from mergekit.merge_methods import karcher, nuslerp

    if name.startswith("nuslerp"):
        return nuslerp.nuslerp(0.5, inputs[0], inputs[1], flatten=name == "nuslerp")
    if name == "karcher":
        return karcher.karcher_merge_tensors(inputs, [1 / len(inputs)] * len(inputs))
    if name == "multislerp":  # mergekit.merge_methods.multislerp.multislerp, no base
        tensors = torch.stack(inputs, dim=0)
        flat = tensors.view(tensors.shape[0], -1)
        weights = torch.tensor([1.0] * len(inputs))
        weights = weights / weights.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        unit = flat / (norms + 1e-8)
        mean = (unit * weights.view(-1, 1)).sum(0)
        mean = mean / torch.norm(mean)
        dots = (unit * mean).sum(-1, keepdim=True)
        tangent = ((unit - dots * mean) * weights.view(-1, 1)).sum(0)
        length = torch.norm(tangent) + 1e-8
        result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
        return (result * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])
    # model_stock_merge_method, filter_wise false
    w0, ws = inputs[0].reshape(-1), [x.reshape(-1) for x in inputs[1:]]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(inputs[0].shape)


def main(names: list[str]) -> int:
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(4096, 4096, generator=g) * 0.02
    models = [pre + torch.randn(4096, 4096, generator=g) * 0.001 for _ in range(3)]
    deltas = [m - pre for m in models]
    sets = {"deltas2": deltas[:2], "deltas": deltas, "models": models, "stock": [pre, *models]}
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", shape=tuple(pre.shape))
    for name in names or list(CASES):
        kernel, which, options = CASES[name]
        inputs = sets[which]
        whole = KERNELS[kernel](inputs, ctx, **options)
        pieces = chunked(kernel, ctx, inputs, options)
        theirs = mergekit(name, inputs)
        t_whole = best(lambda: KERNELS[kernel](inputs, ctx, **options))
        t_chunks = best(lambda: chunked(kernel, ctx, inputs, options)) if pieces is not None else float("nan")
        t_mergekit = best(lambda: mergekit(name, inputs))
        diff = float((whole.double() - theirs.double()).abs().max())
        same = "n/a (whole only)" if pieces is None else bool(torch.equal(pieces, whole))
        print(f"{name:13s} tvlang whole {t_whole:6.3f} s  chunks {t_chunks:6.3f} s  mergekit {t_mergekit:6.3f} s  "
              f"max |tvlang - mergekit| {diff:.2g}  chunks == whole: {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
