"""Rows of the low-rank family: LoRA adapters as sources, low-rank task vectors.

``lowrank(d, rank)`` keeps the best rank-r approximation of each matrix of a task vector
(``tvlang.ops.lowrank``). ``lora("dir")`` reads a PEFT LoRA adapter directory as a task vector over the base's
tensor names (``tvlang.io.lora``; the run layer opens it once the base is known).
``adapter(d, rank)`` is an output form: ``out name = adapter(d, 16)`` has the value ``d``,
and ``tvlang run`` writes it as a rank-16 PEFT adapter directory (``tvlang.run.extract``).
See docs/adapters.md.
"""

from __future__ import annotations

from tvlang.language.rows import Arg, Builtin

__all__ = ["LOWRANK"]

LOWRANK: tuple[Builtin, ...] = (
    Builtin(
        "lora",
        params=(Arg("path", "string", doc="a PEFT LoRA adapter directory (adapter_config.json and"
                                          " adapter_model.safetensors or .bin); relative to the recipe file"),),
        result="delta",
        stage="source",
        summary="Read a PEFT LoRA adapter as a task vector: scale * B @ A per adapted module, zero elsewhere.",
        reference="PEFT LoRA (merge_and_unload: W + scale * B @ A)",
    ),
    Builtin(
        "lowrank",
        params=(Arg("x", "delta", doc="a task vector"),
                Arg("rank", "int", doc="the rank kept per 2-D tensor", range=(1, 2**31 - 1))),
        result="delta",
        summary="The best rank-r approximation (truncated SVD) of each 2-D tensor; other tensors unchanged.",
        reference="Eckart-Young (truncated SVD); what a LoRA adapter of rank r can hold",
        kernel="tvlang.ops.lowrank:lowrank",
        kind_hints=(("model", "lowrank approximates a task vector: lowrank(ft - pre, 16)"),),
    ),
    Builtin(
        "adapter",
        params=(Arg("x", "delta", doc="the task vector to write as an adapter"),
                Arg("rank", "int", doc="the rank of every adapted matrix", range=(1, 2**31 - 1))),
        options=(Arg("other", "string", "save", ("save", "skip"),
                     doc="tensors that are not matrices: saved whole as modules_to_save, or left out"),
                 Arg("fan_in_fan_out", "bool", False,
                     doc="the base stores (in, out) weights (GPT-2's Conv1D): transposed factors")),
        result="delta",
        summary="An output form: the output's value is x, and tvlang run writes it as a PEFT LoRA adapter"
                " directory of rank r (only as the whole expression of an out).",
        reference="PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors); tvlang extract-lora",
        kernel="tvlang.ops.lowrank:adapter",
        elementwise=True,
        kind_hints=(("model", "an adapter holds a task vector: out a = adapter(ft - pre, 16)"),),
    ),
)
