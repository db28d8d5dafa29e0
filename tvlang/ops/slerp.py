"""Spherical linear interpolation per tensor (mergekit's ``slerp``).

Each tensor is flattened. With ``cos`` the cosine between ``a`` and ``b``:
when ``|cos| > 0.9995`` (nearly colinear) the result is the linear
interpolation ``(1-t)*a + t*b``; otherwise, with ``theta = acos(cos)``,
``sin((1-t)*theta)/sin(theta) * a + sin(t*theta)/sin(theta) * b``. A tensor
whose norm is at most 1e-8 in ``a`` or ``b`` has no direction and is linearly
interpolated (mergekit instead treats it as orthogonal to the other).

>>> from tvlang.ops.context import TensorContext
>>> slerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], TensorContext("w"), t=0.5)
tensor([0.7071, 0.7071])
>>> slerp([torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])], TensorContext("w"), t=0.5)
tensor([1.5000, 3.0000])
"""

from __future__ import annotations

import math

import torch

from tvlang.ops.common import fresh, kernel_of
from tvlang.ops.context import TensorContext

__all__ = ["slerp", "DOT_THRESHOLD"]

DOT_THRESHOLD = 0.9995
_EPS = 1e-8


@kernel_of("slerp")
def slerp(inputs: list[torch.Tensor], ctx: TensorContext, *, t: float) -> torch.Tensor:
    a, b = inputs
    t = float(t)
    out = fresh(a)
    norm_a = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    norm_b = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    if norm_a > _EPS and norm_b > _EPS:
        dot = float(torch.sum(torch.mul(a, b), dtype=torch.float64))
        cos = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
        if abs(cos) <= DOT_THRESHOLD:
            theta = math.acos(cos)
            sin_theta = math.sin(theta)
            s0 = math.sin((1.0 - t) * theta) / sin_theta
            s1 = math.sin(t * theta) / sin_theta
            torch.mul(a, s0, out=out)
            return out.add_(b, alpha=s1)
    torch.mul(a, 1.0 - t, out=out)
    return out.add_(b, alpha=t)
