"""Translations of mergekit's linear and passthrough methods: weighted sums of models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvlang.frontends.mergekit.expressions import _call, _name, _num, _show, _sum, _tidy
from tvlang.frontends.mergekit.source import _NOT_YET
from tvlang.frontends.mergekit.spec import _Input, _Method, _Out, _Param
from tvlang.language import ast
from tvlang.language.pertensor import Layers, PerTensor, Where

if TYPE_CHECKING:
    from tvlang.frontends.mergekit.config import _Merge


def _linear(merge: _Merge) -> _Out:
    inputs = list(merge.inputs)
    if merge.base is not None:  # read first: the output's config and tokenizer are base_model's, as in mergekit
        inputs.sort(key=lambda i: i is not merge.base)
    weights = [i.values["weight"] for i in inputs]
    if any(isinstance(w, PerTensor) for w in weights):
        if not merge.shared["normalize"]:
            note = (f"normalize false ({merge.shared_origins['normalize']}): the weighted sum as it is, with "
                    "weights that vary per tensor.")
            return _scaled_per_tensor(merge, inputs, weights, [note])
        return _Out(_call("mean", [_name(i.name) for i in inputs], weights=weights),
                    [f"normalize {_show(True)} ({merge.shared_origins['normalize']}), weights that vary per tensor: "
                     "mean(..., weights=[...]) divides the weighted sum by the weights' sum for each tensor."])
    total = sum(weights)
    terms = [(w, _name(i.name)) for w, i in zip(weights, inputs)]
    if merge.shared["normalize"]:
        if total == 0:
            raise merge.source.error("linear with normalize: true needs weights whose sum is not 0 "
                                     "(mergekit divides by it)", ("models",))
        expr = _sum(terms)
        if total != 1:
            expr = ast.BinOp("/", expr, _num(_tidy(total)))
        return _Out(expr, [f"normalize {_show(True)} ({merge.shared_origins['normalize']}): the weights are "
                           f"divided by their sum, {_show(_tidy(total))}."])
    notes = [f"normalize false ({merge.shared_origins['normalize']}): the weighted sum as it is."]
    return _scaled_models(merge, inputs, weights, notes)


def _scaled_models(merge: _Merge, inputs: list[_Input], coefs: list[float], notes: list[str]) -> _Out:
    """``sum(c_i * m_i)`` for models whose coefficients need not sum to 1. tvlang's affine rule
    refuses a scaled model (usually a bug); the excess ``C - 1`` of the first model is read
    a second time as plain tensors (``load_delta``), which makes the sum a valid Model."""
    total = sum(coefs)
    terms = [(c, _name(i.name)) for c, i in zip(coefs, inputs)]
    if abs(total - 1) < 1e-9:
        return _Out(_sum(terms), notes)
    _no_raw_stack(merge, inputs[:1])
    first = inputs[0]
    raw = f"{first.name}_raw"
    excess = _tidy(total - 1)
    notes.append(f"The coefficients sum to {_show(_tidy(total))}: the result is {_show(_tidy(total))} times a "
                 f"model, which tvlang's affine rule refuses (it is usually a bug). So {first.name} is read a "
                 f"second time as plain numbers ({raw}, load_delta), and {_show(excess)} of its coefficient moves "
                 "there: the same values, with model weights that sum to 1.")
    terms[0] = (_tidy(coefs[0] - excess), terms[0][1])
    terms = [t for t in terms if t[0] != 0]
    expr = _sum(terms + [(excess, _name(raw))])
    return _Out(expr, notes, [(raw, _call("load_delta", [ast.String(first.path)]),
                               f"{first.name}'s tensors as plain numbers")])


def _no_raw_stack(merge: _Merge, inputs: list[_Input]) -> None:
    """A stack of layer ranges (slices) cannot be read as plain numbers (load_delta) yet."""
    for item in inputs:
        if item.parts is not None:
            raise merge.source.error("a scaled model (passthrough's scale, linear weights that do not sum to 1) "
                                     "over slices' layer ranges is " + _NOT_YET, item.at,
                                     notes=("tvlang reads a scaled model a second time as plain numbers "
                                            "(load_delta), which a stack of layer ranges cannot be yet",))


def _scaled_per_tensor(merge: _Merge, inputs: list[_Input], weights: list, notes: list[str]) -> _Out:
    """``sum(w_i * m_i)`` with per-tensor weights, whose sum need not be 1 for any tensor: the first
    model once as a model, and every model as plain numbers (``load_delta``) weighted by
    ``w_1 - 1, w_2, ...``: ``m_1 + sum(m_1_raw, m_2_raw, ..., weights=[w_1 - 1, w_2, ...])``."""
    _no_raw_stack(merge, inputs)
    first = inputs[0]
    raws = [(f"{i.name}_raw", _call("load_delta", [ast.String(i.path)]), f"{i.name}'s tensors as plain numbers")
            for i in inputs]
    notes.append(f"The weights need not sum to 1, and a scaled model is not a model in tvlang: {first.name} is read "
                 "once as a model and every model as plain numbers (load_delta), weighted by the weights with 1 "
                 f"taken from {first.name}'s.")
    shifted = [_shift(weights[0], -1.0)] + weights[1:]
    total = _call("sum", [_name(name) for name, _, _ in raws], weights=shifted)
    return _Out(ast.BinOp("+", _name(first.name), total), notes, raws)


def _shift(value, by: float):
    """``value + by`` for a number or a per-tensor value (a gradient interpolates linearly, so each
    of its values moves by ``by``)."""
    if isinstance(value, Layers):
        return Layers(tuple(_tidy(v + by) for v in value.values))
    if isinstance(value, Where):
        return Where(value.pattern, _shift(value.then, by), _shift(value.otherwise, by))
    return _tidy(value + by)


def _passthrough(merge: _Merge) -> _Out:
    only = merge.inputs[0]
    scale = only.values["scale"]
    if scale is None:
        return _Out(_name(only.name), ["passthrough: the model as it is."])
    return _scaled_models(merge, [only], [scale], [f"passthrough with scale {_show(scale)} ({only.origins['scale']})."])


LINEAR_METHODS = (
    _Method("linear", "a weighted average of the models (Wortsman et al. 2022, model soups).",
            (_Param("weight", "number", "input", varies=True), _Param("normalize", "bool", "shared", True)), _linear),
    _Method("passthrough", "one model copied as it is, or scaled.",
            (_Param("scale", "number", "input", None),), _passthrough, max_inputs=1),
)
