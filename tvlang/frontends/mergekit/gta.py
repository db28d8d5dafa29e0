"""Translations of mergekit's generalized task arithmetic family: task_arithmetic, ties,
dare_*, breadcrumbs*, della*: prune each task vector, maybe elect signs, weight and add."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tvlang.frontends.mergekit.expressions import (
    _call,
    _delta,
    _literal,
    _name,
    _num,
    _scaled,
    _show,
    _sum,
    _tidy,
)
from tvlang.frontends.mergekit.source import _NOT_YET, _Path
from tvlang.frontends.mergekit.spec import _ORIGIN_GLOBAL, _Input, _Method, _Out, _Param
from tvlang.language import ast
from tvlang.language.pertensor import Layers, PerTensor, Where

if TYPE_CHECKING:
    from tvlang.frontends.mergekit.config import _Merge


def _gta_params(sparsify: str | None, normalize: bool, rescale: bool, varies: bool = True) -> tuple[_Param, ...]:
    """mergekit's parameters of a method of the family; ``varies``: weight, density, gamma and epsilon
    may be gradients or filter lists (options of the calls: layers(), where(); weights of a sum
    become ``sum(..., weights=[...])``)."""
    params = [
        _Param("int8_mask", "bool", "shared", False),
        _Param("normalize", "bool", "shared", normalize),
        _Param("rescale", "bool", "shared", rescale),
        _Param("lambda", "number", "shared", 1.0),
        _Param("weight", "number", "non_base", varies=varies),
    ]
    if sparsify is not None:  # mergekit takes a density for task_arithmetic too, and ignores it
        params.append(_Param("density", "number", "non_base", 1.0, varies=varies))
    if sparsify == "outliers":
        params.append(_Param("gamma", "number", "non_base", 0.01, varies=varies))
    if sparsify == "della":
        params.append(_Param("epsilon", "number", "non_base", 0.15, varies=varies))
    return tuple(params)


def _gta(merge: _Merge) -> _Out:
    """The generalized task arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*."""
    method, source, base = merge.method, merge.source, merge.base
    entries = merge.non_base
    shared = merge.shared
    notes = [", ".join(f"{name} {_show(shared[name])} ({merge.shared_origins[name]})"
                       for name in ("normalize", "rescale", "lambda") if name in shared
                       and (name != "rescale" or method.sparsify is not None))]
    if not entries:
        return _Out(_name(base.name), notes + ["No model besides the base: mergekit returns the base."])
    weights = [i.values["weight"] for i in entries]
    densities = [i.values.get("density", 1.0) for i in entries]
    if method.sparsify is not None:
        for item in entries:
            if not all(0 <= v <= 1 for v in _leaves(item.values["density"])):  # mergekit: >1 keeps all, <0 none
                raise source.error(f"density must be in [0, 1], got {_show(item.values['density'])}",
                                   _origin_at(item, "density"))
    rescale = shared["rescale"]
    if rescale and method.sparsify in ("magnitude", "outliers"):
        notes.append("rescale true: the kept entries of each task vector are scaled to its L1 norm, as mergekit "
                     "0.1.5 does (rescale_by=\"l1\").")
    if method.sparsify in ("random", "della"):
        notes.append(("rescale true: the kept entries of each task vector are scaled to its L1 norm, as mergekit "
                      "0.1.5 does (rescale_by=\"l1\"). " if rescale else "")
                     + "The random masks differ from mergekit's (tvlang seeds them per tensor name).")
    if method.sparsify in ("magnitude", "outliers"):
        notes.append("count=\"mergekit\": a density keeps max(1, int(density*n)) entries (int(density*n) for "
                     "breadcrumbs), as mergekit; equal magnitudes are ranked by position.")
    normalize, lam = shared["normalize"], shared["lambda"]
    deltas = [_delta(i, base) for i in entries]
    one_density = all(d == densities[0] for d in densities)

    if method.sparsify == "della":
        epsilons = [i.values["epsilon"] for i in entries]
        for label, values in (("density", densities), ("epsilon", epsilons)):
            if any(v != values[0] for v in values):
                raise source.error(f"{method.name} with a different {label} per model is {_NOT_YET}",
                                   _origin_at(entries[1], label), notes=(f"give one {label} for every model",))
        density, epsilon = densities[0], epsilons[0]
        for d in _leaves(density):  # per-tensor values: every combination of their values, to be safe
            for e in _leaves(epsilon):
                if 0 < d < 1 and not (d - e > 0 and d + e < 1):
                    raise source.error(f"epsilon {_show(e)} must keep density - epsilon and density + epsilon "
                                       f"inside (0, 1) (density {_show(d)})", _origin_at(entries[0], "epsilon"))
        weighting = _weighting(weights, normalize)
        if not method.consensus and weighting["merge"] == "sum":
            weighting.pop("merge")  # della_linear's default
        call = _call("della" if method.consensus else "della_linear", deltas, density=density, epsilon=epsilon,
                     lambda_=lam if lam != 1 else None, **weighting, **_rescaling(rescale))
        return _Out(ast.BinOp("+", _name(base.name), call), notes)

    if method.consensus:
        if method.sparsify == "magnitude" and one_density:
            call = _call("ties", deltas, density=densities[0], **_weighting(weights, normalize), count="mergekit",
                         **_l1(rescale))
        elif method.sparsify == "random" and one_density:
            call = _call("dare_ties", deltas, p=_complement(densities[0]), **_weighting(weights, normalize),
                         **_rescaling(rescale))
        else:
            pruned = [_prune(method.sparsify, d, i, n, rescale) for n, (d, i) in enumerate(zip(deltas, entries))]
            call = _call("ties", pruned, density=1, **_weighting(weights, normalize))
        return _Out(ast.BinOp("+", _name(base.name), _scaled(lam, call)), notes)

    if method.sparsify == "random" and one_density and len(entries) > 1:
        weighting = _weighting(weights, normalize)
        if weighting["merge"] == "sum":
            weighting.pop("merge")  # dare_linear's default
        call = _call("dare_linear", deltas, p=_tidy(1 - densities[0]), **weighting, **_rescaling(rescale))
        return _Out(ast.BinOp("+", _name(base.name), _scaled(lam, call)), notes)

    pruned = [_prune(method.sparsify, d, i, n, rescale) for n, (d, i) in enumerate(zip(deltas, entries))]
    if any(isinstance(w, PerTensor) for w in weights):  # weights that vary per tensor: options of one call
        notes.append("The weights vary per tensor: " + (
            "mean(..., weights=[...]) divides the weighted sum by the weights' sum for each tensor (mergekit does "
            "not divide where they sum to 0; tvlang stops there with an error)." if normalize else
            "sum(..., weights=[...]) is the weighted sum, with each tensor's weights."))
        mixed = _call("mean" if normalize else "sum", pruned, weights=weights)
        return _Out(ast.BinOp("+", _name(base.name), _scaled(lam, mixed)), notes)
    terms = list(zip(weights, pruned))
    total = sum(weights)
    divide = normalize and abs(total) >= 1e-8 and total != 1
    if normalize and abs(total) < 1e-8:
        notes.append("The weights sum to 0: mergekit does not divide by them.")
    if not divide and lam == 1:
        return _Out(_sum(terms, _name(base.name)), notes)  # base + 0.5*(a - base) + 0.3*(b - base)
    mixed = _sum(terms)
    if lam != 1:
        mixed = ast.BinOp("*", _num(lam), mixed)
    if divide:
        mixed = ast.BinOp("/", mixed, _num(_tidy(total)))
    return _Out(ast.BinOp("+", _name(base.name), mixed), notes)


def _weighting(weights: list[float], normalize: bool) -> dict[str, Any]:
    """The options of ties/dare_ties/della for mergekit's weights and normalize."""
    if all(w == 1 for w in weights):
        return {"merge": "mean" if normalize else "sum"}
    return {"weights": weights, "merge": "weighted_mean" if normalize else "sum"}


