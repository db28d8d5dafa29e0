"""The scalar side of the merges whose result is a linear combination of their inputs: from the
sums of squares and products of a tensor's inputs (tvlang.ops.sums), each merge's coefficients.

``slerp``, ``model_stock``, ``nuslerp`` (flattened), ``multislerp`` and ``karcher`` compute, per
tensor, a few dot products first and then one weighted sum of their inputs (``sce``, its inputs'
weights from their mean squares); these functions are the step in between, in float64 Python
arithmetic. They import no torch, so the torch-free
executor (tvlang.run.direct) computes the same coefficients as the kernels (tvlang.ops.slerp,
tvlang.ops.stock, tvlang.ops.nuslerp, tvlang.ops.sphere), which import them from here.

>>> slerp_factors([1.0, 1.0, 0.0], 0.5)
(0.7071067811865475, 0.7071067811865475)
>>> stock_ratio(0.5, 2)
0.6666666666666666
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tvlang.errors import TvlangError

__all__ = ["DOT_THRESHOLD", "Gram", "slerp_factors", "stock_ratio", "stock_factor", "stock_pairs",
           "nuslerp_coefficients", "multislerp_coefficients", "karcher_coefficients", "matvec", "quadratic",
           "WEIGHT_SUM_EPS", "sce_weights", "noise_scale", "cosine"]

Gram = list[list[float]]

DOT_THRESHOLD = 0.9995
_EPS = 1e-8


def slerp_factors(sums: list[float], t: float) -> tuple[float, float]:
    """``(s0, s1)`` with ``slerp(a, b, t) = s0*a + s1*b``, from ``[a.a, b.b, a.b]``."""
    aa, bb, ab = sums
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    if norm_a > _EPS and norm_b > _EPS:
        cos = min(1.0, max(-1.0, ab / (norm_a * norm_b)))
        if abs(cos) <= DOT_THRESHOLD:
            theta = math.acos(cos)
            sin_theta = math.sin(theta)
            return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
    return 1.0 - t, t


def stock_ratio(cos: float, n: int) -> float:
    """``t = n*c / (1 + (n-1)*c)`` with ``c`` clamped to ``[0, 1]``."""
    c = min(1.0, max(0.0, cos))
    return n * c / (1.0 + (n - 1) * c)


def stock_factor(sums: list[float], n: int) -> float:
    """``t`` from the sums of :func:`stock_pairs` over the offsets (squares first, then the dots)."""
    norms = [math.sqrt(v) for v in sums[:n]]
    dots = iter(sums[n:])
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            total += min(1.0, max(-1.0, next(dots) / max(norms[i] * norms[j], 1e-6)))
            pairs += 1
    return stock_ratio(total / pairs, n)


def stock_pairs(n: int) -> list[tuple[int, int]]:
    """Squares of each offset, then the products of each pair ``i < j``."""
    return [(i, i) for i in range(n)] + [(i, j) for i in range(n) for j in range(i + 1, n)]


NORM_FLOOR = 1e-7  # mergekit normalizes by max(|v|, 1e-7)
COLINEAR = 1e-16  # 1 - cos^2 at most this (mergekit's eps**2): interpolate linearly


def nuslerp_coefficients(g: Gram, t: float) -> list[float]:
    """``[c0, c1]`` with ``slerp(v0, v1, t) = c0*v0 + c1*v1``, from the Gram matrix of the two."""
    n0 = max(math.sqrt(max(g[0][0], 0.0)), NORM_FLOOR)
    n1 = max(math.sqrt(max(g[1][1], 0.0)), NORM_FLOOR)
    cos = min(1.0, max(-1.0, g[0][1] / (n0 * n1)))
    if 1.0 - cos * cos <= COLINEAR:
        return [1.0 - t, t]
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return [math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta]


def multislerp_coefficients(g: Gram, weights: Sequence[float], normalize_weights: bool, eps: float,
                            tensor: str = "") -> list[float]:
    """mergekit's ``multislerp`` in coefficient space: the result is ``sum_i c_i * x_i``.

    Each input is projected on the unit sphere (``x_i / (|x_i| + eps)``); the tangent
    vectors at the weighted mean direction are averaged with the weights and mapped back by
    the exponential map; the result has the weighted mean of the norms.
    """
    n = len(g)
    if n == 1:
        return [1.0]
    w = [float(v) for v in weights] if weights else [1.0] * n
    if normalize_weights:
        total = sum(w)
        w = [v / total for v in w]
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    s = [1.0 / (norm + eps) for norm in norms]  # x_i -> unit vector u_i = s_i x_i
    mean = [w[i] * s[i] for i in range(n)]  # sum_i w_i u_i
    mean_norm = math.sqrt(quadratic(g, mean))
    if mean_norm < eps:
        if n == 2:  # mergekit falls back to the weighted sum of the two
            return [w[0], w[1]]
        raise TvlangError("multislerp: the weighted mean of the inputs' directions is zero (inputs that point "
                          "opposite ways with weights that balance out); change the weights", tensor=tensor)
    mu = [m / mean_norm for m in mean]  # the unit mean direction
    gm = matvec(g, mu)
    dots = [s[i] * gm[i] for i in range(n)]  # u_i . mean
    pull = sum(w[i] * dots[i] for i in range(n))
    tangent = [w[j] * s[j] - pull * mu[j] for j in range(n)]  # sum_i w_i (u_i - dots_i * mean)
    length = math.sqrt(quadratic(g, tangent)) + eps
    radius = sum(norms[i] * w[i] for i in range(n))
    along, across = math.cos(length), math.sin(length) / length
    return [radius * (along * mu[j] + across * tangent[j]) for j in range(n)]


def karcher_coefficients(g: Gram, weights: Sequence[float], max_iter: int, tol: float) -> list[float]:
    """mergekit's ``karcher_merge_tensors`` in coefficient space: the result is ``sum_i c_i * x_i``.

    The weighted Karcher (Riemannian) mean of the inputs' directions on the unit sphere, by
    at most ``max_iter`` gradient steps from the normalized weighted mean, stopping when the
    tangent step is shorter than ``tol``; scaled by the weighted sum of the norms. Inputs
    whose norm is at most ``tol`` take no part in the direction.
    """
    n = len(g)
    if n == 1:
        return [1.0]
    alphas = [float(v) for v in weights] if weights else [1.0 / n] * n
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    total = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / total for i in valid}
    # The Gram matrix of the unit vectors u_i = x_i / |x_i|; the mean is sum_i m_i u_i.
    unit = [[g[i][j] / (norms[i] * norms[j]) if i in a and j in a else 0.0 for j in range(n)] for i in range(n)]
    m = [a.get(i, 0.0) for i in range(n)]
    length = math.sqrt(quadratic(unit, m))
    if length < tol:
        m = [1.0 if i == valid[0] else 0.0 for i in range(n)]
    else:
        m = [v / length for v in m]
    for _ in range(int(max_iter)):
        tangent = [0.0] * n
        dots = matvec(unit, m)
        for i in valid:
            dot = min(1.0, max(-1.0, dots[i]))
            theta = math.acos(dot)
            if theta < tol:
                continue
            step = a[i] * theta / math.sin(theta)
            tangent[i] += step
            for j in range(n):
                tangent[j] -= step * dot * m[j]
        length = math.sqrt(quadratic(unit, tangent))
        if length < tol:
            break
        m = [math.cos(length) * m[j] + math.sin(length) * tangent[j] / length for j in range(n)]
        size = math.sqrt(quadratic(unit, m))
        if size > tol:
            m = [v / size for v in m]
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return [scale * m[i] / norms[i] if i in a else 0.0 for i in range(n)]


def matvec(g: Gram, c: Sequence[float]) -> list[float]:
    """``G c``: the dot products of ``sum_j c_j x_j`` with each input."""
    return [sum(row[j] * c[j] for j in range(len(c))) for row in g]


def quadratic(g: Gram, c: Sequence[float]) -> float:
    """``|sum_i c_i x_i|^2 = c^T G c``, never below 0 (rounding)."""
    return max(0.0, sum(ci * gi for ci, gi in zip(c, matvec(g, c))))


WEIGHT_SUM_EPS = 1e-6  # mergekit's sce_weight: below this sum, uniform weights


def sce_weights(squares: list[float]) -> list[float]:
    """``sce``: each input's mean square over the sum of them; uniform below ``WEIGHT_SUM_EPS`` (mergekit).

    >>> sce_weights([1.0, 3.0]), sce_weights([0.0, 0.0])
    ([0.25, 0.75], [0.5, 0.5])
    """
    total = sum(squares)
    m = len(squares)
    return [1.0 / m] * m if abs(total) < WEIGHT_SUM_EPS else [w / total for w in squares]


def noise_scale(sums: list[float]) -> float:
    """``random_like``: the factor that gives noise of squared norm ``sums[1]`` the norm of a tensor
    of squared norm ``sums[0]`` (0 when either is 0).

    >>> noise_scale([4.0, 1.0]), noise_scale([0.0, 1.0])
    (2.0, 0.0)
    """
    target, current = sums
    return 0.0 if target == 0.0 or current == 0.0 else math.sqrt(target) / math.sqrt(current)


def cosine(dot: float, aa: float, bb: float) -> float:
    """The whole-model ``cos`` from the sums of products and squares of its two vectors, clamped to
    [-1, 1] (0 when either vector is zero): tvlang.ops.reduce's reducer and the torch-free
    executor's (tvlang.run.direct) both call it.

    >>> cosine(1.0, 1.0, 2.0), cosine(3.0, 0.0, 1.0), cosine(2.0000001, 1.0, 4.0)
    (0.7071067811865475, 0.0, 1.0)
    """
    if aa == 0.0 or bb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))
