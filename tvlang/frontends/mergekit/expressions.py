"""Recipe expressions built from config values: numbers without float noise, calls,
weighted sums, task vectors."""

from __future__ import annotations

from typing import Any

from tvlang.frontends.mergekit.spec import _Input
from tvlang.language import ast
from tvlang.language.pertensor import PerTensor
from tvlang.language.printer import to_text


def _tidy(value: float) -> float:
    """A number computed from config values, without float noise in the recipe (0.30000000000000004 -> 0.3)."""
    return float(f"{value:.12g}")


def _num(value: float) -> ast.Expr:
    return ast.Neg(ast.Number(-value)) if value < 0 else ast.Number(float(value))


def _name(name: str) -> ast.Name:
    return ast.Name(name)


def _scaled(coef: float, expr: ast.Expr) -> ast.Expr:
    return expr if coef == 1 else ast.BinOp("*", _num(coef), expr)


def _sum(terms: list[tuple[float, ast.Expr]], start: ast.Expr | None = None) -> ast.Expr:
    """``start + c1*e1 - c2*e2 ...``, subtracting the terms with negative coefficients."""
    result = start
    for coef, expr in terms:
        if result is None:
            result = _scaled(coef, expr)
        elif coef < 0:
            result = ast.BinOp("-", result, _scaled(-coef, expr))
        else:
            result = ast.BinOp("+", result, _scaled(coef, expr))
    assert result is not None
    return result


def _call(func: str, args: list[ast.Expr], **options: Any) -> ast.Call:
    keywords = tuple(ast.Keyword(k.rstrip("_"), _literal(v)) for k, v in options.items() if v is not None)
    return ast.Call(func, tuple(args), keywords)


def _literal(value: Any) -> ast.Expr:
    if isinstance(value, ast.Node):
        return value
    if isinstance(value, bool):
        return ast.Bool(value)
    if isinstance(value, str):
        return ast.String(value)
    if isinstance(value, PerTensor):
        return value.to_ast()  # layers(...), where(...)
    if isinstance(value, (list, tuple)):
        return ast.ListExpr(tuple(_literal(v) for v in value))
    return _num(value)


def _delta(item: _Input, base: _Input) -> ast.Expr:
    return ast.BinOp("-", _name(item.name), _name(base.name))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return to_text(_literal(value))


def _brief(value: Any) -> str:
    """``_show``, but a per-tensor value too long to read in a comment is named, not written: the
    recipe's call below has it in full."""
    text = _show(value)
    return "per tensor (see the call below)" if isinstance(value, PerTensor) and len(text) > 72 else text