def _rescaling(rescale: bool) -> dict[str, Any]:
    """dare's and della's options for mergekit's rescale: the L1 norm, or none."""
    return {"rescale_by": "l1"} if rescale else {"rescale": False}


def _l1(rescale: bool) -> dict[str, Any]:
    """The magnitude pruners' option for mergekit's rescale: the L1 norm, or nothing (their default)."""
    return {"rescale_by": "l1"} if rescale else {}


def _prune(sparsify: str | None, delta: ast.Expr, item: _Input, seed: int, rescale: bool) -> ast.Expr:
    density = item.values.get("density", 1.0)
    if sparsify is None:
        return delta
    if sparsify == "magnitude":
        return _call("topk", [delta, _literal(density)], count="mergekit", **_l1(rescale))
    if sparsify == "outliers":
        return _call("breadcrumbs", [delta, _literal(density)], gamma=item.values["gamma"], count="mergekit",
                     **_l1(rescale))
    assert sparsify == "random"
    return _call("dare", [delta, _literal(_complement(density))], seed=seed or None, **_rescaling(rescale))


def _leaves(value: Any) -> tuple:
    return value.leaves() if isinstance(value, PerTensor) else (value,)


def _complement(density: Any) -> Any:
    """``1 - density``: a drop probability, for a number or a per-tensor value."""
    if isinstance(density, Layers):
        return Layers(tuple(_tidy(1 - v) for v in density.values))
    if isinstance(density, Where):
        return Where(density.pattern, _complement(density.then), _complement(density.otherwise))
    return _tidy(1 - density)


