"""Rows of the geometric merges beyond slerp: several-model spherical and Riemannian means,
spherical interpolation per row, and interpolation by closeness (kernels in ``tvlang/ops``,
semantics in docs/operators.md; registered by :mod:`tvlang.language.builtins`).

>>> [row.name for row in GEOMETRY]
['multislerp', 'karcher', 'nuslerp', 'nearswap']
"""

from __future__ import annotations

from collections.abc import Mapping

from tvlang.language.rows import Arg, Builtin

__all__ = ["GEOMETRY"]


def _one_weight_per_input(options: Mapping[str, object], n_inputs: int) -> str | None:
    weights = options.get("weights") or ()
    if weights and len(weights) != n_inputs:  # type: ignore[arg-type]
        return f"option 'weights' has {len(weights)} values for {n_inputs} inputs"  # type: ignore[arg-type]
    return None


def _weights_sum_not_zero(options: Mapping[str, object], n_inputs: int) -> str | None:
    weights = options.get("weights") or ()
    if options.get("normalize_weights") and weights and abs(sum(weights)) < 1e-12:  # type: ignore[arg-type]
        return "normalize_weights divides by the sum of the weights, and they sum to 0"
    return None


_WEIGHTS = Arg("weights", "list", (), doc="one weight per input; empty = equal weights")

GEOMETRY: tuple[Builtin, ...] = (
    Builtin(
        "multislerp",
        variadic=Arg("x", "vector"),
        min_variadic=1,
        options=(
            _WEIGHTS,
            Arg("normalize_weights", "bool", True, doc="divide the weights by their sum"),
            Arg("eps", "scalar", 1e-8, doc="added to norms before dividing by them", range=(0.0, 1.0)),
        ),
        result="same",
        summary="weighted spherical mean per tensor: tangent-space average at the mean direction, "
                "scaled to the weighted mean norm",
        reference="mergekit multislerp (Goddard, 'multislerp')",
        kernel="tvlang.ops.sphere:multislerp",
        chunk_form="tvlang.ops.sphere:multislerp_chunks",
        multipass=True,
        rules=(_one_weight_per_input, _weights_sum_not_zero),
    ),
    Builtin(
        "karcher",
        variadic=Arg("x", "vector"),
        min_variadic=1,
        options=(
            Arg("weights", "list", (), doc="one weight per input; empty = 1/n each"),
            Arg("max_iter", "int", 10, doc="at most this many gradient steps", range=(0, 1e6)),
            Arg("tol", "scalar", 1e-5, doc="stop when a step is shorter; inputs with a smaller norm take no part",
                range=(0.0, 1.0)),
        ),
        result="same",
        summary="weighted Karcher (Riemannian) mean of the directions per tensor, scaled to the weighted norm sum",
        reference="mergekit karcher (karcher_merge_tensors)",
        kernel="tvlang.ops.sphere:karcher",
        chunk_form="tvlang.ops.sphere:karcher_chunks",
        multipass=True,
        rules=(_one_weight_per_input,),
    ),
    Builtin(
        "nuslerp",
        params=(Arg("a", "vector"), Arg("b", "vector"), Arg("t", "scalar")),
        options=(
            Arg("flatten", "bool", True, doc="interpolate the flattened tensors (else each row or column)"),
            Arg("row_wise", "bool", False,
                doc="without flatten: vectors along the first dimension (columns of a matrix), "
                    "else along the last (rows)"),
        ),
        result="same",
        summary="spherical interpolation per tensor, per row or per column; linear only when colinear",
        reference="mergekit nuslerp",
        kernel="tvlang.ops.nuslerp:nuslerp",
        chunk_form="tvlang.ops.nuslerp:nuslerp_chunks",
        multipass=True,
    ),
    Builtin(
        "nearswap",
        params=(Arg("a", "vector"), Arg("b", "vector"), Arg("t", "scalar", range=(0.0, float("inf")))),
        result="same",
        summary="per entry: b where |a - b| <= t, else a moved toward b by t/|a - b|",
        reference="mergekit nearswap",
        kernel="tvlang.ops.nearswap:nearswap",
        elementwise=True,
    ),
)
