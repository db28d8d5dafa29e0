"""linearize: every tree of vector ``+ - * /`` becomes one linear combination.

``0.4*(a - b) + 0.6*a`` becomes ``lin(a: 0.4, b: 0.4*-1, a: 0.6)``; merging equal
leaves and folding the coefficients is the next pass's job. Non-linear built-ins
are barriers: their arguments are linearized on their own.
"""

from __future__ import annotations

from collections import Counter

from tvlang.plan.ir import Node, postorder

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

    done: dict[int, Node] = {}
    terms_of: dict[int, list[tuple[Node, Node]]] = {}

    def terms(node: Node) -> list[tuple[Node, Node]]:
        """(coefficient, leaf) pairs of an original vector node."""
        cached = terms_of.get(id(node))
        if cached is not None:
            return cached
        op = node.op
        if op == "add":
            result = terms(node.args[0]) + terms(node.args[1])
        elif op == "sub":
            result = terms(node.args[0]) + [(times(minus_one, c), x) for c, x in terms(node.args[1])]
        elif op == "neg":
            result = [(times(minus_one, c), x) for c, x in terms(node.args[0])]
        elif op == "mul":
            scale = done[id(node.args[0])]
            result = [(times(scale, c), x) for c, x in terms(node.args[1])]
        elif op == "div":
            scale = done[id(node.args[1])]
            result = [(over(c, scale), x) for c, x in terms(node.args[0])]
        elif op == "lin":
            result = []
            for coef, vec in zip(node.attr, node.args):
                result.extend((times(done[id(coef)], c), x) for c, x in terms(vec))
        else:
            result = [(one, done[id(node)])]
        terms_of[id(node)] = result
        return result

    def make(pairs: list[tuple[Node, Node]], weight: float | None) -> Node:
        if len(pairs) == 1 and pairs[0][0] is one:
            return pairs[0][1]
        return it.lin(tuple(x for _, x in pairs), tuple(c for c, _ in pairs), weight)

    for node in order:
        if node.op in LINEAR_OPS and node.kind == "vector":
            pairs = terms(node)
            done[id(node)] = make(pairs, node.weight)
            if uses[id(node)] >= 2 and len(pairs) >= 2:
                ctx.shared_linear.append(done[id(node)])
        else:
            from tvlang.plan.optimize.rewrite import rebuild

            args = tuple(done[id(a)] for a in node.args)
            coefs = tuple(done[id(c)] for c in node.attr) if node.op == "lin" else None
            done[id(node)] = rebuild(node, it, args, coefs)
    return done[id(program)]