def _origin_at(item: _Input, name: str) -> _Path:
    origin = item.origins.get(name, "")
    if origin.startswith("models["):
        return ("models", item.index, "parameters", name)
    if origin == _ORIGIN_GLOBAL:
        return ("parameters", name)
    return item.at


def _gta_method(name: str, title: str, consensus: bool, sparsify: str | None, normalize: bool,
                rescale: bool) -> _Method:
    return _Method(name, title, _gta_params(sparsify, normalize, rescale), _gta, base="required",
                   consensus=consensus, sparsify=sparsify)


GTA_METHODS = (
    _gta_method("task_arithmetic", "Task Arithmetic (Ilharco et al. 2023): the base plus the weighted sum of the "
                "task vectors (model - base).", False, None, False, False),
    _gta_method("ties", "TIES-Merging (Yadav et al. 2023): trim each task vector to its density by magnitude, "
                "elect a sign per entry, merge the entries that agree with it.", True, "magnitude", True, False),
    _gta_method("dare_ties", "DARE (Yu et al. 2024) then TIES' sign election: drop random entries of each task "
                "vector, rescale the rest, merge the entries that agree with the elected sign.",
                True, "random", False, True),
    _gta_method("dare_linear", "DARE (Yu et al. 2024): drop random entries of each task vector, rescale the "
                "rest, add them to the base.", False, "random", False, True),
    _gta_method("breadcrumbs", "Model Breadcrumbs (Davari & Belilovsky 2023): drop each task vector's largest "
                "(gamma) and smallest entries, keep density of them.", False, "outliers", False, False),
    _gta_method("breadcrumbs_ties", "Model Breadcrumbs (Davari & Belilovsky 2023) with TIES' sign election.",
                True, "outliers", False, False),
    _gta_method("della", "DELLA-Merging (Deep et al. 2024): keep entries with probabilities ranked by "
                "magnitude, rescale, elect signs, merge.", True, "della", True, True),
    _gta_method("della_linear", "DELLA-Merging (Deep et al. 2024) without sign election.",
                False, "della", False, True),
)
