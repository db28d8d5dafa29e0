"""Translations of mergekit's geometric methods: slerp, nuslerp, model_stock."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvlang.frontends.mergekit.expressions import _call, _delta, _name, _num, _show, _tidy
from tvlang.frontends.mergekit.source import _NOT_YET
from tvlang.frontends.mergekit.spec import _Method, _Out, _Param
from tvlang.language import ast

if TYPE_CHECKING:
    from tvlang.frontends.mergekit.config import _Merge


def _slerp(merge: _Merge) -> _Out:
    other = merge.non_base[0]
    t = merge.shared["t"]
    note = (f"t {_show(t)} ({merge.shared_origins['t']}): t = 0 gives the base, t = 1 {other.name}; "
            "linear where a tensor's two values are nearly colinear (|cos| > 0.9995), as mergekit.")
    return _Out(_call("slerp", [_name(merge.base.name), _name(other.name), _num(t)]), [note])


def _nuslerp(merge: _Merge) -> _Out:
    source = merge.source
    if merge.base is None:
        raise source.error("nuslerp without a base_model is " + _NOT_YET, ("merge_method",),
                           notes=("with a base_model it is base + slerp of the two task vectors",))
    for name, supported in (("nuslerp_flatten", True), ("nuslerp_row_wise", False)):
        if merge.shared[name] != supported:
            raise source.error(f"nuslerp with {name}: {_show(merge.shared[name])} is {_NOT_YET}",
                               ("parameters", name))
    first, second = merge.non_base
    w1, w2 = first.values["weight"], second.values["weight"]
    t = 0.5 if abs(w1 + w2) < 1e-6 else _tidy(w2 / (w1 + w2))
    note = (f"t = weight of {second.name} / sum of the weights = {_show(w2)}/({_show(w1)} + {_show(w2)}) "
            f"= {_show(t)}: each tensor's task vectors are interpolated on the sphere (nuslerp_flatten: true).")
    expr = ast.BinOp("+", _name(merge.base.name),
                     _call("slerp", [_delta(first, merge.base), _delta(second, merge.base), _num(t)]))
    return _Out(expr, [note])


def _model_stock(merge: _Merge) -> _Out:
    if merge.shared["filter_wise"]:
        raise merge.source.error("model_stock with filter_wise: true is " + _NOT_YET, ("parameters", "filter_wise"))
    args = [_name(merge.base.name)] + [_name(i.name) for i in merge.non_base]
    return _Out(_call("model_stock", args), ["filter_wise false: one interpolation ratio per tensor."])


GEOMETRIC_METHODS = (
    _Method("slerp", "spherical interpolation between the base and one other model, tensor by tensor.",
            (_Param("t", "number", "shared"),), _slerp, base="required", min_inputs=2, max_inputs=2),
    _Method("nuslerp", "spherical interpolation of two task vectors, weighted, tensor by tensor.",
            (_Param("weight", "number", "non_base"), _Param("nuslerp_row_wise", "bool", "shared", False),
             _Param("nuslerp_flatten", "bool", "shared", True)), _nuslerp, base="optional",
            min_inputs=2, max_inputs=3),  # two models, and the base if there is one
    _Method("model_stock", "Model Stock (Jang et al. 2024): the base moved toward the fine-tunes' average by "
            "a ratio set by the angle between them.",
            (_Param("filter_wise", "bool", "shared", False),), _model_stock, base="required", min_inputs=3),
)
