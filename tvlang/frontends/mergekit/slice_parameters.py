"""Parameters of mergekit ``slices``: a source's own, its slice's, the global ones.

mergekit reads a parameter for a tensor of slice ``k`` from the source's ``parameters``, then
slice ``k``'s ``parameters``, then the global ones (the embeddings as slice 0, the final norm
and head as the last slice). tvlang merges source ``p`` of every slice as one stack, so a
value that differs between slices becomes a per-tensor value over the stack's layers:
``where("*.layers.0.* | *.layers.1.* | *embed*", 0.3, 0.7)`` (the layers of the slices that
take 0.3, and the embeddings when slice 0 does; the other tensors take the last slice's).
Layers are matched as ``model.layers.N.`` names (Llama-style models, what mergekit's layer
surgery is written for). A method parameter read from the global ``parameters`` only
(``t`` of ``slerp``, ``normalize``, ``lambda``) that a slice sets becomes a global value the
same way. A gradient or filter list with several slices, which mergekit restarts at each
slice, becomes each layer's exact value (``_per_layer``).
"""

from __future__ import annotations

from typing import Any

from tvlang.frontends.mergekit.methods import _METHODS
from tvlang.frontends.mergekit.source import _NOT_YET, _Source
from tvlang.frontends.mergekit.spec import REQUIRED
from tvlang.frontends.mergekit.values import _close, _open, _value
from tvlang.language.pertensor import Layers, Where, gradient_value

_MISSING = object()


def _position_parameters(source: _Source, data: dict, rows: list[list[dict]], slice_settings: list[dict],
                         spans: list[tuple[int, int]], bases: list) -> tuple[list[dict | None], dict]:
    """Each position's ``parameters`` and the global ``parameters``, with the slices' values folded in."""
    method = _METHODS.get(data.get("merge_method"))  # type: ignore[arg-type]
    global_settings = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    shared = {p.name for p in method.params if p.scope == "shared"} if method is not None else set()
    several = len(rows) > 1
    # a gradient or filter list given once, globally, is read per slice too when there are several
    graded = {n for n, v in global_settings.items() if several and not _scalar(v)
              and method is not None and method.param(n) is not None}
    merged_global = dict(global_settings)
    for name in sorted({n for s in slice_settings for n in s if n in shared} | (graded & shared)):
        values = [s.get(name, global_settings.get(name, _MISSING)) for s in slice_settings]
        at = next((("slices", k, "parameters", name) for k, s in enumerate(slice_settings) if name in s),
                  ("parameters", name))
        chains = [_chain(name, [(s, ("slices", k, "parameters")), (global_settings, ("parameters",))])
                  for k, s in enumerate(slice_settings)]
        merged_global[name] = _per_slice(source, method, name, values, spans, at, chains)
    positions: list[dict | None] = []
    for p in range(len(rows[0])):
        column = [row[p] for row in rows]
        is_base = all(b is not None and item["model"] == b for item, b in zip(column, bases))
        names = {n for item in column for n in (item["parameters"] or {})}
        # a slice's own or a global gradient: for the base too where it merges like any other input
        names |= {n for n in {n for s in slice_settings for n in s if n not in shared} | (graded - shared)
                  if not (is_base and _skips_base(method, n))}
        if not names:
            positions.append(column[0]["parameters"])
            continue
        settings: dict[str, Any] = {}
        for name in sorted(names):
            values = []
            for item, own in zip(column, slice_settings):
                mine = item["parameters"] or {}
                values.append(mine[name] if name in mine else own.get(name, global_settings.get(name, _MISSING)))
            at = next((item["at"] + ("parameters", name) for item in column if name in (item["parameters"] or {})),
                      None) or next((("slices", k, "parameters", name) for k, s in enumerate(slice_settings)
                                     if name in s), ("parameters", name))
            chains = [_chain(name, [(item["parameters"] or {}, item["at"] + ("parameters",)),
                                    (own, ("slices", k, "parameters")), (global_settings, ("parameters",))])
                      for k, (item, own) in enumerate(zip(column, slice_settings))]
            settings[name] = _per_slice(source, method, name, values, spans, at, chains)
        positions.append(settings)
    return positions, merged_global


def _skips_base(method: Any, name: str) -> bool:
    """Whether ``method`` takes no ``name`` for the base_model (mergekit ignores it there)."""
    param = method.param(name) if method is not None else None
    return param is not None and param.scope == "non_base" and method.base != "ignored"


def _scalar(value: Any) -> bool:
    return not isinstance(value, (list, dict))


def _chain(name: str, scopes: list[tuple[dict, tuple]]) -> list[tuple[Any, tuple]]:
    """Where mergekit looks for ``name`` for one slice, highest precedence first: (value, place)."""
    return [(settings[name], at + (name,)) for settings, at in scopes if name in settings]


