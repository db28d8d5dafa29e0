"""Means on the sphere of several tensors: ``multislerp`` and ``karcher``, as mergekit 0.1.5's
methods of the same names compute them, per tensor (docs/operators.md).

Both work in coefficient space (:mod:`tvlang.ops.gram`): the dot products of the inputs,
then scalars, then one linear combination of the inputs.

>>> from tvlang.ops.context import TensorContext
>>> x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
>>> multislerp([x, y], TensorContext("w"))
tensor([0.7071, 0.7071])
>>> karcher([x, 2 * y], TensorContext("w"))
tensor([1.0607, 1.0607])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tvlang.errors import TvlangError
from tvlang.ops.common import chunk_form_of, kernel_of
from tvlang.ops.context import TensorContext
from tvlang.ops.gram import Gram, GramChunks, combine, gram, matvec, quadratic

__all__ = ["multislerp", "multislerp_chunks", "multislerp_coefficients", "karcher", "karcher_chunks",
           "karcher_coefficients"]


# -- multislerp -------------------------------------------------------------------------------

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


@kernel_of("multislerp")
def multislerp(inputs: list[torch.Tensor], ctx: TensorContext, *, weights, normalize_weights: bool,
               eps: float) -> torch.Tensor:
    c = multislerp_coefficients(gram(inputs), weights, normalize_weights, float(eps), ctx.name)
    return combine(inputs, c)


@chunk_form_of("multislerp")
def multislerp_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, weights,
                      normalize_weights: bool, eps: float) -> GramChunks:
    return GramChunks(n_inputs, lambda g: multislerp_coefficients(g, weights, normalize_weights, float(eps), ctx.name))


# -- karcher ----------------------------------------------------------------------------------

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


@kernel_of("karcher")
def karcher(inputs: list[torch.Tensor], ctx: TensorContext, *, weights, max_iter: int, tol: float) -> torch.Tensor:
    return combine(inputs, karcher_coefficients(gram(inputs), weights, int(max_iter), float(tol)))


@chunk_form_of("karcher")
def karcher_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, weights, max_iter: int,
                   tol: float) -> GramChunks:
    return GramChunks(n_inputs, lambda g: karcher_coefficients(g, weights, int(max_iter), float(tol)))
