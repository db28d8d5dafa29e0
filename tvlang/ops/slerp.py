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

import torch

from tvlang.ops.coefficients import DOT_THRESHOLD, slerp_factors
from tvlang.ops.common import ChunkKernel, chunk_form_of, fresh, kernel_of
from tvlang.ops.context import TensorContext
from tvlang.ops.sums import Sums

__all__ = ["slerp", "slerp_chunks", "slerp_factors", "DOT_THRESHOLD"]

_PAIRS = ((0, 0), (1, 1), (0, 1))


def _interpolate(a: torch.Tensor, b: torch.Tensor, factors: tuple[float, float], out: torch.Tensor) -> torch.Tensor:
    torch.mul(a, factors[0], out=out)
    return out.add_(b, alpha=factors[1])


@kernel_of("slerp")
def slerp(inputs: list[torch.Tensor], ctx: TensorContext, *, t: float) -> torch.Tensor:
    a, b = inputs
    sums = Sums(2, _PAIRS)
    sums.add_whole([a, b])
    return _interpolate(a, b, slerp_factors(sums.totals(), float(t)), fresh(a))


class _SlerpChunks(ChunkKernel):
    """One pass for the norms and the dot product (:class:`Sums`: the same as the whole
    tensor's), then ``s0*a + s1*b`` piece by piece."""

    passes = 1

    def __init__(self, t: float) -> None:
        self.t = t
        self.sums = Sums(2, _PAIRS)
        self.factors = (1.0 - t, t)

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        self.sums.add(pieces)

    def end_pass(self, pass_index: int) -> None:
        self.factors = slerp_factors(self.sums.totals(), self.t)

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        _interpolate(pieces[0], pieces[1], self.factors, out)


@chunk_form_of("slerp")
def slerp_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, t: float) -> ChunkKernel:
    return _SlerpChunks(float(t))
