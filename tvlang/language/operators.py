"""The merge operators' rows (kernels in ``tvlang/ops``, semantics in docs/operators.md),
and the reductions and rules they share.

>>> [row.name for row in OPERATORS][:4]
['topk', 'ties', 'dare', 'dare_ties']
>>> threshold_key(1)
'threshold:1'
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tvlang.language.rows import Arg, Builtin, Reduction

__all__ = ["OPERATORS", "threshold_key"]


# -- what rows share: reductions and rules -------------------------------------------------

def threshold_key(index: int) -> str:
    """The ``ctx.reduced`` key of input ``index``'s whole-model magnitude threshold."""
    return f"threshold:{index}"


def _model_thresholds(options: Mapping[str, object], n_inputs: int) -> tuple[Reduction, ...]:
    """``scope="model"``: the exact k-th largest ``|x|`` over every tensor of each input,
    ``k = keep_count(density, total entries)``; the kernel keeps ``|x| >= threshold``."""
    if options["scope"] != "model":
        return ()
    return tuple(
        Reduction(threshold_key(i), "tvlang.ops.threshold:MagnitudeThreshold",
                  (float(options["density"]), str(options["count"])), (i,))
        for i in range(n_inputs)
    )


def _one_weight_per_input(options: Mapping[str, object], n_inputs: int) -> str | None:
    weights = options.get("weights") or ()
    if weights and len(weights) != n_inputs:  # type: ignore[arg-type]
        return f"option 'weights' has {len(weights)} values for {n_inputs} inputs"  # type: ignore[arg-type]
    return None


def _della_keep_probabilities(options: Mapping[str, object], n_inputs: int) -> str | None:
    """Keep probabilities span density -/+ epsilon: they must stay in (0, 1]."""
    if "density" not in options:
        return None
    density, epsilon = float(options["density"]), float(options["epsilon"])  # type: ignore[arg-type]
    if 0.0 < density < 1.0 and (density - epsilon <= 0.0 or density + epsilon > 1.0):
        return (f"density - epsilon must be > 0 and density + epsilon <= 1 "
                f"(got density={density:g}, epsilon={epsilon:g})")
    return None


def _values_not_empty(options: Mapping[str, object], n_inputs: int) -> str | None:
    return "the list of values is empty" if "values" in options and not options["values"] else None


def _glob_pattern(options: Mapping[str, object], n_inputs: int) -> str | None:
    pattern = options.get("pattern")
    if "pattern" in options and (not isinstance(pattern, str) or not pattern.strip("| ")):
        return f"the pattern must be a non-empty glob string, got {pattern!r}"
    return None


# -- merge operators (kernels in tvlang/ops, semantics in docs/operators.md) ------------------

_FRACTION = (0.0, 1.0)
_SCOPE = ("tensor", "model")
_COUNT = Arg("count", "string", "floor", ("floor", "mergekit"),
             "how many entries a density keeps: 'floor' = floor(density*n) (a product within 1e-6 of an "
             "integer counts as it), 'mergekit' = mergekit 0.1.5's rule (max(1, int(density*n)) for "
             "topk/ties, int(density*n) for breadcrumbs and sce)")

_RESCALE_BY = Arg("rescale_by", "string", "probability", ("probability", "l1"),
                  "with rescale: divide each kept entry by its keep probability (the papers), or scale "
                  "the kept entries together so the tensor keeps its L1 norm (mergekit 0.1.5)")

_L1_RESCALE = Arg("rescale_by", "string", "none", ("none", "l1"),
                  "'l1': scale each input's kept entries together so that it keeps its L1 norm "
                  "(mergekit 0.1.5's rescale: true); 'none' leaves them as they are")

