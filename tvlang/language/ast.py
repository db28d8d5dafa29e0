"""The recipe AST: frozen dataclasses that carry source spans.

Spans never take part in equality, so ``parse(print(tree)) == tree`` compares
structure only. Parentheses leave no node: the printer puts back the ones that
precedence needs.

>>> from tvlang.language.ast import BinOp, Name, Number
>>> BinOp("+", Name("a"), Number(1.0)) == BinOp("+", Name("a"), Number(1.0))
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from tvlang.errors import Span

__all__ = [
    "Node", "Expr", "Stmt", "Number", "Name", "String", "Bool", "ListExpr", "Neg",
    "BinOp", "Keyword", "Call", "Assign", "Param", "Out", "Program", "walk",
]


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False, kw_only=True)  # type: ignore[return-value]


@dataclass(frozen=True)
class Node:
    span: Span | None = _span()


# -- expressions ---------------------------------------------------------------

@dataclass(frozen=True)
class Number(Node):
    """A numeric literal; always held as a float (``3`` is ``3.0``)."""
    value: float


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class String(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class ListExpr(Node):
    """``[e1, e2, ...]``: only used as a built-in argument (per-layer schedules)."""
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class Neg(Node):
    operand: "Expr"


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # one of + - * /
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class Keyword(Node):
    name: str
    value: "Expr"


@dataclass(frozen=True)
class Call(Node):
    func: str
    args: tuple["Expr", ...] = ()
    kwargs: tuple[Keyword, ...] = ()


Expr = Union[Number, Name, String, Bool, ListExpr, Neg, BinOp, Call]


# -- statements ----------------------------------------------------------------

@dataclass(frozen=True)
class Assign(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class Param(Node):
    name: str
    value: float


@dataclass(frozen=True)
class Out(Node):
    """``out name = expr``; a bare ``out = expr`` has ``name`` None."""
    name: str | None
    value: Expr


Stmt = Union[Assign, Param, Out]


@dataclass(frozen=True)
class Program(Node):
    statements: tuple[Stmt, ...]


def walk(node: Node):
    """Yield ``node`` and every node below it, iteratively (no recursion limit)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        children: list[Node] = []
        if isinstance(current, Program):
            children = list(current.statements)
        elif isinstance(current, (Assign, Out)):
            children = [current.value]
        elif isinstance(current, Neg):
            children = [current.operand]
        elif isinstance(current, BinOp):
            children = [current.left, current.right]
        elif isinstance(current, Call):
            children = [*current.args, *current.kwargs]
        elif isinstance(current, Keyword):
            children = [current.value]
        elif isinstance(current, ListExpr):
            children = list(current.items)
        stack.extend(reversed(children))
