"""Built-in calls bound to their rows, and the small vocabulary the checker speaks in.

``bind_call`` normalizes a call against its row (``BoundCall``: every named argument,
defaults filled in); the helpers below describe kinds, weights and arities in the
checker's messages. Split out of ``checker`` so that each module reads in one sitting.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from tvlang.errors import TvlangError
from tvlang.language import ast
from tvlang.language.builtins import BUILTINS, REQUIRED, Builtin

__all__ = ["BoundCall", "bind_call", "load_builtins"]

#: How far from 1 (a Model) or 0 (a Delta) a weight may be.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class BoundCall:
    """A call normalized against its row: every named argument, defaults filled in.

    An optional argument whose default is ``None`` and that the call does not
    give is absent from ``args``.
    """

    builtin: Builtin
    args: dict[str, ast.Expr]
    varargs: tuple[ast.Expr, ...] = ()


# -- the built-in table ------------------------------------------------------------

def load_builtins() -> dict[str, Builtin]:
    """``BUILTINS``, which is complete on import (kept for the callers that still ask)."""
    return BUILTINS


# -- types used while checking -------------------------------------------------------

@dataclass(frozen=True)
class _Scalar:
    value: float | None  # None: computed at run time (norm(), dot(), cos())


@dataclass(frozen=True)
class _Vector:
    weight: float  # sum of the model coefficients: 1 for a Model, 0 for a Delta
    # log10 of the largest and the smallest constant factor any of its terms is scaled
    # by (products along each path of c*x and x/c; a sum takes the extremes of both
    # sides): the optimizer multiplies these factors out, so one beyond a double's range
    # would turn into inf or 0 there. -inf/inf: no term with a nonzero factor (0*x).
    log_max: float = 0.0
    log_min: float = 0.0
    # how many layers it has, where the recipe says (load(..., layers=[START, END]), a stack
    # of such parts, and what merges them); None: known only once the files are opened
    layers: int | None = None


@dataclass(frozen=True)
class _Other:
    kind: str  # "string", "bool", "list"


class _Unknown:
    """The type of an expression that already has an error: it causes no more errors."""


_UNKNOWN = _Unknown()
_OTHER_WORDS = {"string": "a string", "bool": "true/false", "list": "a list"}


def _vector_kind(weight: float) -> str | None:
    if abs(weight - 1.0) <= TOLERANCE:
        return "model"
    if abs(weight) <= TOLERANCE:
        return "delta"
    return None


def _format_weight(weight: float) -> str:
    return format(weight, ".10g")


def _describe(t) -> str:
    if isinstance(t, _Scalar):
        return "a number" if t.value is not None else "a number computed from weights"
    if isinstance(t, _Vector):
        kind = _vector_kind(t.weight)
        if kind == "model":
            return "a model"
        if kind == "delta":
            return "a task vector"
        return f"a weighted sum of models (coefficients sum to {_format_weight(t.weight)})"
    if isinstance(t, _Other):
        return _OTHER_WORDS[t.kind]
    return "an invalid value"


def _kind_word(kind: str) -> str:
    return {"model": "a model", "delta": "a task vector"}[kind]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _suggest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _literal(value: object) -> ast.Expr | None:
    """A built-in default as an AST literal."""
    if value is None:
        return None
    if isinstance(value, bool):
        return ast.Bool(value)
    if isinstance(value, (int, float)):
        number = ast.Number(abs(float(value)))
        return ast.Neg(number) if value < 0 else number
    if isinstance(value, str):
        return ast.String(value)
    if isinstance(value, (list, tuple)):
        return ast.ListExpr(tuple(_literal(v) for v in value))
    raise TypeError(f"a built-in default must be a number, string, bool or list, got {value!r}")


def _arity(row: Builtin, positional: int) -> str:
    if row.variadic is not None:
        return f"{row.name}() takes at least {_plural(len(row.params) + row.min_variadic, 'argument')}"
    required = sum(1 for a in row.params + row.options if a.default is REQUIRED)
    most = len(row.params) + len(row.options)
    if required == most:
        return f"{row.name}() takes {_plural(most, 'argument')}, got {positional}"
    return f"{row.name}() takes {required} to {most} arguments, got {positional}"


def _bind(call: ast.Call, row: Builtin, report) -> BoundCall:
    """Match a call's arguments to the row's parameters; ``report(message, node, notes)`` for problems."""
    named = list(row.params) + list(row.options)
    positional_slots = list(row.params) if row.variadic is not None else named
    args: dict[str, ast.Expr] = {}
    varargs: list[ast.Expr] = []
    for index, value in enumerate(call.args):
        if index < len(positional_slots):
            args[positional_slots[index].name] = value
        elif row.variadic is not None:
            varargs.append(value)
        else:
            report(_arity(row, len(call.args)), value, ())
            break
    by_name = {a.name: a for a in named}
    seen: set[str] = set()
    for keyword in call.kwargs:
        if keyword.name in seen:
            report(f"duplicate keyword argument '{keyword.name}' in {row.name}()", keyword, ())
            continue
        seen.add(keyword.name)
        if keyword.name in by_name:
            if keyword.name in args:
                report(f"{row.name}() got argument '{keyword.name}' twice (by position and by name)", keyword, ())
            else:
                args[keyword.name] = keyword.value
        elif row.variadic is not None and keyword.name == row.variadic.name:
            report(f"the {row.variadic.name} of {row.name}() are passed by position, not by name", keyword, ())
        elif not named:
            report(f"{row.name}() takes no keyword arguments", keyword, ())
        else:
            known = ", ".join(a.name for a in named)
            report(
                f"{row.name}() has no argument '{keyword.name}'{_suggest(keyword.name, by_name)}",
                keyword,
                (f"note: its named arguments are: {known}",),
            )
    for arg in named:
        if arg.name in args:
            continue
        if arg.default is REQUIRED:
            report(f"{row.name}() is missing argument '{arg.name}'", call, ())
        else:
            default = _literal(arg.default)
            if default is not None:
                args[arg.name] = default
    if row.variadic is not None and len(varargs) < row.min_variadic:
        got = len(call.args)
        report(f"{_arity(row, got)}, got {got}", call, ())
    return BoundCall(row, args, tuple(varargs))


def bind_call(call: ast.Call) -> BoundCall:
    """Normalize a call against its built-in row (defaults are AST literals).

    >>> from tvlang.language.syntax import parse_expression
    >>> bound = bind_call(parse_expression("mean(a, b)"))
    >>> bound.builtin.name, bound.args, bound.varargs
    ('mean', {'weights': ListExpr(items=())}, (Name(id='a'), Name(id='b')))
    """
    row = BUILTINS.get(call.func)
    if row is None:
        raise TvlangError(f"unknown function '{call.func}'{_suggest(call.func, BUILTINS)}", call.span)
    problems: list[TvlangError] = []
    bound = _bind(call, row, lambda msg, node, notes: problems.append(TvlangError(msg, node.span, notes=notes)))
    if problems:
        raise problems[0] if len(problems) == 1 else TvlangError(problems[0].message, errors=problems)
    return bound