_TIES_SHARED = (
    Arg("elect", "string", "total", ("total", "frequency"),
        "sign election: 'total' = sign of the sum of the values (TIES 'mass'), "
        "'frequency' = sign held by more inputs; an exact tie elects +"),
    Arg("merge", "string", "mean", ("mean", "sum", "weighted_mean"),
        "disjoint merge of the entries that agree with the elected sign: 'mean' divides "
        "by how many agree (TIES, PEFT), 'sum' does not divide (mergekit normalize: false), "
        "'weighted_mean' divides by the sum of the agreeing inputs' weights (mergekit "
        "normalize: true)"),
    Arg("weights", "list", (),
        doc="per-input weights applied after pruning (PEFT/mergekit style); empty = weights "
            "written into the arguments (ties(0.4*a, 0.6*b))"),
    Arg("elect_on", "string", "weighted", ("weighted", "unweighted"),
        "elect signs on the weighted values (mergekit) or the unweighted ones (PEFT); "
        "only matters with weights=[...]"),
)

_DELLA_SHARED = (  # della and della_linear
    Arg("density", "scalar", doc="mean keep probability", range=_FRACTION),
    Arg("epsilon", "scalar", 0.15, doc="keep probabilities span density -/+ epsilon by magnitude rank",
        range=(0.0, 0.5)),
    Arg("lambda", "scalar", 1.0, doc="scale applied to the merged result"),
    Arg("seed", "int", 0.0),
    Arg("rescale", "bool", True, doc="rescale the kept entries (see rescale_by)"),
    _RESCALE_BY,
)

