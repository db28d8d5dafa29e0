"""The built-in function table: one row per built-in, and every row is here.

A row is the whole built-in: its signature (arguments with kinds, defaults, choices and
ranges, each written once), its kernel, its chunk form, its flags, the whole-model
reductions it needs, and the hints the checker gives for it. Every other table
(``KERNELS``, ``CHUNKED``, ``ELEMENTWISE``, ``MULTIPASS`` in :mod:`tvlang.ops.registry`)
is a view derived from these rows. Adding an operator is one row here plus one kernel in
``tvlang/ops`` (plus an optional chunk form); a test or a plugin registers its own rows
with :func:`register` (docs/operators.md, "Adding an operator").

Where things are: the row types and the table are in :mod:`tvlang.language.rows`, the
merge operators' rows in :mod:`tvlang.language.operators`; this module holds the core rows
(reading checkpoints, averaging and adding, whole-model scalars) and registers every
family, so :data:`BUILTINS` is complete once it is imported. A new family of operators is
a module of rows beside these, registered below. None of them imports torch or the run or
ops layers: kernels, chunk forms and reducers are named as ``"module:attr"`` and resolved
(:func:`resolve`) when a run needs them.

Kinds of arguments: ``"model"``, ``"delta"``, ``"vector"`` (model or delta), ``"scalar"``
(a finite number), ``"int"`` (a whole number), ``"string"``, ``"bool"``, ``"list"`` (a list
of numbers).

Result rules: ``"model"``, ``"delta"``, ``"scalar"``, or ``"same"`` (the kind shared by the
vector arguments, which must agree).

Stages: ``"source"`` (reads a checkpoint: ``load``), ``"tensor"`` (a per-tensor kernel),
``"reduce"`` (a whole-model scalar computed in an earlier streaming pass).

>>> BUILTINS["ties"].kernel, BUILTINS["ties"].chunk_form, BUILTINS["ties"].multipass
('tvlang.ops.ties:ties', 'tvlang.ops.chunks:ties_chunks', True)
>>> BUILTINS["mean"].result, BUILTINS["norm"].stage
('same', 'reduce')
>>> BUILTINS["dare"].complete({"p": 0.3})
{'p': 0.3, 'seed': 0.0, 'rescale': True, 'rescale_by': 'probability'}
>>> BUILTINS["ties"].check_options({"density": 1.5}, 2)
Traceback (most recent call last):
...
tvlang.errors.TvlangError: error: ties: option 'density' must be in [0, 1], got 1.5
"""

from __future__ import annotations

import math

from tvlang.language.geometry import GEOMETRY
from tvlang.language.lowrank import LOWRANK
from tvlang.language.operators import OPERATORS, _one_weight_per_input, threshold_key
from tvlang.language.rows import (
    BUILTINS,
    KINDS,
    REQUIRED,
    RESULTS,
    STAGES,
    VECTOR_KINDS,
    Arg,
    Builtin,
    Reduction,
    Rule,
    register,
    resolve,
    unregister,
)
from tvlang.language.surgery import SURGERY

__all__ = [
    "BUILTINS", "CORE", "KINDS", "OPERATORS", "REQUIRED", "RESULTS", "STAGES", "VECTOR_KINDS", "Arg", "Builtin",
    "Reduction", "Rule", "register", "resolve", "threshold_key", "unregister",
]


def _weights_not_summing_to_zero(options, n_inputs: int) -> str | None:
    """A weighted mean divides by the weights' sum (per-tensor values: checked per tensor)."""
    weights = options.get("weights") or ()
    if weights and all(isinstance(w, (int, float)) for w in weights) and math.fsum(weights) == 0:  # type: ignore
        return "the weights sum to 0, and a weighted mean divides by their sum"
    return None


# -- reading checkpoints, averaging and adding, whole-model scalars -------------------------

# An explicit renaming of a checkpoint's tensors, for names automatic alignment does not
# match (docs/io.md, "Names that do not line up"): applied when the file is opened, before
# alignment; strip_prefix first, then add_prefix.
RENAME_OPTIONS = (
    Arg("strip_prefix", "string", default=None,
        doc="remove this prefix from every tensor name that has it ('bert.')"),
    Arg("add_prefix", "string", default=None, doc="put this prefix before every tensor name ('model.')"),
)

CORE = (
    Builtin(
        "load",
        params=(Arg("path", "string", doc="a .safetensors file, a sharded index, a model directory, "
                                          "or a .bin/.pt state dict; relative to the recipe file"),),
        options=(Arg("layers", "list", default=None,
                     doc="[START, END]: only layers START..END-1, renumbered from 0 (layer surgery: stack)"),
                 *RENAME_OPTIONS),
        result="model",
        stage="source",
        summary="Read a checkpoint as a model (absolute weights); layers=[START, END] reads a range of its layers.",
    ),
    Builtin(
        "load_delta",
        params=(Arg("path", "string", doc="a task vector file, as written by tvlang for a task-vector output"),),
        options=RENAME_OPTIONS,
        result="delta",
        stage="source",
        summary="Read a task-vector file (weights relative to a base) as a task vector.",
    ),
    Builtin(
        "mean",
        variadic=Arg("vectors", "vector", doc="models, or task vectors (not a mix)"),
        min_variadic=1,
        options=(Arg("weights", "list", (), doc="one weight per input (numbers or per-tensor values): "
                                                 "sum(w_i * x_i) / sum(w_i); empty = equal weights"),),
        result="same",
        summary="Element-wise average: a model of models, a task vector of task vectors; weighted with weights=[...].",
        reference="Wortsman et al. 2022 (model soups, uniform soup); mergekit linear",
        kernel="tvlang.ops.reduce:mean",
        elementwise=True,
        rules=(_one_weight_per_input, _weights_not_summing_to_zero),
    ),
    Builtin(
        "sum",
        variadic=Arg("vectors", "delta", doc="task vectors"),
        min_variadic=1,
        options=(Arg("weights", "list", (), doc="one weight per input (numbers or per-tensor values): "
                                                 "sum(w_i * x_i); empty = 1 each"),),
        result="delta",
        summary="Element-wise sum of task vectors (a + b + ...); weighted with weights=[...].",
        reference="Ilharco et al. 2023, task addition",
        kernel="tvlang.ops.reduce:sum_",
        elementwise=True,
        rules=(_one_weight_per_input,),
        kind_hints=(("model",
                     "a sum of models is not a model (its coefficients would not sum to 1): "
                     "use mean(a, b) to average models, or add task vectors: sum(a - base, b - base)"),),
    ),
    Builtin(
        "norm",
        params=(Arg("x", "vector"),),
        result="scalar",
        stage="reduce",
        summary="Euclidean (Frobenius) norm over every float tensor of the whole model.",
        kernel="tvlang.ops.reduce:NormReducer",
    ),
    Builtin(
        "dot",
        params=(Arg("a", "vector"), Arg("b", "vector")),
        result="scalar",
        stage="reduce",
        summary="Dot product over every float tensor of the whole model.",
        kernel="tvlang.ops.reduce:DotReducer",
    ),
    Builtin(
        "cos",
        params=(Arg("a", "vector"), Arg("b", "vector")),
        result="scalar",
        stage="reduce",
        summary="Cosine similarity dot(a, b)/(norm(a)*norm(b)) over the whole model.",
        reference="Ilharco et al. 2023, Fig. 5 (cosine similarity of task vectors)",
        kernel="tvlang.ops.reduce:CosReducer",
    ),
)


register(*CORE, *OPERATORS, *GEOMETRY, *LOWRANK, *SURGERY)
