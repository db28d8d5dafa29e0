"""Translations of mergekit's linear and passthrough methods: weighted sums of models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvlang.frontends.mergekit.expressions import _call, _name, _num, _show, _sum, _tidy
from tvlang.frontends.mergekit.source import _NOT_YET
from tvlang.frontends.mergekit.spec import _Input, _Method, _Out, _Param
from tvlang.language import ast
from tvlang.language.pertensor import PerTensor

if TYPE_CHECKING:
    from tvlang.frontends.mergekit.config import _Merge


def _linear(merge: _Merge) -> _Out:
    inputs = list(merge.inputs)
    if merge.base is not None:  # read first: the output's config and tokenizer are base_model's, as in mergekit
        inputs.sort(key=lambda i: i is not merge.base)
    weights = [i.values["weight"] for i in inputs]
    if any(isinstance(w, PerTensor) for w in weights):
        if not merge.shared["normalize"]:
            raise merge.source.error("linear with normalize: false and weights that vary per tensor (a gradient or "
                                     "a filter list) is " + _NOT_YET, ("parameters", "normalize"),
                                     notes=("with normalize: true (mergekit's default) it is a weighted mean",))
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
