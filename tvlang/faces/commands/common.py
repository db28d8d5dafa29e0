"""Pieces several subcommands share: reading a recipe, bindings, sizes."""

from __future__ import annotations

import argparse
import re

from tvlang.errors import TvlangError

DELTA_PREFIX = "delta:"


def read_recipe(path: str) -> str:
    """A recipe file's text, or a TvlangError that names the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise TvlangError(f"cannot read recipe {path}: no such file") from None
    except IsADirectoryError:
        raise TvlangError(f"cannot read recipe {path}: it is a directory") from None
    except UnicodeDecodeError as exc:
        raise TvlangError(f"cannot read recipe {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TvlangError(f"cannot read recipe {path}: {exc.strerror or exc}") from None


def recipe_source(args: argparse.Namespace) -> tuple[str, str]:
    """(text, filename) from ``RECIPE`` or ``-e EXPR``; a usage error when neither or both."""
    from tvlang.faces.cli import UsageError

    if args.recipe is None and args.expr is None:
        raise UsageError("give a RECIPE file or -e EXPR")
    if args.recipe is not None and args.expr is not None:
        raise UsageError("give a RECIPE file or -e EXPR, not both")
    if args.expr is not None:
        return args.expr, "<expr>"
    return read_recipe(args.recipe), args.recipe


def add_recipe_arguments(parser: argparse.ArgumentParser, bind_help: str) -> None:
    parser.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe file (.tv)")
    parser.add_argument("-e", "--expr", metavar="EXPR", help="an expression instead of a recipe file")
    parser.add_argument("--bind", action="append", default=[], metavar="NAME=PATH", help=bind_help)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a param (repeatable)")


def split_binding(value: str) -> tuple[str, str]:
    """(kind, path) of a ``--bind`` value: ``delta:PATH`` marks a task vector."""
    if value.startswith(DELTA_PREFIX):
        return "delta", value[len(DELTA_PREFIX):]
    return "model", value


def bindings_from_args(items: list[str]) -> tuple[dict[str, str], dict[str, object]]:
    """(kinds, bindings) from ``--bind NAME=[delta:]PATH`` values.

    A Delta file that tvlang wrote binds as a task vector without ``delta:``.
    """
    from tvlang.faces.commands.check import parse_bindings
    from tvlang.plan.compiler import delta
    from tvlang.io import peek_kind

    kinds: dict[str, str] = {}
    bindings: dict[str, object] = {}
    for name, value in parse_bindings(items).items():
        kind, path = split_binding(value)
        if kind == "model":
            kind = peek_kind(path)
        kinds[name] = kind
        bindings[name] = delta(path) if kind == "delta" else path
    return kinds, bindings


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``5GB``, ``500MiB``, ``1000000`` -> bytes.

    >>> parse_size("5GB"), parse_size("2MiB"), parse_size("123")
    (5000000000, 2097152, 123)
    """
    from tvlang.faces.cli import UsageError

    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"--shard-size expects a size such as 5GB or 500MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])
