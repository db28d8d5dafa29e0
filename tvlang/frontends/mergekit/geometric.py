"""Translations of mergekit's geometric methods: slerp, nuslerp, multislerp, karcher, nearswap,
model_stock."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvlang.frontends.mergekit.expressions import _brief, _call, _delta, _literal, _name, _num, _show, _tidy
from tvlang.frontends.mergekit.spec import _Method, _Out, _Param
from tvlang.language import ast
from tvlang.language.pertensor import PerTensor, representative

if TYPE_CHECKING:
    from tvlang.frontends.mergekit.config import _Merge


def _slerp(merge: _Merge) -> _Out:
    other = merge.non_base[0]
    t = merge.shared["t"]
    note = (f"t {_brief(t)} ({merge.shared_origins['t']}): t = 0 gives the base, t = 1 {other.name}; "
            "linear where a tensor's two values are nearly colinear (|cos| > 0.9995), as mergekit.")
    return _Out(_call("slerp", [_name(merge.base.name), _name(other.name), _literal(t)]), [note])


def _nuslerp(merge: _Merge) -> _Out:
    first, second = merge.non_base
    w1, w2 = first.values["weight"], second.values["weight"]
    t = 0.5 if abs(w1 + w2) < 1e-6 else _tidy(w2 / (w1 + w2))
    flatten, row_wise = merge.shared["nuslerp_flatten"], merge.shared["nuslerp_row_wise"]
    if flatten:
        shape = "each tensor, flattened (nuslerp_flatten: true),"
    else:
        shape = ("each column of a matrix (vectors along its first dimension: nuslerp_row_wise: true)" if row_wise
                 else "each row of a matrix (vectors along its last dimension: nuslerp_row_wise: false)")
    what = "task vectors" if merge.base is not None else "models"
    notes = [f"t = weight of {second.name} / sum of the weights = {_show(w2)}/({_show(w1)} + {_show(w2)}) "
             f"= {_show(t)}: the {what} are interpolated on the sphere, {shape} linearly only where they are "
             "colinear."]
    options = {"flatten": None if flatten else False, "row_wise": True if row_wise and not flatten else None}
    if merge.base is None:
        return _Out(_call("nuslerp", [_name(first.name), _name(second.name), _num(t)], **options), notes)
    call = _call("nuslerp", [_delta(first, merge.base), _delta(second, merge.base), _num(t)], **options)
    return _Out(ast.BinOp("+", _name(merge.base.name), call), notes)


def _multislerp(merge: _Merge) -> _Out:
    entries = merge.non_base
    if not entries:
        raise merge.source.error("multislerp needs at least one model besides the base_model", ("models",))
    weights = [i.values["weight"] for i in entries]
    normalize, eps = merge.shared["normalize_weights"], merge.shared["eps"]
    if normalize and abs(sum(representative(tuple(weights)))) < 1e-12:
        raise merge.source.error("multislerp with normalize_weights: true needs weights whose sum is not 0 "
                                 "(mergekit divides by it)", ("models",))
    options = {"weights": None if all(w == weights[0] for w in weights) and normalize else weights,
               "normalize_weights": None if normalize else False, "eps": None if eps == 1e-8 else eps}
    notes = [f"normalize_weights {_show(normalize)} ({merge.shared_origins['normalize_weights']}), eps {_show(eps)} "
             f"({merge.shared_origins['eps']})."]
    if merge.base is None:
        return _Out(_call("multislerp", [_name(i.name) for i in entries], **options), notes)
    notes.append("With a base_model the task vectors are interpolated and the base added back, as mergekit.")
    call = _call("multislerp", [_delta(i, merge.base) for i in entries], **options)
    return _Out(ast.BinOp("+", _name(merge.base.name), call), notes)


def _karcher(merge: _Merge) -> _Out:
    max_iter, tol = merge.shared["max_iter"], merge.shared["tol"]
    options = {"max_iter": None if max_iter == 10 else max_iter, "tol": None if tol == 1e-5 else tol}
    notes = [f"max_iter {_show(max_iter)} ({merge.shared_origins['max_iter']}), tol {_show(tol)} "
             f"({merge.shared_origins['tol']}): every model (the base_model too) weighs the same, as in mergekit."]
    inputs = sorted(merge.inputs, key=lambda i: i is not merge.base)  # the base first: the output takes its config
    return _Out(_call("karcher", [_name(i.name) for i in inputs], **options), notes)


def _nearswap(merge: _Merge) -> _Out:
    other = merge.non_base[0]
    t = merge.shared["t"]
    if any(v < 0 for v in _leaves(t)):
        raise merge.source.error(f"nearswap's t must be at least 0, got {_show(t)}", ("parameters", "t"))
    note = (f"t {_brief(t)} ({merge.shared_origins['t']}): entries within t of the base take {other.name}'s "
            f"value, the others move toward it by t/|base - {other.name}|.")
    return _Out(_call("nearswap", [_name(merge.base.name), _name(other.name), _literal(t)]), [note])


def _leaves(value: object) -> tuple:
    return value.leaves() if isinstance(value, PerTensor) else (value,)


def _model_stock(merge: _Merge) -> _Out:
    args = [_name(merge.base.name)] + [_name(i.name) for i in merge.non_base]
    if merge.shared["filter_wise"]:
        return _Out(_call("model_stock", args, filter_wise=True),
                    ["filter_wise true: one interpolation ratio per row (vector along the last dimension)."])
    return _Out(_call("model_stock", args), ["filter_wise false: one interpolation ratio per tensor."])


GEOMETRIC_METHODS = (
    _Method("slerp", "spherical interpolation between the base and one other model, tensor by tensor.",
            (_Param("t", "number", "shared", varies=True),), _slerp, base="required", min_inputs=2, max_inputs=2),
    _Method("nuslerp", "spherical interpolation of two models (of their task vectors with a base_model), "
            "weighted, tensor by tensor or row by row.",
            (_Param("weight", "number", "non_base"), _Param("nuslerp_row_wise", "bool", "shared", False),
             _Param("nuslerp_flatten", "bool", "shared", True)), _nuslerp, base="optional",
            min_inputs=2, max_inputs=3),  # two models, and the base if there is one
    _Method("multislerp", "Multi-SLERP (Goddard): a weighted mean of several models (of their task vectors with a "
            "base_model) on the sphere, scaled to their weighted mean norm, tensor by tensor.",
            (_Param("weight", "number", "non_base", varies=True), _Param("normalize_weights", "bool", "shared", True),
             _Param("eps", "number", "shared", 1e-8)), _multislerp, base="optional"),
    _Method("karcher", "the Karcher (Riemannian) mean of the models' directions on the sphere, scaled to their "
            "mean norm, tensor by tensor.",
            (_Param("max_iter", "int", "shared", 10.0), _Param("tol", "number", "shared", 1e-5)), _karcher),
    _Method("nearswap", "NearSwap: per entry, the other model's value where it is within t of the base, else the "
            "base moved toward it by t/|difference|.",
            (_Param("t", "number", "shared", varies=True),), _nearswap, base="required", min_inputs=2,
            max_inputs=2),
    _Method("model_stock", "Model Stock (Jang et al. 2024): the base moved toward the fine-tunes' average by "
            "a ratio set by the angle between them.",
            (_Param("filter_wise", "bool", "shared", False),), _model_stock, base="required", min_inputs=3),
)
