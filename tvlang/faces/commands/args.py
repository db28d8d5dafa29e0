"""Command-line values: every ``NAME=VALUE``, size and kind parser, and ``UsageError``.

A malformed value is a :class:`UsageError`: ``tvlang.faces.cli`` prints it after the
command's name and exits 2. Nothing here imports torch at import time; the parsers that
read a checkpoint's header to learn its kind import the run layer when called.

>>> parse_bindings(["pre=base/", "ft=delta:tau.safetensors"])
{'pre': 'base/', 'ft': 'delta:tau.safetensors'}
>>> parse_params(["lam=0.5"])
{'lam': 0.5}
>>> parse_params(["lam=lots"])
Traceback (most recent call last):
  ...
tvlang.faces.commands.args.UsageError: --set lam: 'lots' is not a number
"""

from __future__ import annotations

import math
import re
import unicodedata

from tvlang.plan.compiler import delta

#: ``--bind NAME=delta:PATH`` binds PATH as a task vector.
DELTA_PREFIX = "delta:"

#: ``--bind NAME=lora:DIR`` binds a PEFT LoRA adapter directory as a task vector.
LORA_PREFIX = "lora:"
HUB_PREFIX = "hf:"  # tvlang.io.hub.PREFIX (tests/test_direct.py holds them equal)

#: What ``--bind NAME=KIND`` may say instead of a path (``check`` and ``explain``).
KINDS = ("model", "delta")

#: The names ``--dtype`` and ``--out-dtype`` take (the run layer's table, without importing torch here).
DTYPE_NAMES = ("float32", "fp32", "f32", "float16", "fp16", "f16", "half", "bfloat16", "bf16",
               "float64", "fp64", "f64")


class UsageError(Exception):
    """A command-line mistake: printed with the command's name, exit 2."""