OPERATORS = (
    Builtin(
        "topk",
        params=(Arg("delta", "delta"), Arg("density", "scalar", range=_FRACTION)),
        options=(Arg("scope", "string", "tensor", _SCOPE,
                     "rank magnitudes within each tensor, or over the whole model"), _COUNT, _L1_RESCALE),
        result="delta",
        summary="magnitude pruning: keep the density fraction of entries with the largest |x|",
        reference="TIES-Merging trim step; PEFT magnitude_prune; mergekit sparsify magnitude",
        kernel="tvlang.ops.prune:topk",
        chunk_form="tvlang.ops.chunks:topk_chunks",
        multipass=True,
        reductions=_model_thresholds,
    ),
    Builtin(
        "ties",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("density", "scalar", 0.2, doc="fraction of entries of each input kept by magnitude", range=_FRACTION),
            *_TIES_SHARED,
            Arg("scope", "string", "tensor", _SCOPE,
                "trim within each tensor (PEFT, mergekit) or over the whole model (TIES paper)"),
            _COUNT,
            _L1_RESCALE,
        ),
        result="delta",
        summary="TIES-Merging: trim by magnitude, elect a sign per entry, disjoint merge",
        reference="Yadav et al. 2023 (ties-merging code); PEFT ties; mergekit ties",
        kernel="tvlang.ops.ties:ties",
        chunk_form="tvlang.ops.chunks:ties_chunks",
        multipass=True,
        reductions=_model_thresholds,
        rules=(_one_weight_per_input,),
    ),
    Builtin(
        "dare",
        params=(Arg("delta", "delta"), Arg("p", "scalar", range=_FRACTION)),
        options=(
            Arg("seed", "int", 0.0, doc="random seed; masks depend on (seed, tensor name) only"),
            Arg("rescale", "bool", True, doc="rescale the kept entries (see rescale_by)"),
            _RESCALE_BY,
        ),
        result="delta",
        summary="DARE: drop each entry with probability p, rescale the rest by 1/(1-p)",
        reference="Yu et al. 2024 (DARE); PEFT random prune with density = 1 - p",
        kernel="tvlang.ops.dare:dare",
        chunk_form="tvlang.ops.chunks:dare_chunks",
    ),
    Builtin(
        "dare_ties",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("p", "scalar", doc="drop probability of each entry", range=_FRACTION),
            Arg("seed", "int", 0.0),
            Arg("rescale", "bool", True),
            _RESCALE_BY,
            *_TIES_SHARED,
        ),
        result="delta",
        summary="DARE on each input, then TIES sign election and disjoint merge",
        reference="PEFT dare_ties; mergekit dare_ties (merge='sum' there by default)",
        kernel="tvlang.ops.ties:dare_ties",
        chunk_form="tvlang.ops.chunks:dare_ties_chunks",
        rules=(_one_weight_per_input,),
    ),
    Builtin(
        "dare_linear",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("p", "scalar", doc="drop probability of each entry", range=_FRACTION),
            Arg("seed", "int", 0.0),
            Arg("rescale", "bool", True),
            _RESCALE_BY,
            Arg("merge", "string", "sum", ("sum", "mean", "weighted_mean"),
                "'sum' = the weighted sum (mergekit normalize: false), 'mean' divides by the number of "
                "inputs, 'weighted_mean' by the sum of the weights (normalize: true)"),
            _TIES_SHARED[2],
        ),
        result="delta",
        summary="DARE on each input, then their (weighted) sum",
        reference="Yu et al. 2024 (DARE); mergekit dare_linear",
        kernel="tvlang.ops.ties:dare_linear",
        chunk_form="tvlang.ops.chunks:dare_linear_chunks",
        rules=(_one_weight_per_input,),
    ),
    Builtin(
        "breadcrumbs",
        params=(Arg("delta", "delta"), Arg("density", "scalar", range=_FRACTION)),
        options=(Arg("gamma", "scalar", 0.01, doc="fraction of largest-magnitude entries dropped", range=_FRACTION),
                 _COUNT, _L1_RESCALE),
        result="delta",
        summary="Model Breadcrumbs: drop the largest gamma fraction and keep the next density fraction",
        reference="Davari & Belilovsky 2023; mergekit magnitude_outliers",
        kernel="tvlang.ops.prune:breadcrumbs",
        chunk_form="tvlang.ops.chunks:breadcrumbs_chunks",
        multipass=True,
    ),
    Builtin(
        "della",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            *_DELLA_SHARED,
            Arg("elect", "string", "total", ("total", "frequency", "none"),
                "sign election as in ties; 'none' merges without election (della_linear)"),
            *_TIES_SHARED[1:],
        ),
        result="delta",
        summary="DELLA: magnitude-ranked keep probabilities, rescale, elect, merge",
        reference="Deep et al. 2024 (DELLA-Merging); mergekit della",
        kernel="tvlang.ops.della:della",
        chunk_form="tvlang.ops.della:della_chunks",
        rules=(_one_weight_per_input, _della_keep_probabilities),
    ),
    Builtin(
        "della_linear",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            *_DELLA_SHARED,
            Arg("merge", "string", "sum", ("sum", "mean", "weighted_mean"),
                "'sum' = the weighted sum (mergekit normalize: false), 'mean' divides by the number of "
                "inputs, 'weighted_mean' by the sum of the weights (normalize: true)"),
            _TIES_SHARED[2],
        ),
        result="delta",
        summary="DELLA's sampling of each input, then their (weighted) sum, times lambda",
        reference="Deep et al. 2024 (DELLA-Merging); mergekit della_linear",
        kernel="tvlang.ops.della:della_linear",
        chunk_form="tvlang.ops.della:della_linear_chunks",
        rules=(_one_weight_per_input, _della_keep_probabilities),
    ),
    Builtin(
        "sce",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("select_topk", "scalar", 1.0, doc="fraction of entries kept, those whose values vary most "
                                                  "across the inputs (of the entries that vary at all)",
                range=_FRACTION),
            _COUNT,
        ),
        result="delta",
        summary="SCE: select the entries that vary most across inputs, elect signs, merge with "
                "weights from each input's mean square",
        reference="Wan et al. 2024 (FuseChat, arXiv:2408.07990); mergekit 0.1.5 sce",
        kernel="tvlang.ops.sce:sce",
        chunk_form="tvlang.ops.sce:sce_chunks",
        multipass=True,
    ),
    Builtin(
        "ram",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(Arg("epsilon", "scalar", 1e-5, doc="an entry with |x| <= epsilon does not contribute",
                     range=(0.0, math.inf)),),
        result="delta",
        summary="RAM: per entry, the mean of the inputs whose |x| exceeds epsilon (0 where none)",
        reference="Reinforced Agent Merging (arXiv:2601.13572); mergekit 0.1.5 ram",
        kernel="tvlang.ops.ram:ram",
        elementwise=True,
    ),
    Builtin(
        "ramplus_tl",
        variadic=Arg("delta", "delta"),
        min_variadic=1,
        options=(
            Arg("r", "scalar", 0.1, doc="strength of the boost of an input's unique entries"),
            Arg("alpha", "scalar", 0.2, doc="cap of the shared/unique ratio in the boost", range=(0.0, math.inf)),
            Arg("epsilon", "scalar", 1e-5, doc="an entry with |x| <= epsilon does not contribute",
                range=(0.0, math.inf)),
        ),
        result="delta",
        summary="RAM+ (tensor-local): RAM, with each input's unique entries scaled by "
                "1 + r*min(shared/unique, alpha)",
        reference="Reinforced Agent Merging (arXiv:2601.13572); mergekit 0.1.5 ramplus_tl",
        kernel="tvlang.ops.ram:ramplus_tl",
        chunk_form="tvlang.ops.ram:ramplus_tl_chunks",
        multipass=True,
    ),
    Builtin(
        "arcee_fusion",
        params=(Arg("base", "model"), Arg("model", "model")),
        result="model",
        summary="Arcee Fusion: take the model's entries whose importance (|change| times the KL "
                "divergence of the rows' softmax) is an upper outlier, the base's elsewhere",
        reference="mergekit 0.1.5 arcee_fusion (exact quantiles where it samples 1M entries)",
        kernel="tvlang.ops.fusion:arcee_fusion",
        chunk_form="tvlang.ops.fusion:arcee_fusion_chunks",
        multipass=True,
    ),
    Builtin(
        "slerp",
        params=(Arg("a", "vector"), Arg("b", "vector"), Arg("t", "scalar")),
        result="same",
        summary="spherical interpolation per tensor; linear when nearly colinear",
        reference="mergekit slerp (DOT_THRESHOLD 0.9995)",
        kernel="tvlang.ops.slerp:slerp",
        chunk_form="tvlang.ops.slerp:slerp_chunks",
        multipass=True,
    ),
    Builtin(
        "model_stock",
        params=(Arg("base", "model"),),
        variadic=Arg("model", "model"),
        min_variadic=2,
        options=(Arg("filter_wise", "bool", False,
                     doc="one ratio per vector along the last dimension (a row of a matrix), not per tensor"),),
        result="model",
        summary="Model Stock: t*average + (1-t)*base with t from the angle between fine-tunes",
        reference="Jang et al. 2024 (Model Stock); mergekit model_stock",
        kernel="tvlang.ops.stock:model_stock",
        chunk_form="tvlang.ops.stock:model_stock_chunks",
        multipass=True,
    ),
    Builtin(
        "random_like",
        params=(Arg("delta", "delta"),),
        options=(Arg("seed", "int", 0.0),),
        result="delta",
        summary="Gaussian noise with the same Frobenius norm as each tensor",
        reference="Ilharco et al. 2023 (random task vector baseline)",
        kernel="tvlang.ops.dare:random_like",
        chunk_form="tvlang.ops.chunks:random_like_chunks",
        multipass=True,
    ),
    Builtin(
        "select",
        params=(Arg("delta", "delta"), Arg("pattern", "string")),
        result="delta",
        summary="keep tensors whose name matches a glob ('a*|b*' for several), zero the rest",
        reference="tvlang",
        kernel="tvlang.ops.select:select",
        elementwise=True,
        rules=(_glob_pattern,),
    ),
    Builtin(
        "pick",
        params=(Arg("pattern", "string"), Arg("a", "vector"), Arg("b", "vector")),
        result="same",
        summary="per tensor: a where the name matches the glob, else b",
        reference="tvlang (mergekit slices/filters)",
        kernel="tvlang.ops.select:pick",
        elementwise=True,
        rules=(_glob_pattern,),
    ),
    Builtin(
        "schedule",
        params=(Arg("delta", "delta"), Arg("values", "list")),
        options=(Arg("default", "scalar", 1.0, doc="scale of tensors with no layer index"),),
        result="delta",
        summary="scale each tensor by a value interpolated over its layer index",
        reference="mergekit gradient parameters",
        kernel="tvlang.ops.select:schedule",
        elementwise=True,
        rules=(_values_not_empty,),
    ),
)
