"""The recipe's text: header comments, one ``load`` per model with where its values came
from, the notes, and the output expression laid out within the line width."""

from __future__ import annotations

import os
import textwrap
from typing import TYPE_CHECKING

from tvlang.frontends.mergekit.expressions import _brief, _call, _num
from tvlang.frontends.mergekit.spec import MERGEKIT_VERSION, _Input
from tvlang.language import ast
from tvlang.language.printer import to_text

if TYPE_CHECKING:
    from tvlang.frontends.mergekit.config import _Merge

_WIDTH = 96  # recipe lines longer than this are broken at a call's arguments


def _write(merge: _Merge) -> str:
    out = merge.method.translate(merge)
    source = merge.source
    lines: list[str] = []
    title = os.path.basename(source.filename) if source.filename else "A mergekit config"
    lines.append(f"# {title} as a tvlang recipe (tvlang import, mergekit {MERGEKIT_VERSION} semantics).")
    lines += _comment(f"merge_method: {merge.method.name} -- {merge.method.title}")
    where = f"keep the recipe next to {title}" if source.filename else "keep the recipe in that directory"
    lines += _comment("load() paths are relative to this file, as mergekit's are to the directory it runs in: "
                      + where + ".")
    for note in merge.header:
        lines += _comment(note)
    lines.append("")

    reads = sorted(merge.inputs, key=lambda i: (i is not merge.base, merge.inputs.index(i)))
    # a model read only as plain numbers (linear's normalize: false) is not loaded as a model:
    # its raw read carries its description
    used = {n.id for e in [out.expr, *(value for _, value, _ in out.extra)] for n in ast.walk(e)
            if isinstance(n, ast.Name)}
    raw = {name for name, _, _ in out.extra}
    unused = {i.name: i for i in reads if i.name not in used and f"{i.name}_raw" in raw}
    reads = [i for i in reads if i.name not in unused]
    statements = [(f"{i.name} = {to_text(_read(i))}", _describe(merge, i)) for i in reads]
    statements += [(f"{name} = {to_text(value)}",
                    f"{_describe(merge, unused[name[:-4]])}: read as plain numbers" if name[:-4] in unused
                    and name.endswith("_raw") else comment) for name, value, comment in out.extra]
    width = max((len(s) for s, _ in statements if len(s) <= _WIDTH), default=0)
    for statement, comment in statements:
        if len(statement) > _WIDTH or len(f"# {comment}") > _WIDTH:  # a long stack or comment: the comment above
            lines += _comment(comment) if comment else []
            name, _, value = statement.partition(" = ")
            item = next((i for i in reads if i.name == name), None)
            lines.append(_layout(f"{name} = ", _read(item)) if item is not None and len(statement) > _WIDTH
                         else statement)
        else:
            lines.append(f"{statement:<{width}}  # {comment}" if comment else statement)
    lines.append("")
    for note in out.notes:
        if note:
            lines += _comment(note)
    lines.append(_layout("out = ", out.expr))
    return "\n".join(lines) + "\n"


def _read(item: _Input) -> ast.Call:
    """``load("path")``, or for slices the stack of the input's layer ranges."""
    if item.parts is None:
        return _call("load", [ast.String(item.path)])
    return _call("stack", [_call("load", [ast.String(path)], layers=ast.ListExpr((_num(start), _num(end))))
                           for path, (start, end) in item.parts])


def _describe(merge: _Merge, item: _Input) -> str:
    label = "base_model" if item is merge.base and item.index is None else item.label
    if item is merge.base and item.index is not None:
        label += " (base_model)"
    by_origin: dict[str, list[str]] = {}
    for name, value in item.values.items():
        if name == "scale" and value is None:
            continue
        origin = item.origins[name]
        if item.parts is not None and len(item.parts) > 1:  # several slices: read per slice, then folded
            origin = origin.replace(f"{item.label}.parameters", "per slice: the source's, the slice's or the "
                                    "global parameters", 1)
        by_origin.setdefault(origin, []).append(f"{name} {_brief(value)}")
    parts = [f"{', '.join(values)} ({origin})" for origin, values in by_origin.items()]
    return label + (": " + "; ".join(parts) if parts else "")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=_WIDTH, initial_indent="# ", subsequent_indent="#   ",
                         break_long_words=False, break_on_hyphens=False)


