"""cancel: terms whose coefficients are zero vanish, and a source no output
needs any more is never opened.

``pre + (ft - pre)`` is ``lin(pre: 0, ft: 1)`` after folding, and ``ft`` after
this pass. A combination whose every term cancels is the zero task vector.
"""

from __future__ import annotations

from tvlang.plan.ir import Node, const_value
from tvlang.plan.optimize.rewrite import bottom_up, rebuild

# A coefficient this small relative to 1 is a rounding residue of an exact
# cancellation (0.1 + 0.2 - 0.3), not a weight anyone wrote.
ZERO_TOLERANCE = 1e-12


def is_zero(coef: Node) -> bool:
    return coef.op == "const" and abs(const_value(coef)) <= ZERO_TOLERANCE


def cancel(program: Node, ctx) -> Node:
    it = ctx.interner
    one = it.const(1.0)

    def visit(node: Node, args, coefs):
        if node.op != "lin":
            return rebuild(node, it, args, coefs)
        kept = [(v, c) for v, c in zip(args, coefs) if not is_zero(c) and v.op != "zero"]
        if not kept:
            return it.zero()  # lin(x: 0) -> zero
        if len(kept) == 1 and kept[0][1] is one:
            return kept[0][0]  # lin(x: 1) -> x
        return it.lin(tuple(v for v, _ in kept), tuple(c for _, c in kept), node.weight)

    return bottom_up(program, it, visit)
