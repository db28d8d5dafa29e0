"""The affine rule's fix: how a recipe that breaks it could be written.

A value that is named or passed to a built-in must have affine weight 1 (a model) or 0
(a task vector); ``pre + 0.4*ft`` has 1.4. :func:`suggest_fix` rewrites each scaled model
term ``c*m`` as ``c*(m - base)``, with ``base`` the first unscaled model term of the sum,
and keeps the rewrite only when it obeys the rule: the checker shows it in its note.

>>> from tvlang.language.checker import check
>>> from tvlang.language.syntax import parse
>>> try:
...     check(parse("out = pre + 0.4*ft"), source="out = pre + 0.4*ft")
... except Exception as err:
...     print(err.notes[0])
note: scale task vectors, not models: pre + 0.4*(ft - pre)
"""

from __future__ import annotations

from collections.abc import Mapping

from tvlang.language import ast
from tvlang.language.calls import _Scalar, _Vector, _vector_kind
from tvlang.language.trampoline import Frame, trampoline

__all__ = ["suggest_fix", "weight_of"]


def suggest_fix(expr: ast.Expr, types: Mapping[int, object]) -> ast.Expr | None:
    """``expr`` with each scaled model term ``c*m`` written ``c*(m - base)``, when that makes it
    a model or a task vector (the checker's note for a broken affine rule), else ``None``.

    ``types`` maps ``id(node)`` to the type the checker found for it.
    """
    terms: list[ast.Expr] = []
    stack = [expr]
    while stack:  # the terms of the top-level sum, left to right
        node = stack.pop()
        if isinstance(node, ast.BinOp) and node.op in "+-":
            stack.extend((node.right, node.left))
        elif isinstance(node, ast.Neg):
            stack.append(node.operand)
        else:
            terms.append(node)
    base = next(
        (
            term
            for term in terms
            if not isinstance(term, ast.BinOp)
            and isinstance(types.get(id(term)), _Vector)
            and _vector_kind(types[id(term)].weight) == "model"
        ),
        None,
    )
    if base is None:
        return None

    def is_model(node) -> bool:
        t = types.get(id(node))
        return isinstance(t, _Vector) and _vector_kind(t.weight) == "model"

    def is_constant(node) -> bool:
        t = types.get(id(node))
        return isinstance(t, _Scalar) and t.value is not None

    changed = False

    def fix(node) -> Frame:
        nonlocal changed
        if isinstance(node, ast.BinOp) and node.op in "+-":
            return ast.BinOp(node.op, (yield fix(node.left)), (yield fix(node.right)))
        if isinstance(node, ast.Neg):
            return ast.Neg((yield fix(node.operand)))
        if isinstance(node, ast.BinOp):
            left, right = node.left, node.right
            if node.op == "*" and is_constant(left) and is_model(right):
                changed = True
                return ast.BinOp("*", left, ast.BinOp("-", right, base))
            if node.op in "*/" and is_model(left) and is_constant(right):
                changed = True
                return ast.BinOp(node.op, ast.BinOp("-", left, base), right)
        return node

    fixed = trampoline(fix(expr))
    if not changed:
        return None
    weight = trampoline(weight_of(fixed, types))
    if weight is None or _vector_kind(weight) is None:
        return None
    return fixed

def weight_of(node, types: Mapping[int, object]) -> Frame:
    """The affine weight of ``node`` (float or None), from the types found while checking."""
    t = types.get(id(node))
    if isinstance(t, _Vector):
        return t.weight
    if isinstance(node, ast.Neg):
        inner = yield weight_of(node.operand, types)
        return None if inner is None else -inner
    if isinstance(node, ast.BinOp):
        if node.op in "+-":
            left, right = (yield weight_of(node.left, types)), (yield weight_of(node.right, types))
            if left is None or right is None:
                return None
            return left + right if node.op == "+" else left - right
        left_t, right_t = types.get(id(node.left)), types.get(id(node.right))
        if node.op == "*" and isinstance(left_t, _Scalar) and left_t.value is not None:
            inner = yield weight_of(node.right, types)
            return None if inner is None else inner * left_t.value
        if isinstance(right_t, _Scalar) and right_t.value:  # m*c or m/c, c a nonzero constant
            inner = yield weight_of(node.left, types)
            if inner is None:
                return None
            return inner * right_t.value if node.op == "*" else inner / right_t.value
    return None