def _layout(head: str, expr: ast.Expr) -> str:
    """``head + expr`` on one line when it fits; else a long sum one term per line, or the
    widest call's arguments one per line."""
    text = head + to_text(expr)
    if len(text) <= _WIDTH:
        return text
    terms = _terms(expr)
    lines = [f"    {sign + ' ' if sign else ''}{term}" for sign, term in terms]
    if len(terms) > 2 and all(len(line) <= _WIDTH for line in lines):
        return head + "(\n" + "\n".join(lines) + "\n)"
    calls = [n for n in ast.walk(expr) if isinstance(n, ast.Call) and len(n.args) + len(n.kwargs) > 1]
    if not calls:
        return text
    widest = max(calls, key=lambda c: len(to_text(c)))
    marker = "__tvlang_call__"
    outer = to_text(_replace(expr, widest, ast.Name(marker)))
    return head + outer.replace(marker, "\n".join(_broken(widest, 0)))


def _lines(expr: ast.Expr, indent: int, prefix: str = "", suffix: str = ",") -> list[str]:
    """``prefix + expr + suffix`` at ``indent``: one line when it fits, else ``expr`` broken as
    ``_broken`` breaks it (an argument that is itself too long is broken in turn)."""
    text = " " * indent + prefix + to_text(expr) + suffix
    if len(text) <= _WIDTH or not isinstance(expr, (ast.Call, ast.ListExpr)):
        return [text]
    lines = _chain(expr, indent) if _is_where(expr) and _is_where(expr.args[2]) else _broken(expr, indent)
    return [" " * indent + prefix + lines[0].lstrip()] + lines[1:-1] + [lines[-1] + suffix]


def _is_where(expr: ast.Expr) -> bool:
    return isinstance(expr, ast.Call) and expr.func == "where" and len(expr.args) == 3 and not expr.kwargs


def _chain(expr: ast.Call, indent: int) -> list[str]:
    """``where(p1, a, where(p2, b, c))`` as a table, one condition a line at ``indent``, as an
    else-if chain reads: ``where(p1, a,`` / ``where(p2, b,`` / ``c))``; a value too long for its
    line goes on the lines below its condition, four columns further in."""
    pad, lines, depth = " " * indent, [], 0
    node: ast.Expr = expr
    while _is_where(node):
        assert isinstance(node, ast.Call)
        pattern, then, node = node.args
        line = f"{pad}where({to_text(pattern)}, {to_text(then)},"
        if len(line) <= _WIDTH:
            lines.append(line)
        else:
            lines.append(f"{pad}where({to_text(pattern)},")
            lines += _lines(then, indent + 4)
        depth += 1
    rest = _lines(node, indent, suffix=")" * depth)
    return lines + rest


def _broken(expr: ast.Call | ast.ListExpr, indent: int) -> list[str]:
    """A call or list one argument per line: ``f(`` and ``)`` at ``indent``, the arguments
    (and the options together, when they fit on a line) four columns further in."""
    pad, inner = " " * indent, indent + 4
    if isinstance(expr, ast.ListExpr):
        return [pad + "["] + [line for item in expr.items for line in _lines(item, inner)] + [pad + "]"]
    lines = [pad + f"{expr.func}("] + [line for arg in expr.args for line in _lines(arg, inner)]
    options = ", ".join(to_text(k) for k in expr.kwargs)
    if expr.kwargs and len(" " * inner + options + ",") <= _WIDTH:
        lines.append(" " * inner + options + ",")
    else:
        lines += [line for k in expr.kwargs for line in _lines(k.value, inner, prefix=f"{k.name}=")]
    return lines + [pad + ")"]


def _terms(expr: ast.Expr) -> list[tuple[str, str]]:
    """A chain ``a + b - (c - d)`` as ``[("", "a"), ("+", "b"), ("-", "(c - d)")]``."""
    terms: list[tuple[str, str]] = []
    node = expr
    while isinstance(node, ast.BinOp) and node.op in "+-":
        right = to_text(node.right)
        if isinstance(node.right, ast.BinOp) and node.right.op in "+-":
            right = f"({right})"
        terms.append((node.op, right))
        node = node.left
    terms.append(("", to_text(node)))
    return terms[::-1]


def _replace(node: ast.Expr, old: ast.Expr, new: ast.Expr) -> ast.Expr:
    if node is old:
        return new
    if isinstance(node, ast.BinOp):
        return ast.BinOp(node.op, _replace(node.left, old, new), _replace(node.right, old, new))
    if isinstance(node, ast.Neg):
        return ast.Neg(_replace(node.operand, old, new))
    if isinstance(node, ast.Call):
        return ast.Call(node.func, tuple(_replace(a, old, new) for a in node.args),
                        tuple(ast.Keyword(k.name, _replace(k.value, old, new)) for k in node.kwargs))
    return node
