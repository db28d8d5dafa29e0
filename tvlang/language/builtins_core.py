"""The core built-ins: reading checkpoints, averaging and adding, whole-model scalars.

Operator built-ins (``ties``, ``dare``, ``topk``, ``slerp``, ...) are rows in
``tvlang/ops/registry.py``; both register into :data:`tvlang.language.builtins.BUILTINS`,
and the checker treats every row the same way.

>>> from tvlang.language.builtins import BUILTINS
>>> import tvlang.language.builtins_core
>>> BUILTINS["mean"].result, BUILTINS["norm"].stage
('same', 'reduce')
"""

from __future__ import annotations

from tvlang.language.builtins import Arg, Builtin, register

__all__ = ["CORE", "KIND_HINTS"]

CORE = (
    Builtin(
        "load",
        params=(Arg("path", "string", doc="a .safetensors file, a sharded index, a model directory, or a .bin/.pt state dict; relative to the recipe file"),),
        result="model",
        stage="source",
        summary="Read a checkpoint as a model (absolute weights).",
    ),
    Builtin(
        "load_delta",
        params=(Arg("path", "string", doc="a task vector file, as written by tvlang for a task-vector output"),),
        result="delta",
        stage="source",
        summary="Read a task-vector file (weights relative to a base) as a task vector.",
    ),
    Builtin(
        "mean",
        variadic=Arg("vectors", "vector", doc="models, or task vectors (not a mix)"),
        min_variadic=1,
        result="same",
        summary="Element-wise average: a model of models, a task vector of task vectors.",
        reference="Wortsman et al. 2022 (model soups, uniform soup)",
    ),
    Builtin(
        "sum",
        variadic=Arg("vectors", "delta", doc="task vectors"),
        min_variadic=1,
        result="delta",
        summary="Element-wise sum of task vectors (a + b + ...).",
        reference="Ilharco et al. 2023, task addition",
    ),
    Builtin(
        "norm",
        params=(Arg("x", "vector"),),
        result="scalar",
        stage="reduce",
        summary="Euclidean (Frobenius) norm over every float tensor of the whole model.",
    ),
    Builtin(
        "dot",
        params=(Arg("a", "vector"), Arg("b", "vector")),
        result="scalar",
        stage="reduce",
        summary="Dot product over every float tensor of the whole model.",
    ),
    Builtin(
        "cos",
        params=(Arg("a", "vector"), Arg("b", "vector")),
        result="scalar",
        stage="reduce",
        summary="Cosine similarity dot(a, b)/(norm(a)*norm(b)) over the whole model.",
        reference="Ilharco et al. 2023, Fig. 5 (cosine similarity of task vectors)",
    ),
)

#: Extra notes the checker adds when an argument of a built-in has the wrong kind:
#: ``(built-in name, kind it got) -> note``. Data, like the rows above.
KIND_HINTS: dict[tuple[str, str], str] = {
    ("sum", "model"): (
        "a sum of models is not a model (its coefficients would not sum to 1): "
        "use mean(a, b) to average models, or add task vectors: sum(a - base, b - base)"
    ),
}

register(*CORE)
