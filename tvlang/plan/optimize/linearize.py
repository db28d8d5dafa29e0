"""linearize: every tree of vector ``+ - * /`` becomes one linear combination.

``0.4*(a - b) + 0.6*a`` becomes ``lin(a: 0.4, b: 0.4*-1, a: 0.6)``; merging equal
leaves and folding the coefficients is the next pass's job. Non-linear built-ins
are barriers: their arguments are linearized on their own.
"""

from __future__ import annotations

from collections import Counter

from tvlang.plan.ir import Node, postorder
from tvlang.plan.optimize.rewrite import rebuild

LINEAR_OPS = {"add", "sub", "neg", "mul", "div", "lin"}

# Coefficient rules, kept as data (each applied while composing coefficients):
#   1*c -> c        c*1 -> c        -(-c) -> c


def linearize(program: Node, ctx) -> Node:
    it = ctx.interner
    one = it.const(1.0)
    minus_one = it.const(-1.0)

    def times(a: Node, b: Node) -> Node:
        if a is one:
            return b  # 1*c -> c
        if b is one:
            return a  # c*1 -> c
        return it.binary("mul", a, b)

    def over(a: Node, b: Node) -> Node:
        return a if b is one else it.binary("div", a, b)  # c/1 -> c

    # How often each node is used: a linear subexpression used twice is
    # recorded for the share pass before it is flattened away.
    uses: Counter[int] = Counter()
    order = postorder([program])
    for node in order:
        for child in node.args:
            uses[id(child)] += 1

    # The linear nodes that become a lin of their own: those something other than a
    # linear parent needs (a call, a reduction, an output) and those used twice. The
    # others are only walked through, so a sum of n terms makes one lin of n terms, not
    # n lins of 1..n terms.
    needed = {id(node) for node in order if uses[id(node)] >= 2}
    for node in order:
        if not _is_linear(node):
            needed.update(id(child) for child in node.args)

    done: dict[int, Node] = {}
    terms_of: dict[int, list[tuple[Node, Node]]] = {}  # of the needed linear nodes

    def factors(node: Node) -> list[tuple[Node, tuple[str, Node] | None]]:
        """The children of a linear node, each with what its terms are scaled by."""
        op, args = node.op, node.args
        if op == "add":
            pairs = [(args[0], None), (args[1], None)]
        elif op == "sub":
            pairs = [(args[0], None), (args[1], ("times", minus_one))]
        elif op == "neg":
            pairs = [(args[0], ("times", minus_one))]
        elif op == "mul":
            pairs = [(args[1], ("times", done[id(args[0])]))]
        elif op == "div":
            pairs = [(args[0], ("over", done[id(args[1])]))]
        else:  # lin
            pairs = [(vec, ("times", done[id(coef)])) for coef, vec in zip(node.attr, args)]
        return [(child, None if factor is None or factor[1] is one else factor) for child, factor in pairs]

    def terms(root: Node) -> list[tuple[Node, Node]]:
        """(coefficient, leaf) pairs of a linear node, left to right.

        The walk goes down through linear nodes to the leaves (non-linear nodes) and to
        the needed linear nodes below (whose terms are known). A leaf's coefficient is
        composed from the leaf up, one factor per step, as a recursion returning up the
        tree would compose it: ``times(s_top, ... times(s_bottom, c))``.
        """
        result: list[tuple[Node, Node]] = []
        # (node, the factors between it and the root: a linked list, innermost first)
        stack: list[tuple[Node, tuple | None]] = [(root, None)]
        while stack:
            node, up = stack.pop()
            if node is not root and id(node) in terms_of:
                below = terms_of[id(node)]
            elif not _is_linear(node):
                below = [(one, done[id(node)])]
            else:
                for child, factor in reversed(factors(node)):
                    stack.append((child, up if factor is None else (factor, up)))
                continue
            for coef, leaf in below:
                link = up
                while link is not None:
                    (how, scale), link = link
                    coef = times(scale, coef) if how == "times" else over(coef, scale)
                result.append((coef, leaf))
        return result

    def make(pairs: list[tuple[Node, Node]], weight: float | None) -> Node:
        if len(pairs) == 1 and pairs[0][0] is one:
            return pairs[0][1]
        return it.lin(tuple(x for _, x in pairs), tuple(c for c, _ in pairs), weight)

    for node in order:
        if _is_linear(node):
            if id(node) not in needed:
                continue
            pairs = terms_of[id(node)] = terms(node)
            done[id(node)] = make(pairs, node.weight)
            if uses[id(node)] >= 2 and len(pairs) >= 2:
                ctx.shared_linear.append(done[id(node)])
        else:
            args = tuple(done[id(a)] for a in node.args)
            coefs = tuple(done[id(c)] for c in node.attr) if node.op == "lin" else None
            done[id(node)] = rebuild(node, it, args, coefs)
    return done[id(program)]


def _is_linear(node: Node) -> bool:
    return node.op in LINEAR_OPS and node.kind == "vector"
