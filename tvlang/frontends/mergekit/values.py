"""A mergekit parameter's value as mergekit 0.1.5 validates it: a number or a boolean, a
gradient (``layers(...)``) or a filter list (``where(...)``), placed at the config's line
when it is wrong; and the filter lists that end without a value for some tensors (``_open``),
which mergekit completes from the next place it looks (``_close``)."""

from __future__ import annotations

import re
from typing import Any

from tvlang.frontends.mergekit.source import _NOT_YET, _Path, _Source
from tvlang.frontends.mergekit.spec import _Param
from tvlang.language.pertensor import Layers, PerTensor, Where

_TRUE = ("true", "yes", "on", "1", "t", "y")
_FALSE = ("false", "no", "off", "0", "f", "n")


def _value(source: _Source, param: _Param, value: Any, at: _Path) -> Any:
    """A parameter's value as mergekit validates it. A gradient or a filter list becomes
    ``layers(...)``/``where(...)`` where the method's translation takes one (``varies``), else
    an error; a filter list without a last unfiltered entry ends in ``None`` (``_open``)."""
    if isinstance(value, PerTensor):  # built for slices (frontends.mergekit.slice_parameters)
        return value
    if param.varies and param.kind == "number":
        if isinstance(value, dict) and "value" in value and set(value) <= {"value", "filter"}:
            value = [value]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return _filters(source, param, value, at)
        if isinstance(value, list) and value and not any(isinstance(v, (dict, list)) for v in value):
            numbers = tuple(_value(source, param, v, at + (i,)) for i, v in enumerate(value))
            return numbers[0] if len(numbers) == 1 else Layers(numbers)
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "filter"}:
        if value.get("filter") not in (None, "*"):
            raise source.error(f"{param.name}: parameters filtered by tensor name are {_NOT_YET}", at + ("filter",))
        return _value(source, param, value["value"], at + ("value",))
    if isinstance(value, list):
        raise source.error(f"{param.name}: per-layer values (a gradient) and filter lists are {_NOT_YET}", at,
                           notes=("give one value for every layer",))
    if value is None or isinstance(value, dict):
        raise source.error(f"{param.name} needs a {'true or false' if param.kind == 'bool' else 'number'}", at)
    if param.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise source.error(f"{param.name} must be true or false, got {value!r}", at)
    if isinstance(value, bool):
        raise source.error(f"{param.name} must be a number, got {str(value).lower()}", at)
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string; mergekit takes it as a number
        try:
            value = float(value)
        except ValueError:
            raise source.error(f"{param.name} must be a number, got '{value}'", at) from None
    if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise source.error(f"{param.name} must be a finite number, got {value!r}", at)
    if param.kind == "int" and not float(value).is_integer():
        raise source.error(f"{param.name} must be a whole number, got {value!r}", at)
    return float(value)


def _filters(source: _Source, param: _Param, entries: list, at: _Path) -> Any:
    """mergekit's filter list: the first entry whose filter is a substring of the tensor name
    (no filter, or ``*``: every tensor) gives the value, a gradient or a number."""
    entry = entries[0]
    here = at + (0,)
    if not isinstance(entry, dict) or "value" not in entry or not set(entry) <= {"value", "filter"}:
        raise source.error(f"{param.name}: a filter entry is a mapping 'filter: TEXT, value: ...'", here)
    value = _value(source, param, entry["value"], here + ("value",))
    if isinstance(value, Where):
        raise source.error(f"{param.name}: a filter's value is a number or a list over layers", here + ("value",))
    pattern = entry.get("filter")
    if pattern in (None, "*"):
        return value  # later entries are never reached
    if not isinstance(pattern, str) or not pattern or "|" in pattern:
        raise source.error(f"{param.name}: a filter is the text a tensor name contains (without '|')",
                           here + ("filter",))
    glob = "*" + re.sub(r"([*?\[])", r"[\1]", pattern) + "*"  # mergekit: 'filter in tensor_name'
    rest = _filters(source, param, entries[1:], at) if len(entries) > 1 else None
    return Where(glob, value, rest)


def _open(value: Any) -> bool:
    """Whether a filter chain ends without a value for the tensors it does not match."""
    while isinstance(value, Where):
        if value.otherwise is None:
            return True
        value = value.otherwise
    return False


def _close(value: Any, rest: Any) -> Any:
    if value is None:
        return rest
    if isinstance(value, Where):
        return Where(value.pattern, value.then, _close(value.otherwise, rest))
    return value
