"""Rows of the low-rank family: LoRA adapters as sources, low-rank task vectors.

``lowrank(d, rank)`` keeps the best rank-r approximation of each matrix of a task vector
(``tvlang.ops.lowrank``). ``lora("dir")`` reads a PEFT LoRA adapter directory as a task vector over the base's
tensor names (``tvlang.io.lora``; the run layer opens it once the base is known).
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
)
