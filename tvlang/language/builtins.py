"""The built-in function table: data, one row per built-in.

A new built-in is a new row (and, for tensor built-ins, a kernel in
``tvlang/ops``), never a new code path in the checker or the planner.

Kinds used in the table: ``"model"``, ``"delta"``, ``"vector"`` (model or
delta), ``"scalar"``, ``"string"``, ``"bool"``, ``"list"`` (a list of numbers).

Result rules: ``"model"``, ``"delta"``, ``"scalar"``, or ``"same"`` (the kind
shared by the vector arguments, which must agree).

Stages: ``"source"`` (reads a checkpoint: ``load``), ``"tensor"`` (a per-tensor
kernel in ``tvlang.ops``), ``"reduce"`` (a whole-model scalar computed in an
earlier streaming pass).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REQUIRED", "Arg", "Builtin", "BUILTINS", "register"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Arg:
    """One parameter of a built-in."""

    name: str
    kind: str  # see the module docstring
    default: object = REQUIRED
    choices: tuple[str, ...] | None = None  # allowed values of a string option
    doc: str = ""


@dataclass(frozen=True)
class Builtin:
    """One built-in function.

    ``params`` are positional-or-keyword, in order. ``variadic`` (if any) takes
    the remaining positional arguments, at least ``min_variadic`` of them; the
    ``options`` of a variadic built-in are keyword-only (``ties(a, b, density=0.2)``).
    """

    name: str
    params: tuple[Arg, ...] = ()
    variadic: Arg | None = None
    min_variadic: int = 0
    options: tuple[Arg, ...] = ()
    result: str = "same"
    stage: str = "tensor"
    summary: str = ""
    reference: str = ""  # which paper / library the semantics match


BUILTINS: dict[str, Builtin] = {}


def register(*rows: Builtin) -> None:
    for row in rows:
        if row.name in BUILTINS:
            raise ValueError(f"built-in {row.name!r} registered twice")
        BUILTINS[row.name] = row
