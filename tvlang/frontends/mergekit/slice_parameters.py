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
same way.
"""

from __future__ import annotations

from typing import Any

from tvlang.frontends.mergekit.methods import _METHODS
from tvlang.frontends.mergekit.source import _NOT_YET, _Source
from tvlang.language.pertensor import Where

_MISSING = object()


def _position_parameters(source: _Source, data: dict, rows: list[list[dict]], slice_settings: list[dict],
                         spans: list[tuple[int, int]]) -> tuple[list[dict | None], dict]:
    """Each position's ``parameters`` and the global ``parameters``, with the slices' values folded in."""
    method = _METHODS.get(data.get("merge_method"))  # type: ignore[arg-type]
    global_settings = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    shared = {p.name for p in method.params if p.scope == "shared"} if method is not None else set()
    merged_global = dict(global_settings)
    for name in sorted({n for s in slice_settings for n in s if n in shared}):
        values = [s.get(name, global_settings.get(name, _MISSING)) for s in slice_settings]
        at = next(("slices", k, "parameters", name) for k, s in enumerate(slice_settings) if name in s)
        merged_global[name] = _per_slice(source, method, name, values, spans, at)
    positions: list[dict | None] = []
    for p in range(len(rows[0])):
        column = [row[p] for row in rows]
        names = {n for item in column for n in (item["parameters"] or {})}
        names |= {n for s in slice_settings for n in s if n not in shared}
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
                      None) or next(("slices", k, "parameters", name) for k, s in enumerate(slice_settings)
                                    if name in s)
            settings[name] = _per_slice(source, method, name, values, spans, at)
        positions.append(settings)
    return positions, merged_global


def _per_slice(source: _Source, method: Any, name: str, values: list, spans: list[tuple[int, int]],
               at: tuple) -> Any:
    """One value for every slice, or a ``where`` over the slices' layers for numbers that differ."""
    if all(v is not _MISSING and v == values[0] for v in values):
        return values[0]
    if any(v is _MISSING for v in values):
        raise source.error(f"{name} is set for some slices only, and there is no global value for the others: "
                           f"per-slice defaults are {_NOT_YET}", at,
                           notes=(f"give {name} under the global parameters too",))
    param = method.param(name) if method is not None else None
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
