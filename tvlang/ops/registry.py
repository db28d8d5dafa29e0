"""Rows of the operator built-ins, their kernels and the reductions they need.

This module is data and imports no torch: the checker and the planner read it
without paying for torch's start-up. Kernels and reducers are named as
``"module:function"`` and imported on first use.

- ``KERNELS[name]`` is the kernel of a tensor built-in:
  ``kernel(inputs: list[Tensor], ctx: TensorContext, **options) -> Tensor``.
  ``inputs`` are the vector arguments in argument order (for a variadic
  built-in: the fixed vector parameters, then the variadic ones); ``options``
  are all the other arguments by name, defaults filled in (scalars as floats,
  strings, bools, lists of floats as tuples or lists). ``mean`` and ``sum``
  kernels are provided for the planner even though their rows live in
  ``tvlang/language/builtins_core.py``.
- ``REDUCERS[name]`` is a zero-argument factory of the :class:`Reducer` of a
  ``reduce``-stage built-in (``norm``, ``dot``, ``cos``); it streams all the
  call's vector arguments, in order. Its ``result()`` is the scalar value.
- ``reductions_for(name, options, n_inputs)`` tells the planner which
  whole-model reductions a *tensor* built-in call needs before its kernel can
  run: a list of ``(key, factory, input_indices)``. The planner runs
  ``factory()`` over the listed inputs (evaluated arguments, by index into the
  kernel's ``inputs``) in ``reducer.passes`` streaming passes, and hands
  ``result()`` to the kernel as ``ctx.reduced[key]``. Per-tensor calls need
  nothing (``[]``).

Keys in ``ctx.reduced``: ``"threshold:<i>"`` is the global magnitude
threshold of input ``i`` (``ties``/``dare_ties``/``topk`` with
``scope="model"``): the exact k-th largest ``|x|`` over every tensor of that
input, with ``k = keep_count(density, total number of entries)``; the kernel
keeps entries with ``|x| >= threshold``.

The Reducer protocol: ``passes`` (int), ``update(pass_index, tensors, ctx)``
once per tensor name and pass, with ``tensors`` the streamed inputs of that
tensor (a list, in ``input_indices`` order), ``end_pass(pass_index)`` after
each pass, ``result()`` after the last one.

>>> BUILTINS["ties"].options[0].name, BUILTINS["ties"].options[0].default
('density', 0.2)
>>> reductions_for("ties", {"scope": "tensor"}, 2)
[]
>>> [key for key, _, _ in reductions_for("ties", {"scope": "model", "density": 0.1}, 2)]
['threshold:0', 'threshold:1']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tvlang.language.builtins import BUILTINS, Arg, Builtin, register

__all__ = [
    "ROWS", "KERNELS", "CHUNKED", "ELEMENTWISE", "MULTIPASS", "REDUCERS", "reductions_for", "threshold_key",
    "validate_options",
]


# -- rows ------------------------------------------------------------------------

_ELECT = ("total", "frequency")
_MERGE = ("mean", "sum", "weighted_mean")
_SCOPE = ("tensor", "model")
_ELECT_ON = ("weighted", "unweighted")

_TIES_SHARED = (
    Arg("elect", "string", "total", _ELECT,
        "sign election: 'total' = sign of the sum of the values (TIES 'mass'), "
        "'frequency' = sign held by more inputs; an exact tie elects +"),
    Arg("merge", "string", "mean", _MERGE,
        "disjoint merge of the entries that agree with the elected sign: 'mean' divides "
        "by how many agree (TIES, PEFT), 'sum' does not divide (mergekit normalize: false), "
        "'weighted_mean' divides by the sum of the agreeing inputs' weights (mergekit "
        "normalize: true)"),
    Arg("weights", "list", (),
        "per-input weights applied after pruning (PEFT/mergekit style); empty = weights "
        "written into the arguments (ties(0.4*a, 0.6*b))"),
    Arg("elect_on", "string", "weighted", _ELECT_ON,
        "elect signs on the weighted values (mergekit) or the unweighted ones (PEFT); "
        "only matters with weights=[...]"),
)

ROWS: tuple[Builtin, ...] = (
    Builtin(
        "topk",
        params=(Arg("delta", "delta"), Arg("density", "scalar")),
        options=(Arg("scope", "string", "tensor", _SCOPE,
                     "rank magnitudes within each tensor, or over the whole model"),),
        result="delta",
        summary="magnitude pruning: keep the density fraction of entries with the largest |x|",
        reference="TIES-Merging trim step; PEFT magnitude_prune; mergekit sparsify magnitude",
    ),
    Builtin(
        "ties",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("density", "scalar", 0.2, doc="fraction of entries of each input kept by magnitude"),
            *_TIES_SHARED,
            Arg("scope", "string", "tensor", _SCOPE,
                "trim within each tensor (PEFT, mergekit) or over the whole model (TIES paper)"),
        ),
        result="delta",
        summary="TIES-Merging: trim by magnitude, elect a sign per entry, disjoint merge",
        reference="Yadav et al. 2023 (ties-merging code); PEFT ties; mergekit ties",
    ),
    Builtin(
        "dare",
        params=(Arg("delta", "delta"), Arg("p", "scalar")),
        options=(
            Arg("seed", "scalar", 0.0, doc="random seed; masks depend on (seed, tensor name) only"),
            Arg("rescale", "bool", True, doc="divide kept entries by 1 - p"),
        ),
        result="delta",
        summary="DARE: drop each entry with probability p, rescale the rest by 1/(1-p)",
        reference="Yu et al. 2024 (DARE); PEFT random prune with density = 1 - p",
    ),
    Builtin(
        "dare_ties",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("p", "scalar", doc="drop probability of each entry"),
            Arg("seed", "scalar", 0.0),
            Arg("rescale", "bool", True),
            *_TIES_SHARED,
        ),
        result="delta",
        summary="DARE on each input, then TIES sign election and disjoint merge",
        reference="PEFT dare_ties; mergekit dare_ties (merge='sum' there by default)",
    ),
    Builtin(
        "breadcrumbs",
        params=(Arg("delta", "delta"), Arg("density", "scalar")),
        options=(Arg("gamma", "scalar", 0.01, doc="fraction of largest-magnitude entries dropped"),),
        result="delta",
        summary="Model Breadcrumbs: drop the largest gamma fraction and keep the next density fraction",
        reference="Davari & Belilovsky 2023; mergekit magnitude_outliers (without its small-tensor bug)",
    ),
    Builtin(
        "della",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("density", "scalar", doc="mean keep probability"),
            Arg("epsilon", "scalar", 0.15, doc="keep probabilities span density -/+ epsilon by magnitude rank"),
            Arg("lambda", "scalar", 1.0, doc="scale applied to the merged result"),
            Arg("seed", "scalar", 0.0),
            Arg("rescale", "bool", True, doc="divide kept entries by their keep probability"),
            Arg("elect", "string", "total", ("total", "frequency", "none"),
                "sign election as in ties; 'none' merges without election (della_linear)"),
            *_TIES_SHARED[1:],
        ),
        result="delta",
        summary="DELLA: magnitude-ranked keep probabilities, rescale, elect, merge",
        reference="Deep et al. 2024 (DELLA-Merging); mergekit della",
    ),
    Builtin(
        "slerp",
        params=(Arg("a", "vector"), Arg("b", "vector"), Arg("t", "scalar")),
        result="same",
        summary="spherical interpolation per tensor; linear when nearly colinear",
        reference="mergekit slerp (DOT_THRESHOLD 0.9995)",
    ),
    Builtin(
        "model_stock",
        params=(Arg("base", "model"),),
        variadic=Arg("model", "model"),
        min_variadic=2,
        result="model",
        summary="Model Stock: t*average + (1-t)*base with t from the angle between fine-tunes",
        reference="Jang et al. 2024 (Model Stock); mergekit model_stock",
    ),
    Builtin(
        "random_like",
        params=(Arg("delta", "delta"),),
        options=(Arg("seed", "scalar", 0.0),),
        result="delta",
        summary="Gaussian noise with the same Frobenius norm as each tensor",
        reference="Ilharco et al. 2023 (random task vector baseline)",
    ),
    Builtin(
        "select",
        params=(Arg("delta", "delta"), Arg("pattern", "string")),
        result="delta",
        summary="keep tensors whose name matches a glob ('a*|b*' for several), zero the rest",
        reference="tvlang",
    ),
    Builtin(
        "pick",
        params=(Arg("pattern", "string"), Arg("a", "vector"), Arg("b", "vector")),
        result="same",
        summary="per tensor: a where the name matches the glob, else b",
        reference="tvlang (mergekit slices/filters)",
    ),
    Builtin(
        "schedule",
        params=(Arg("delta", "delta"), Arg("values", "list")),
        options=(Arg("default", "scalar", 1.0, doc="scale of tensors with no layer index"),),
        result="delta",
        summary="scale each tensor by a value interpolated over its layer index",
        reference="mergekit gradient parameters",
    ),
)

register(*ROWS)


# -- kernels and reducers ----------------------------------------------------------

class _Lazy(Mapping):
    """A read-only dict of ``name -> "module:attr"`` resolved on first access."""

    def __init__(self, table: dict[str, str]) -> None:
        self._table = dict(table)
        self._resolved: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._resolved:
            module, attr = self._table[name].split(":")
            self._resolved[name] = getattr(importlib.import_module(f"tvlang.ops.{module}"), attr)
        return self._resolved[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table


KERNELS: Mapping[str, Callable[..., Any]] = _Lazy({
    "topk": "prune:topk",
    "breadcrumbs": "prune:breadcrumbs",
    "ties": "ties:ties",
    "dare": "dare:dare",
    "dare_ties": "ties:dare_ties",
    "della": "ties:della",
    "random_like": "dare:random_like",
    "slerp": "slerp:slerp",
    "model_stock": "stock:model_stock",
    "select": "select:select",
    "pick": "select:pick",
    "schedule": "select:schedule",
    "mean": "reduce:mean",
    "sum": "reduce:sum_",
})

# Kernels the evaluator may run chunk by chunk, inside its chunked programs (the result
# is the same as one call on the whole tensor):
# - CHUNKED[name](ctx, numel, n_inputs, dtype, **options) -> a chunk kernel, or None when these options
#   need the whole tensor. A chunk kernel has ``passes`` (int), ``observe(pass_index, pieces)``
#   and ``end_pass(pass_index)`` (passes over consecutive pieces of its flattened inputs, in
#   order, before any result: a per-tensor threshold), ``restart()`` (called before each pass in
#   which it makes results) and ``apply(pieces, out_piece)`` (the results, pieces in order);
# - ELEMENTWISE: kernels whose result at an entry depends on that entry of the inputs and on
#   the tensor's name only: the kernel itself is called on each piece.
CHUNKED: Mapping[str, Callable[..., Any]] = _Lazy({
    "dare": "chunks:dare_chunks",
    "dare_ties": "chunks:dare_ties_chunks",
    "ties": "chunks:ties_chunks",
    "topk": "chunks:topk_chunks",
    "breadcrumbs": "chunks:breadcrumbs_chunks",
})
ELEMENTWISE = frozenset({"select", "pick", "schedule", "mean", "sum"})
# Chunk forms that may ask for passes over their whole input before the first result.
MULTIPASS = frozenset({"ties", "topk", "breadcrumbs"})

REDUCERS: Mapping[str, Callable[[], Any]] = _Lazy({
    "norm": "reduce:NormReducer",
    "dot": "reduce:DotReducer",
    "cos": "reduce:CosReducer",
})


def threshold_key(index: int) -> str:
    """The ``ctx.reduced`` key of input ``index``'s global magnitude threshold."""
    return f"threshold:{index}"


def _threshold_factory(density: float) -> Callable[[], Any]:
    def make() -> Any:
        from tvlang.ops.threshold import MagnitudeThreshold

        return MagnitudeThreshold(density)

    return make


def reductions_for(name: str, options: dict, n_inputs: int) -> list[tuple[str, Callable[[], Any], list[int]]]:
    """Whole-model reductions a call of tensor built-in ``name`` needs, or ``[]``.

    ``options`` are the call's resolved options (defaults may be missing: a
    missing ``scope`` means per-tensor). Returns ``(key, factory, input_indices)``
    triples; see the module docstring.
    """
    if name in ("ties", "topk") and options.get("scope", "tensor") == "model":
        density = float(options.get("density", 0.2))
        return [(threshold_key(i), _threshold_factory(density), [i]) for i in range(n_inputs)]
    return []


# -- option checks -------------------------------------------------------------------

def validate_options(name: str, options: dict, n_inputs: int) -> None:
    """Raise ``TvlangError`` (no span: the caller adds one) for options a kernel would reject.

    Lets ``check`` report bad constants before any tensor is read; kernels
    check again (a parameter may be overridden later).
    """
    from tvlang.ops import checks  # torch-free

    checks.validate(name, options, n_inputs)
