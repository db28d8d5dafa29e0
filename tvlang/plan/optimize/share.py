"""share: a linear subexpression that several combinations contain is computed
once per tensor and reused.

Equal nodes are already one node (the IR is hash-consed), so a repeated call
such as ``ties(a - pre, b - pre)`` in two outputs is computed once without this
pass. What linearize flattens away is the sharing of a *linear* part: with
``out x = pre + 0.5*(a - pre)`` and ``out y = pre + 0.3*(a - pre)``, this pass
computes ``d = a - pre`` once and each output as ``pre + k*d``. A candidate is a
linear subexpression the recipe itself used more than once (recorded by
linearize); it is extracted when, after folding and cancelling, at least two
combinations still contain it up to a constant factor.
"""

from __future__ import annotations

from tvlang.plan.ir import Node, const_value, postorder
from tvlang.plan.optimize.cancel import is_zero
from tvlang.plan.optimize.fold import fold_scalar, merge_terms
from tvlang.plan.optimize.rewrite import bottom_up, rebuild


def _constant_terms(node: Node, it) -> dict[int, tuple[Node, float]] | None:
    """{id(leaf): (leaf, coefficient)} of a lin with constant coefficients, else None."""
    vectors, coefs = merge_terms(node.args, tuple(fold_scalar(c, it) for c in node.attr), it)
    terms: dict[int, tuple[Node, float]] = {}
    for vec, coef in zip(vectors, coefs):
        if coef.op != "const":
            return None
        if not is_zero(coef) and vec.op != "zero":
            terms[id(vec)] = (vec, const_value(coef))
    return terms


def _factor(container: dict[int, tuple[Node, float]], part: dict[int, tuple[Node, float]]) -> float | None:
    """k such that ``container`` = rest + k * ``part``, where k*part covers the
    leaves of ``part`` that carry its leading sign exactly (``pre + 0.5*(a - pre)``
    holds ``a - pre`` with k = 0.5, leaving ``pre``); None when it does not.
    """
    sign = 1.0 if any(coef > 0 for _, coef in part.values()) else -1.0
    k = None
    for key, (_, coef) in part.items():
        if coef * sign <= 0:
            continue
        if key not in container:
            return None
        ratio = container[key][1] / coef
        if k is None:
            k = ratio
        elif abs(ratio - k) > 1e-12 * max(1.0, abs(k)):
            return None
    return k


def share(program: Node, ctx) -> Node:
    it = ctx.interner
    for candidate in ctx.shared_linear:
        part = _constant_terms(candidate, it)
        if part is None or len(part) < 2:
            continue
        shared = it.lin(*_ordered(part, it))
        nodes = postorder([program])
        users = [n for n in nodes if n.op == "lin" and n is not shared and _holds(n, part, it)]
        itself = any(n is shared for n in nodes)  # the subexpression is also used on its own
        if len(users) + itself < 2:
            continue

        def visit(node: Node, args, coefs, part=part, shared=shared):
            rebuilt = rebuild(node, it, args, coefs)
            if rebuilt.op != "lin" or rebuilt is shared:
                return rebuilt
            terms = _constant_terms(rebuilt, it)
            if terms is None:
                return rebuilt
            k = _factor(terms, part)
            if k is None:
                return rebuilt
            rest = dict(terms)
            for key, (leaf, coef) in part.items():
                left = rest.get(key, (leaf, 0.0))[1] - k * coef
                if abs(left) <= 1e-12:
                    rest.pop(key, None)
                else:
                    rest[key] = (leaf, left)
            if not rest and k == 1.0:
                return shared
            rest[id(shared)] = (shared, k)
            return it.lin(*_ordered(rest, it), rebuilt.weight)

        program = bottom_up(program, it, visit)
    return program


def _holds(node: Node, part, it) -> bool:
    terms = _constant_terms(node, it)
    return terms is not None and _factor(terms, part) is not None


def _ordered(terms: dict[int, tuple[Node, float]], it):
    pairs = sorted(terms.values(), key=lambda pair: pair[0].serial)
    return tuple(v for v, _ in pairs), tuple(it.const(c) for _, c in pairs)
