"""A memoized bottom-up rewriter shared by the passes."""

from __future__ import annotations

from typing import Callable

from tvlang.plan.ir import Interner, Node, postorder


def rebuild(node: Node, interner: Interner, args: tuple[Node, ...], coefs: tuple[Node, ...] | None = None) -> Node:
    """``node`` with new children (and, for ``lin``, new coefficients)."""
    if node.op == "lin":
        return interner.lin(args, coefs if coefs is not None else tuple(node.attr), node.weight)
    if node.op == "program":
        return interner.make("program", args, node.attr, kind="program")
    if node.op == "call":
        name, options = node.attr
        return interner.call(name, args, options, node.weight)  # rewrites keep the kind
    if node.op == "reduce":
        return interner.reduce(node.attr[0], args, node.attr[1])
    if node.op == "neg":
        return interner.neg(args[0])
    if node.op in ("add", "sub", "mul", "div"):
        return interner.binary(node.op, args[0], args[1])
    return node  # leaves


def bottom_up(root: Node, interner: Interner, visit: Callable[[Node, tuple[Node, ...], tuple[Node, ...] | None], Node]) -> Node:
    """Rewrite every node after its children: ``visit(node, new_args, new_coefs)``."""
    done: dict[int, Node] = {}
    for node in postorder([root]):
        args = tuple(done[id(a)] for a in node.args)
        coefs = tuple(done[id(c)] for c in node.attr) if node.op == "lin" else None
        done[id(node)] = visit(node, args, coefs)
    return done[id(root)]