def _named(items: list[str], option: str, expects: str) -> dict[str, str]:
    """``NAME=VALUE`` items in order; a usage error when one is malformed or a NAME repeats."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = unicodedata.normalize("NFKC", name.strip())  # as the recipe's names are
        if not sep:
            raise UsageError(f"{option} expects {expects}, got {item!r} with no '=' "
                             f"(write {option} {item.strip() or 'NAME'}=...)")
        if not name.isidentifier() or not value:
            raise UsageError(f"{option} expects {expects}, got {item!r}")
        if name in pairs:
            raise UsageError(f"{option} {name} is given twice")
        pairs[name] = value
    return pairs


def parse_bindings(items: list[str]) -> dict[str, str]:
    """``--bind NAME=VALUE`` items: a path, ``delta:PATH``, ``lora:DIR``, or (check, explain) a kind."""
    return _named(items, "--bind", "NAME=PATH (or NAME=model, NAME=delta)")


def parse_params(items: list[str]) -> dict[str, float]:
    """``--set NAME=NUMBER`` items as finite floats."""
    params: dict[str, float] = {}
    for name, text in _named(items, "--set", "NAME=NUMBER").items():
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"--set {name}: {text!r} is not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"--set {name}: {text!r} is not a finite number")
        params[name] = value
    return params


def parse_outputs(items: list[str]) -> str | dict[str, str]:
    """``-o PATH`` for a recipe with one output, ``-o NAME=PATH`` for each of several.

    >>> parse_outputs(["merged/"]), parse_outputs(["a=x/", "b=y/"])
    ('merged/', {'a': 'x/', 'b': 'y/'})
    """
    if not items:
        raise UsageError("give an output path with -o PATH")
    if len(items) == 1 and ("=" not in items[0] or not items[0].split("=", 1)[0].isidentifier()):
        return items[0]
    return _named(items, "-o", "NAME=PATH with several outputs")


def split_binding(value: str) -> tuple[str, str]:
    """(kind, path) of a ``--bind`` value: ``delta:PATH`` marks a task vector.

    >>> split_binding("delta:tau.safetensors"), split_binding("base/")
    (('delta', 'tau.safetensors'), ('model', 'base/'))
    """
    if value.startswith(DELTA_PREFIX):
        return "delta", value[len(DELTA_PREFIX):]
    return "model", value


def binding_kind(value: str) -> str:
    """The kind a ``--bind`` value gives: ``model``/``delta`` literally, else that of the path."""
    return value if value in KINDS else path_kind(value)


def path_kind(value: str) -> str:
    """The kind of a ``--bind [delta:]PATH``: ``delta:`` marks a task vector, else the file's
    metadata says (the run layer decides, for the CLI and the API alike)."""
    kind, path = split_binding(value)
    if kind == "delta":
        return kind
    if not path.startswith((LORA_PREFIX, HUB_PREFIX)):  # a local path: tvlang.run.bindings.binding_kind's
        from tvlang.io.open import peek_kind  # rule for one, without importing torch for a safetensors file

        return peek_kind(path)
    from tvlang.run.bindings import binding_kind as kind_of  # an adapter or a Hub reference; imports torch

    return kind_of(path)


def binding_value(value: str, kind: str) -> object:
    """What ``--bind NAME=[delta:]PATH`` binds once its kind is known: the path, marked
    with ``delta()`` when it is a task vector."""
    if value.startswith(LORA_PREFIX):  # an adapter: the run layer reads "lora:DIR" (docs/adapters.md)
        return value
    path = split_binding(value)[1]
    return delta(path) if kind == "delta" else path


def bindings_from_args(items: list[str]) -> tuple[dict[str, str], dict[str, object]]:
    """(kinds, bindings) from ``--bind NAME=[delta:]PATH`` values (``run``: paths only).

    A Delta file that tvlang wrote binds as a task vector without ``delta:``.
    """
    values = parse_bindings(items)
    kinds = {name: path_kind(value) for name, value in values.items()}
    return kinds, {name: binding_value(value, kinds[name]) for name, value in values.items()}


def parse_inputs(items: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``NAME=PATH`` pairs of ``similarity`` and ``bases``, and the names given as
    ``NAME=delta:PATH`` (task vector files without tvlang metadata).

    >>> parse_inputs(["a=ft/a", "b=delta:tv/b.safetensors"])
    ([('a', 'ft/a'), ('b', 'tv/b.safetensors')], ['b'])
    """
    pairs: list[tuple[str, str]] = []
    deltas: list[str] = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        kind, path = split_binding(value)
        if not sep or not name or not path:
            raise UsageError(f"expected NAME=PATH (or NAME=delta:PATH), got {item!r}")
        if any(name == seen for seen, _ in pairs):
            raise UsageError(f"task vector name '{name}' is given twice")
        if kind == "delta":
            deltas.append(name)
        pairs.append((name, path))
    return pairs, deltas


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str, option: str = "--shard-size") -> int:
    """``5GB``, ``500MiB``, ``1000000`` -> bytes.

    >>> parse_size("5GB"), parse_size("2MiB"), parse_size("123")
    (5000000000, 2097152, 123)
    """
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"{option} expects a size such as 5GB or 500MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def chunk_bytes(megabytes: float) -> int:
    """``--chunk-mb`` in bytes; it must be positive."""
    if not megabytes > 0:
        raise UsageError(f"--chunk-mb must be positive, not {megabytes}")
    return int(megabytes * 2**20)


def parse_k(text: str) -> int | str:
    """``--k``: a positive number of bases, or ``auto`` (the largest eigengap)."""
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise UsageError(f"--k expects a positive integer or 'auto', got {text!r}")
    return k


def check_dtype(option: str, value: str | None) -> None:
    """A usage error for a ``--dtype``/``--out-dtype`` name the run layer does not know."""
    if value is not None and value.lower() not in DTYPE_NAMES:
        raise UsageError(f"{option}: unknown dtype {value!r}; choose float32, float16, bfloat16 or float64")
