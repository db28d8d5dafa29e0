"""Translations of mergekit's methods that choose, per entry, which task vectors count:
sce, ram, ramplus_tl, arcee_fusion."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvlang.frontends.mergekit.expressions import _call, _delta, _name, _show
from tvlang.frontends.mergekit.spec import _Method, _Out, _Param
from tvlang.language import ast

if TYPE_CHECKING:
    from tvlang.frontends.mergekit.config import _Merge

_RAM_EPSILON = 1e-5  # mergekit 0.1.5's default for ram and ramplus_tl


def _plus_base(merge: _Merge, func: str, notes: list[str], **options) -> _Out:
    entries = merge.non_base
    if not entries:
        return _Out(_name(merge.base.name), notes + ["No model besides the base: mergekit returns the base."])
    call = _call(func, [_delta(i, merge.base) for i in entries], **options)
    return _Out(ast.BinOp("+", _name(merge.base.name), call), notes)


def _sce(merge: _Merge) -> _Out:
    topk = merge.shared["select_topk"]
    notes = [f"select_topk {_show(topk)} ({merge.shared_origins['select_topk']}): of the entries whose value varies "
             "across the task vectors, the int(select_topk * count) that vary most are kept (count=\"mergekit\"; "
             "equal variances ranked by position), then signs are elected and each task vector is weighted by its "
             "mean square."]
    return _plus_base(merge, "sce", notes, select_topk=topk if topk < 1 else None,
                      count="mergekit" if topk < 1 else None)


def _ram(merge: _Merge) -> _Out:
    eps = merge.shared["epsilon"]
    notes = [f"epsilon {_show(eps)} ({merge.shared_origins['epsilon']}): per entry, the mean of the task vectors "
             "whose |value| exceeds epsilon; an entry only one of them changes keeps that change."]
    return _plus_base(merge, "ram", notes, epsilon=None if eps == _RAM_EPSILON else eps)


def _ramplus(merge: _Merge) -> _Out:
    r, alpha, eps = merge.shared["r"], merge.shared["alpha"], merge.shared["epsilon"]
    notes = [", ".join(f"{name} {_show(merge.shared[name])} ({merge.shared_origins[name]})"
                       for name in ("r", "alpha", "epsilon"))
             + ": as ram, with each task vector's unique entries scaled by 1 + r*min(shared/unique, alpha), "
             "counted per tensor."]
    return _plus_base(merge, "ramplus_tl", notes, r=None if r == 0.1 else r, alpha=None if alpha == 0.2 else alpha,
                      epsilon=None if eps == _RAM_EPSILON else eps)


def _arcee_fusion(merge: _Merge) -> _Out:
    other = merge.non_base[0]
    notes = [f"{other.name}'s entries where their importance (|change| times the KL divergence of the rows' softmax) "
             "reaches median + 1.5*(Q3 - Q1) of the tensor's, the base's elsewhere. Above 1,000,000 entries mergekit "
             "takes the quartiles from a random sample, tvlang from every entry."]
    return _Out(_call("arcee_fusion", [_name(merge.base.name), _name(other.name)]), notes)


_INT8_MASK = _Param("int8_mask", "bool", "shared", False)

SELECTION_METHODS = (
    _Method("sce", "SCE (Wan et al. 2024, FuseChat): select the entries whose task vectors vary most, elect a "
            "sign per entry, merge the agreeing task vectors weighted by their mean square.",
            (_INT8_MASK, _Param("select_topk", "number", "shared", 1.0)), _sce, base="required"),
    _Method("ram", "RAM (Reinforced Agent Merging): per entry, the mean of the task vectors that change it.",
            (_Param("epsilon", "number", "shared", _RAM_EPSILON),), _ram, base="required"),
    _Method("ramplus_tl", "RAM+ (tensor-local): RAM, with each task vector's unique changes boosted by how much "
            "it shares with the others.",
            (_Param("r", "number", "shared", 0.1), _Param("alpha", "number", "shared", 0.2),
             _Param("epsilon", "number", "shared", _RAM_EPSILON)), _ramplus, base="required"),
    _Method("arcee_fusion", "Arcee Fusion: the base, with the other model's entries where their change matters "
            "most.", (), _arcee_fusion, base="required", min_inputs=2, max_inputs=2),
)
