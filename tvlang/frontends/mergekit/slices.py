"""mergekit's ``slices``: layer surgery, read as a merge of stacks.

mergekit merges each output slice's sources layer by layer and puts the slices' layers one
after another. tvlang reads the sources position by position: source ``p`` of every slice,
stacked in slice order, is one model (``stack(load("a", layers=[0, 24]), ...)``, see
``tvlang.language.surgery``), and the method merges those stacks as it merges the models of
``models:``. This is exactly mergekit's result, embeddings from the first slice and the final
norm and head from the last included, because each slice merges its sources the same way.
A position that takes every layer of one model in turn is that model (``load("a")``), so a
single slice over every layer is the merge of the whole models.

What it needs: every slice has as many sources, and the base_model (the slice's own, else
the global one, when the method uses one) is a source of every slice at the same position.
Parameters (a source's, its slice's, the global ones, as mergekit reads them) that differ
between slices, and gradients, which mergekit restarts at each slice, become per-tensor values
over the stack's layers (``slice_parameters``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from tvlang.frontends.mergekit.slice_parameters import _position_parameters
from tvlang.frontends.mergekit.source import _NOT_YET, _Source

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config.json's layer count


def _slices_as_models(source: _Source, data: dict) -> tuple[dict, list[str]]:
    """``data`` with ``slices`` written as ``models`` (an entry with ``parts`` is a stack of
    layer ranges), and the header notes that say so; ``data`` itself when it has no ``slices``."""
    if "slices" not in data:
        return data, []
    if "models" in data:
        raise source.error("give models or slices, not both", ("slices",), key=True)
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise source.error("slices must be a list of '- sources: [...]' entries", ("slices",))
    rows = [_slice(source, entry, number, len(slices) > 1) for number, entry in enumerate(slices)]
    slice_settings = [_slice_settings(source, entry, number) for number, entry in enumerate(slices)]
    bases = [entry.get("base_model", data.get("base_model")) for entry in slices]
    width = len(rows[0])
    for number, row in enumerate(rows[1:], 1):
        if len(row) != width:
            raise source.error(f"slices[{number}] has {len(row)} sources and slices[0] {width}: tvlang merges "
                               "source p of every slice with source p of the others, so each slice needs as many",
                               ("slices", number, "sources"), notes=(f"tvlang import: layer surgery with a different "
                                                                    f"number of sources per slice is {_NOT_YET}",))
    spans, offset = [], 0
    for row in rows:
        count = row[0]["range"][1] - row[0]["range"][0]
        spans.append((offset, offset + count))
        offset += count
    parameters, global_parameters = _position_parameters(source, data, rows, slice_settings, spans, bases)
    models = []
    for position in range(width):
        column = [row[position] for row in rows]
        first = column[0]
        is_base = [base is not None and item["model"] == base for item, base in zip(column, bases)]
        if any(is_base) and not all(is_base):
            number = is_base.index(False)
            raise source.error(f"the base_model of slices[{number}] is not its sources[{position}], as it is in "
                               f"slices[{is_base.index(True)}]: tvlang merges each position's stack, so the base "
                               "must be at one position in every slice",
                               ("slices", number, "base_model") if "base_model" in slices[number] else ("base_model",))
        entry: dict[str, Any] = {"model": first["model"]}
        if parameters[position] is not None:
            entry["parameters"] = parameters[position]
        parts = [(item["model"], item["range"]) for item in column]
        if not _whole(source, parts):
            entry["parts"] = parts
            if all(is_base):
                entry["base"] = True  # each slice's own base_model, or the global one
        models.append(entry)
    source.aliases[("models",)] = ("slices", 0, "sources")
    data = {**data, "parameters": global_parameters} if global_parameters else data
    if data.get("base_model") is None and any(b is not None for b in bases):
        data = {**data, "base_model": next(b for b in bases if b is not None)}
    if len(rows) == 1 and not any("parts" in m for m in models):
        notes = ["slices: one slice that takes every layer of each model is the merge of the whole models, as "
                 "models: writes it (models[i] below is slices[0].sources[i])."]
    else:
        layers = sum(row[0]["range"][1] - row[0]["range"][0] for row in rows)
        notes = [f"slices: layer surgery -> models[p] below is source p of every slice, its layer ranges stacked "
                 f"in slice order (stack): {len(rows)} slice{'s' if len(rows) > 1 else ''}, {layers} layers; the "
                 "output's config.json says so. Embeddings come from the first slice, the final norm and head "
                 "from the last, as in mergekit."]
        settings = [data.get("parameters"), *slice_settings, *(item["parameters"] for row in rows for item in row)]
        if len(rows) > 1 and any(isinstance(v, (list, dict)) for s in settings if isinstance(s, dict)
                                 for v in s.values()):
            notes.append("A gradient or filter list restarts at each slice, as in mergekit (layer i of a slice "
                         "of n layers at t = i/(n - 1)): the recipe gives each layer of the stack its value with "
                         "where(...), the embeddings slice 0's first value and the final norm and head the last "
                         "slice's.")
    return {**{k: v for k, v in data.items() if k != "slices"}, "models": models}, notes


def _slice(source: _Source, entry: Any, number: int, several: bool) -> list[dict]:
    at = ("slices", number)
    if not isinstance(entry, dict) or "sources" not in entry:
        raise source.error("a slice needs 'sources:'", at)
    for key in entry:
        if key not in ("sources", "parameters", "base_model"):
            raise source.error(f"unknown key '{key}' in a slice", at + (key,), key=True,
                               notes=("a slice has sources, and may have parameters and a base_model",))
    sources = entry["sources"]
    if not isinstance(sources, list) or not sources:
        raise source.error("sources must be a list of '- model: PATH' entries with a layer_range", at + ("sources",))
    row = []
    for index, item in enumerate(sources):
        here = at + ("sources", index)
        if not isinstance(item, dict) or "model" not in item:
            raise source.error("a source needs 'model: PATH' and 'layer_range: [START, END]'", here)
        for key in item:
            if key not in ("model", "layer_range", "parameters"):
                raise source.error(f"unknown key '{key}' in a slice's source", here + (key,), key=True)
        span = item.get("layer_range")
        if (not isinstance(span, list) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span) or not 0 <= span[0] < span[1]):
            raise source.error("layer_range is [START, END], two whole numbers with 0 <= START < END",
                               here + ("layer_range",))
        _check_range(source, item["model"], span, here)
        row.append({"model": item["model"], "range": (span[0], span[1]), "parameters": item.get("parameters"),
                    "at": here})
    lengths = {r["range"][1] - r["range"][0] for r in row}
    if len(lengths) > 1:
        raise source.error(f"the sources of slices[{number}] take different numbers of layers "
                           f"({', '.join(str(r['range'][1] - r['range'][0]) for r in row)})", at + ("sources",),
                           notes=("mergekit refuses this too: a slice merges its sources layer by layer",))
    return row


def _slice_settings(source: _Source, entry: dict, number: int) -> dict:
    """A slice's own ``parameters`` (a mapping, or nothing)."""
    settings = entry.get("parameters")
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise source.error(f"slices[{number}].parameters must be a mapping of parameter names to values",
                           ("slices", number, "parameters"))
    return settings