def _per_slice(source: _Source, method: Any, name: str, values: list, spans: list[tuple[int, int]],
               at: tuple, chains: list[list[tuple[Any, tuple]]]) -> Any:
    """One value for every slice, or a ``where`` over the slices' layers for numbers that differ."""
    param = method.param(name) if method is not None else None
    if len(spans) > 1 and param is not None and not all(_scalar(v) for v in values if v is not _MISSING):
        return _per_layer(source, param, chains, spans)
    if all(v is not _MISSING and v == values[0] for v in values):
        return values[0]
    if any(v is _MISSING for v in values):
        raise source.error(f"{name} is set for some slices only, and there is no global value for the others: "
                           f"per-slice defaults are {_NOT_YET}", at,
                           notes=(f"give {name} under the global parameters too",))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if param is None or not param.varies or not numbers:
        what = "a number that varies per tensor" if param is not None and not param.varies else "a single number"
        raise source.error(f"{name} differs between slices, and per-slice values of it are {_NOT_YET}", at,
                           notes=(f"per-slice values are supported for {what} of each slice only"
                                  if numbers else "per-slice gradients and filter lists are not supported yet",))
    value: Any = float(values[-1])  # the last slice's, and the final norm and head
    for k in range(len(values) - 2, -1, -1):
        if values[k] == values[-1]:
            continue
        same = [j for j in range(len(values) - 1) if values[j] == values[k]]
        if same[-1] != k:
            continue  # written once, at its last slice
        globs = [f"*.layers.{i}.*" for j in same for i in range(*spans[j])]
        if 0 in same:
            globs.append("*embed*")  # the embeddings are merged as slice 0
        value = Where(" | ".join(globs), float(values[k]), value)
    return value


def _per_layer(source: _Source, param: Any, chains: list[list[tuple[Any, tuple]]],
               spans: list[tuple[int, int]]) -> Any:
    """A gradient or filter list with several slices, as mergekit 0.1.5 evaluates it: each slice
    reads its own value (the source's, the slice's, the global one, a filter list falling through
    to the next) and restarts the gradient over its own layers, layer ``i`` of ``n`` at
    ``t = i/(n - 1)`` (``t = 1`` for a one-layer slice); the embeddings take slice 0's value at
    ``t = 0``, the final norm and head the last slice's at ``t = 0``. The result is each layer's
    exact value: a ``where`` over the stack's layers that share a value (a filter list stays a
    ``where`` by name inside it), the last slice's ``t = 0`` value for the rest."""
    trees = [_resolved(source, param, chain, k) for k, chain in enumerate(chains)]
    per_layer = []
    for (start, end), tree in zip(spans, trees):
        per_layer += [_at_layer(tree, i, end - start) for i in range(end - start)]
    first, last = _at_layer(trees[0], None, 1), _at_layer(trees[-1], None, 1)
    groups: dict[Any, list[str]] = {}  # a value -> the globs of the tensors that take it, in layer order
    for index, value in enumerate(per_layer):
        if value != last:
            groups.setdefault(value, []).append(f"*.layers.{index}.*")
    if first != last:
        groups.setdefault(first, []).append("*embed*")  # the embeddings are merged as slice 0
    result: Any = last
    for value, globs in reversed(groups.items()):
        result = Where(" | ".join(globs), value, result)
    return result


def _resolved(source: _Source, param: Any, chain: list[tuple[Any, tuple]], number: int) -> Any:
    """Slice ``number``'s value: the first place in ``chain`` that has one, a filter list that
    leaves tensors unmatched completed by the next place, then by the method's default."""
    tree = None
    for raw, at in chain:
        value = _value(source, param, raw, at)
        tree = value if tree is None else _close(tree, value)
        if not _open(tree):
            return tree
    if param.default is REQUIRED:
        if tree is None:
            raise source.error(f"{param.name} has no value for slices[{number}] (neither its sources', its own "
                               "nor the global parameters give one)", ("slices", number),
                               notes=(f"give {param.name} under the global parameters",))
        raise source.error(f"{param.name}: no filter matches some tensors of slices[{number}], and there is no "
                           "other value for them", chain[-1][1],
                           notes=("add a last entry without a filter: - value: ...",))
    return param.default if tree is None else _close(tree, param.default)


def _at_layer(value: Any, index: int | None, count: int) -> Any:
    """``value`` for layer ``index`` of a slice of ``count`` layers (None: outside the layers)."""
    if isinstance(value, Layers):
        return gradient_value(value.values, index, count)
    if isinstance(value, Where):
        then, otherwise = _at_layer(value.then, index, count), _at_layer(value.otherwise, index, count)
        return then if then == otherwise else Where(value.pattern, then, otherwise)
    return value
