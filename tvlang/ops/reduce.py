"""Linear kernels (``mean``, ``sum``) and the whole-model reducers ``norm``, ``dot``, ``cos``.

Reducers accumulate in one streaming pass over every tensor of their inputs.
A tensor's sums (of squares, of products) are taken in float64 over fixed blocks
of ``tvlang.ops.sums.BLOCK`` consecutive entries counted from its first entry
(:class:`BlockSums`: each block by a fixed tree of float64 additions, so the bits do
not depend on torch's thread count, a Ray worker running one thread and the driver
several, the device, the compiled helper, nor on whether the tensor comes whole or in
chunks), and the block sums of every
tensor are added exactly (:class:`ExactSum`), rounded once at the end (both in
:mod:`tvlang.ops.sums`, shared with the kernels that need a tensor's norms). So a
reducer's result does not depend on the order of the tensors, nor on how they
are split among copies of the reducer whose states are merged (``merge``: the
Ray executor's map tasks): a partitioned run gives a local run's bits.
``cos`` of a vector with zero norm is 0.

>>> from tvlang.ops.context import TensorContext
>>> r = CosReducer()
>>> r.update(0, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], TensorContext("a"))
>>> r.update(0, [torch.tensor([0.0]), torch.tensor([0.0])], TensorContext("b"))
>>> r.end_pass(0); round(r.result(), 6)
0.707107
"""

from __future__ import annotations

import math

import torch

from tvlang.ops.coefficients import cosine
from tvlang.ops.common import fresh, kernel_of
from tvlang.ops.context import TensorContext
from tvlang.ops.sums import BlockSums, ExactSum

__all__ = ["mean", "sum_", "BlockSums", "ExactSum", "NormReducer", "DotReducer", "CosReducer"]


@kernel_of("sum")
def sum_(inputs: list[torch.Tensor], ctx: TensorContext, *, weights) -> torch.Tensor:
    """``x1 + x2 + ...``, or ``w1*x1 + w2*x2 + ...`` with weights (this tensor's values)."""
    out = fresh(inputs[0])
    if weights:
        torch.mul(inputs[0], float(weights[0]), out=out)
        for x, w in zip(inputs[1:], weights[1:]):
            out.add_(x, alpha=float(w))
        return out
    out.copy_(inputs[0])
    for x in inputs[1:]:
        out.add_(x)
    return out


@kernel_of("mean")
def mean(inputs: list[torch.Tensor], ctx: TensorContext, *, weights) -> torch.Tensor:
    """The average, or ``sum(w_i * x_i) / sum(w_i)`` with weights (this tensor's values)."""
    if not weights:
        return sum_(inputs, ctx).div_(len(inputs))
    total = math.fsum(float(w) for w in weights)  # not 0: the row's rule (kernel_of checks it first)
    return sum_(inputs, ctx, weights=weights).div_(total)


class NormReducer:
    """Frobenius norm of a whole model or task vector: ``sqrt(sum of x**2)``."""

    passes = 1

    def __init__(self) -> None:
        self._sum = BlockSums(products=False)

    def update(self, pass_index: int, tensors: list[torch.Tensor], ctx: TensorContext) -> None:
        self._sum.add(ctx.name, tensors)

    def end_pass(self, pass_index: int) -> None:
        pass

    def merge(self, pass_index: int, other: "NormReducer") -> None:
        self._sum.merge(other._sum)

    def result(self) -> float:
        return math.sqrt(self._sum.value())


class DotReducer:
    """Inner product of two vectors over all tensors."""

    passes = 1

    def __init__(self) -> None:
        self._sum = BlockSums(products=True)

    def update(self, pass_index: int, tensors: list[torch.Tensor], ctx: TensorContext) -> None:
        self._sum.add(ctx.name, tensors)

    def end_pass(self, pass_index: int) -> None:
        pass

    def merge(self, pass_index: int, other: "DotReducer") -> None:
        self._sum.merge(other._sum)

    def result(self) -> float:
        return self._sum.value()


class CosReducer:
    """Cosine similarity of two vectors over all tensors (0 if either is zero)."""

    passes = 1

    def __init__(self) -> None:
        self._dot = BlockSums(products=True)
        self._aa = BlockSums(products=False)
        self._bb = BlockSums(products=False)

    def update(self, pass_index: int, tensors: list[torch.Tensor], ctx: TensorContext) -> None:
        a, b = tensors
        self._dot.add(ctx.name, [a, b])
        self._aa.add(ctx.name, [a])
        self._bb.add(ctx.name, [b])

    def end_pass(self, pass_index: int) -> None:
        pass

    def merge(self, pass_index: int, other: "CosReducer") -> None:
        self._dot.merge(other._dot)
        self._aa.merge(other._aa)
        self._bb.merge(other._bb)

    def result(self) -> float:
        return cosine(self._dot.value(), self._aa.value(), self._bb.value())
