"""The value of a constant scalar expression: numbers, params and arithmetic on them.

The one evaluator for every stage that needs a number before any tensor is read: the
checker (a coefficient, for the affine rule), the IR builder (a built-in's option value)
and the tests' naive evaluator. A whole-model reduction (``norm``, ``dot``, ``cos``) is
known only while the recipe runs: unless the caller supplies its value, an expression
that calls one has no constant value (``None``).

>>> from tvlang.language.syntax import parse_expression
>>> value(parse_expression("2*lam - 1/4"), {"lam": 0.5})
0.75
>>> value(parse_expression("0.5*norm(tau)"), {}) is None
True
>>> value(parse_expression("lam/(1 - 1)"), {"lam": 0.5})
Traceback (most recent call last):
  ...
tvlang.errors.TvlangError: <input>:1:5: error: division by zero
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Mapping

from tvlang.errors import TvlangError
from tvlang.language import ast
from tvlang.language.trampoline import Frame, trampoline

__all__ = ["ARITHMETIC", "fold", "value"]

# What each operator of the language does to two numbers (and only that: the checks are in fold).
ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}


def fold(node: ast.Neg | ast.BinOp, *operands: float | None) -> float | None:
    """The value of ``node`` from the values of its operands; ``None`` (known only at run
    time) when an operand's is.

    A division by a constant zero is an error even when the numerator is known only at
    run time, and so is a result out of the float range.

    >>> from tvlang.language.syntax import parse_expression
    >>> fold(parse_expression("a * b"), 0.5, 3.0), fold(parse_expression("-a"), None)
    (1.5, None)
    """
    if isinstance(node, ast.Neg):
        (operand,) = operands
        return None if operand is None else -operand
    left, right = operands
    if node.op == "/" and right == 0:
        raise TvlangError("division by zero", node.right.span)
    if left is None or right is None:
        return None
    result = ARITHMETIC[node.op](left, right)
    if not math.isfinite(result):
        raise TvlangError("number out of range", node.span)
    return result


def value(
    expr: ast.Expr,
    params: Mapping[str, float],
    env: Mapping[str, ast.Expr] | None = None,
    *,
    reduced: Callable[[ast.Call], float | None] | None = None,
) -> float | None:
    """The value of the scalar expression ``expr``; ``None`` when it is known only at run time.

    A name is a number in ``params`` or a name that ``env`` defines by an expression (a
    checked program's ``params`` and ``env``). ``reduced(call)`` gives the value of a
    whole-model reduction when the caller has computed it (the REPL does).
    """
    env = env or {}
    names: dict[str, float | None] = {}

    def of(node: ast.Expr) -> Frame:  # a frame: sub-values are yielded (see trampoline)
        if isinstance(node, ast.Number):
            return node.value
        if isinstance(node, ast.Name):
            name = node.id
            if name in params:
                return params[name]
            if name not in names:
                if name not in env:
                    raise TvlangError(f"'{name}' is not a number", node.span)
                names[name] = yield of(env[name])
            return names[name]
        if isinstance(node, ast.Neg):
            return fold(node, (yield of(node.operand)))
        if isinstance(node, ast.BinOp):
            left = yield of(node.left)
            return fold(node, left, (yield of(node.right)))
        if isinstance(node, ast.Call):
            return reduced(node) if reduced is not None else None
        raise TvlangError("a string, true/false or a list is not a number", node.span)

    return trampoline(of(expr))
