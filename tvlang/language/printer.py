"""AST -> canonical recipe text. ``parse(to_text(tree)) == tree`` for every tree.

The canonical style:

- spaces around binary ``+`` and ``-``; none around ``*`` and ``/``
  (``pre + 0.4*(ft - pre)``), none after a unary minus (``-a``);
- only the parentheses that precedence needs;
- numbers in their shortest form (``3``, ``0.5``, ``0.001``, ``1e-20``);
- strings in double quotes with ``\\\\``, ``\\"``, ``\\n`` and ``\\t`` escaped;
- ``f(a, b, key=value)``, ``[1, 2.5]``, one statement per line.

>>> from tvlang.language.syntax import parse_expression
>>> to_text(parse_expression("pre+0.4 * ( ft-pre )"))
'pre + 0.4*(ft - pre)'
>>> to_text(parse_expression("-(a*b) - (c - d)"))
'-a*b - (c - d)'
>>> to_text(parse_expression("(-a)*b + 2*(-c)"))
'(-a)*b + 2*-c'
"""

from __future__ import annotations

import math

from tvlang.language import ast

__all__ = ["format_number", "format_signed", "to_text"]

# Precedence contexts, loosest first; see the grammar's rules of the same names.
_SUM = 0  # anything goes: top level, left of + and -, inside brackets
_TERM = 1  # right of + and -, operand of a unary minus at term level
_PRODUCT = 2  # left of * and /
_FACTOR = 3  # right of * and /


def format_number(value: float) -> str:
    """The shortest text that parses back to ``value`` (which must be >= 0 and finite).

    >>> [format_number(v) for v in (3.0, 0.5, 0.001, 1e-20, 1e16, 123456789.0)]
    ['3', '0.5', '0.001', '1e-20', '1e+16', '123456789']
    """
    if not math.isfinite(value):
        raise ValueError(f"a recipe cannot hold the number {value!r}")
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value))


def format_signed(value: float) -> str:
    """:func:`format_number` of any finite number: ``-`` before a negative one.

    >>> format_signed(-0.25), format_signed(2.0)
    ('-0.25', '2')
    """
    return "-" + format_number(-value) if value < 0 else format_number(value)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"}


def _format_string(value: str) -> str:
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


# A piece of printed text: a string, or a node with the context it is printed in.
_Piece = str | tuple[ast.Expr, int]


def _expr(node: ast.Expr, context: int) -> str:
    """The text of ``node`` printed where ``context`` allows, built on a work stack
    (text pieces and nodes still to print) and joined once: no recursion, and no
    re-copying of the text of a deep tree at every level."""
    out: list[str] = []
    work: list[_Piece] = [(node, context)]
    while work:
        item = work.pop()
        if isinstance(item, str):
            out.append(item)
        else:
            work.extend(reversed(_pieces(*item)))
    return "".join(out)


def _pieces(node: ast.Expr, context: int) -> list[_Piece]:
    """One node's text: strings, and (child, its context) for the printer to fill in."""
    if isinstance(node, ast.Number):
        if node.value < 0:  # never made by the parser; printed as the Neg it parses back to
            return [(ast.Neg(ast.Number(-node.value)), context)]
        return [format_number(node.value)]
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.String):
        return [_format_string(node.value)]
    if isinstance(node, ast.Bool):
        return ["true" if node.value else "false"]
    if isinstance(node, ast.ListExpr):
        return ["[", *_separated([[(item, _SUM)] for item in node.items]), "]"]
    if isinstance(node, ast.Call):
        parts: list[list[_Piece]] = [[(arg, _SUM)] for arg in node.args]
        parts += [[f"{kw.name}=", (kw.value, _SUM)] for kw in node.kwargs]
        return [f"{node.func}(", *_separated(parts), ")"]
    if isinstance(node, ast.Neg):
        if context == _PRODUCT:
            return ["(", (node, _SUM), ")"]
        inner = _FACTOR if context == _FACTOR else _TERM
        return ["-", (node.operand, inner)]
    if isinstance(node, ast.BinOp):
        if node.op in ("+", "-"):
            text = [(node.left, _SUM), f" {node.op} ", (node.right, _TERM)]
            return ["(", *text, ")"] if context > _SUM else text
        if node.op in ("*", "/"):
            text = [(node.left, _PRODUCT), node.op, (node.right, _FACTOR)]
            return ["(", *text, ")"] if context == _FACTOR else text
        raise ValueError(f"unknown operator {node.op!r}")
    raise TypeError(f"not an expression: {node!r}")


def _separated(parts: list[list[_Piece]]) -> list[_Piece]:
    """The pieces of every part, with ", " between parts."""
    pieces: list[_Piece] = []
    for index, part in enumerate(parts):
        if index:
            pieces.append(", ")
        pieces.extend(part)
    return pieces


def _keyword(node: ast.Keyword) -> str:
    return f"{node.name}={_expr(node.value, _SUM)}"


def to_text(node: ast.Node) -> str:
    """Canonical text of a Program (one statement per line), a statement, or an expression.

    >>> from tvlang.language.syntax import parse
    >>> print(to_text(parse("param lm=.40\\nout   merged = pre+lm*tau # note\\n")), end="")
    param lm = 0.4
    out merged = pre + lm*tau
    """
    if isinstance(node, ast.Program):
        return "".join(to_text(stmt) + "\n" for stmt in node.statements)
    if isinstance(node, ast.Assign):
        return f"{node.name} = {_expr(node.value, _SUM)}"
    if isinstance(node, ast.Param):
        return f"param {node.name} = {format_signed(node.value)}"
    if isinstance(node, ast.Out):
        head = "out" if node.name is None else f"out {node.name}"
        return f"{head} = {_expr(node.value, _SUM)}"
    if isinstance(node, ast.Keyword):
        return _keyword(node)
    return _expr(node, _SUM)