def _check_range(source: _Source, path: Any, span: list, at: tuple) -> None:
    if not isinstance(path, str) or not os.path.exists(_full(source, path)):
        return  # not a local model: reading models says so
    layers = _layer_count(source, path)
    if layers is not None and span[1] > layers:
        raise source.error(f"layer_range {span} goes beyond the {layers} layers of '{path}'",
                           at + ("layer_range",), notes=(f"its layers are [0, {layers}]",))


def _whole(source: _Source, parts: list[tuple[Any, tuple[int, int]]]) -> bool:
    """Whether ``parts`` take every layer of one model, in order: that model itself."""
    path = parts[0][0]
    if any(p != path for p, _ in parts) or not isinstance(path, str):
        return False
    ends = [0] + [end for _, (_, end) in parts]
    if any(start != ends[i] for i, (_, (start, _)) in enumerate(parts)):
        return False
    if not os.path.exists(_full(source, path)):
        return False
    layers = _layer_count(source, path)
    if layers is None:
        raise source.error(f"cannot tell how many layers '{path}' has (its config.json gives no "
                           f"{' or '.join(_LAYER_KEYS)})", ("slices",))
    return ends[-1] == layers


def _full(source: _Source, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(source.directory, path)


def _layer_count(source: _Source, path: str) -> int | None:
    try:
        with open(os.path.join(_full(source, path), "config.json"), encoding="utf-8") as f:
            config: Any = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for key in _LAYER_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
