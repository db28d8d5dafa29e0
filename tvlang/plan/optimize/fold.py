"""fold: constant arithmetic is computed and equal leaves of a combination merge.

``lin(a: 0.4, b: -0.4, a: 0.6)`` becomes ``lin(a: 1.0, b: -0.4)``; params are
already constants. Terms are put in a canonical order (by first creation of the
leaf), so ``a + b`` and ``b + a`` are one node.
"""

from __future__ import annotations

from tvlang.language.constants import ARITHMETIC
from tvlang.plan.ir import Interner, Node, const_value
from tvlang.plan.optimize.rewrite import bottom_up, rebuild

# Scalar rules, as data: IR op -> how two constants combine (the language's own arithmetic).
#   c1 + c2 -> c   c1 - c2 -> c   c1 * c2 -> c   c1 / c2 -> c (c2 != 0)   -c -> c
_FOLD = {
    "add": ARITHMETIC["+"],
    "sub": ARITHMETIC["-"],
    "mul": ARITHMETIC["*"],
    "div": ARITHMETIC["/"],
}


def fold_scalar_node(node: Node, args: tuple[Node, ...], it: Interner) -> Node:
    if node.op in _FOLD and all(a.op == "const" for a in args):
        left, right = (const_value(a) for a in args)
        if node.op == "div" and right == 0.0:
            return rebuild(node, it, args)  # left for the evaluator to report
        return it.const(_FOLD[node.op](left, right))
    if node.op == "neg" and args[0].op == "const":
        return it.const(-const_value(args[0]))
    if node.op == "mul":
        for a, b in (args, args[::-1]):
            if a.op == "const" and const_value(a) == 1.0:
                return b  # 1*x -> x
    return rebuild(node, it, args)


def fold_scalar(node: Node, it: Interner) -> Node:
    """Fold one scalar expression (a coefficient the share pass compares)."""

    def visit(n: Node, args, coefs):
        return fold_scalar_node(n, args, it) if n.kind == "scalar" else rebuild(n, it, args, coefs)

    return bottom_up(node, it, visit)


def merge_terms(vectors, coefs, it: Interner) -> tuple[tuple[Node, ...], tuple[Node, ...]]:
    """Sum the coefficients of equal leaves; order leaves canonically."""
    merged: dict[int, list] = {}
    for vec, coef in zip(vectors, coefs):
        entry = merged.get(id(vec))
        if entry is None:
            merged[id(vec)] = [vec, coef]
        elif entry[1].op == "const" and coef.op == "const":
            entry[1] = it.const(const_value(entry[1]) + const_value(coef))
        else:
            entry[1] = it.binary("add", entry[1], coef)
    ordered = sorted(merged.values(), key=lambda pair: pair[0].serial)
    return tuple(v for v, _ in ordered), tuple(c for _, c in ordered)


def fold(program: Node, ctx) -> Node:
    it = ctx.interner

    def visit(node: Node, args, coefs):
        if node.kind == "scalar":
            return fold_scalar_node(node, args, it)
        if node.op == "lin":
            vectors, merged = merge_terms(args, coefs, it)
            return it.lin(vectors, merged, node.weight)
        return rebuild(node, it, args, coefs)

    return bottom_up(program, it, visit)
