"""mergekit's ``slices`` that are a plain merge: one slice whose sources each take every layer
of their model is the same merge as ``models:``, and is read as one.

mergekit's example ``gradient-slerp.yml`` is written that way. Layer surgery proper (several
slices, part of a model's layers, stacking) is not supported yet: an error at the slice.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tvlang.frontends.mergekit.source import _NOT_YET, _Source

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config.json's layer count
_SURGERY = "layer surgery (several slices, or part of a model's layers) is " + _NOT_YET


def _slices_as_models(source: _Source, data: dict) -> tuple[dict, list[str]]:
    """``data`` with a whole-range ``slices`` written as ``models``, and the header note that
    says so; ``data`` itself when it has no ``slices``."""
    if "slices" not in data:
        return data, []
    if "models" in data:
        raise source.error("give models or slices, not both", ("slices",), key=True)
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise source.error("slices must be a list of '- sources: [...]' entries", ("slices",))
    if len(slices) > 1:
        raise source.error(f"slices: {_SURGERY}", ("slices", 1), notes=("tvlang merges whole models",))
    entry = slices[0]
    if not isinstance(entry, dict) or "sources" not in entry:
        raise source.error("a slice needs 'sources:'", ("slices", 0))
    for key in entry:
        if key != "sources":
            raise source.error(f"a slice's '{key}' is {_NOT_YET}", ("slices", 0, key), key=True,
                               notes=("give parameters under each source, or under the global parameters",))
    sources = entry["sources"]
    if not isinstance(sources, list) or not sources:
        raise source.error("sources must be a list of '- model: PATH' entries with a layer_range",
                           ("slices", 0, "sources"))
    models = []
    for index, item in enumerate(sources):
        at = ("slices", 0, "sources", index)
        if not isinstance(item, dict) or "model" not in item:
            raise source.error("a source needs 'model: PATH' and 'layer_range: [START, END]'", at)
        for key in item:
            if key not in ("model", "layer_range", "parameters"):
                raise source.error(f"unknown key '{key}' in a slice's source", at + (key,), key=True)
        _whole_range(source, item, at)
        models.append({k: v for k, v in item.items() if k != "layer_range"})
    source.aliases[("models",)] = ("slices", 0, "sources")
    note = ("slices: one slice that takes every layer of each model is the merge of the whole models, as "
            "models: writes it (models[i] below is slices[0].sources[i]).")
    return {**{k: v for k, v in data.items() if k != "slices"}, "models": models}, [note]


def _whole_range(source: _Source, item: dict, at: tuple) -> None:
    """The source's layer_range covers its model's layers, read from its config.json."""
    span = item.get("layer_range")
    if (not isinstance(span, list) or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
        raise source.error("layer_range is [START, END], two whole numbers", at + ("layer_range",))
    path = item["model"]
    if not isinstance(path, str) or not os.path.exists(_full(source, path)):
        return  # not a local model: reading models says so
    layers = _layer_count(source, path)
    if layers is None:
        raise source.error(f"cannot tell how many layers '{path}' has (its config.json gives no "
                           f"{' or '.join(_LAYER_KEYS)})", at + ("model",))
    if span != [0, layers]:
        raise source.error(f"layer_range {span} is part of the {layers} layers of '{path}': {_SURGERY}",
                           at + ("layer_range",), notes=(f"layer_range: [0, {layers}] merges the whole model",))


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
