"""Linear kernels (``mean``, ``sum``) and the whole-model reducers ``norm``, ``dot``, ``cos``.

Reducers accumulate in float64 over every tensor of their inputs, one
streaming pass. ``cos`` of a vector with zero norm is 0.

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

from tvlang.ops.common import fresh
from tvlang.ops.context import TensorContext

__all__ = ["mean", "sum_", "NormReducer", "DotReducer", "CosReducer"]


def sum_(inputs: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    out = fresh(inputs[0])
    out.copy_(inputs[0])
    for x in inputs[1:]:
        out.add_(x)
    return out


def mean(inputs: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return sum_(inputs, ctx).div_(len(inputs))


def _sq(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.dtype != torch.float64:
        a, b = a.to(torch.float32), b.to(torch.float32)
    return float(torch.sum(torch.mul(a, b), dtype=torch.float64))


class NormReducer:
    """Frobenius norm of a whole model or task vector: ``sqrt(sum of x**2)``."""

    passes = 1

    def __init__(self) -> None:
        self._sum = 0.0

    def update(self, pass_index: int, tensors: list[torch.Tensor], ctx: TensorContext) -> None:
        self._sum += _sq(tensors[0])

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self) -> float:
        return math.sqrt(self._sum)


class DotReducer:
    """Inner product of two vectors over all tensors."""

    passes = 1

    def __init__(self) -> None:
        self._sum = 0.0

    def update(self, pass_index: int, tensors: list[torch.Tensor], ctx: TensorContext) -> None:
        self._sum += _dot(tensors[0], tensors[1])

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self) -> float:
        return self._sum


class CosReducer:
    """Cosine similarity of two vectors over all tensors (0 if either is zero)."""

    passes = 1

    def __init__(self) -> None:
        self._dot = 0.0
        self._aa = 0.0
        self._bb = 0.0

    def update(self, pass_index: int, tensors: list[torch.Tensor], ctx: TensorContext) -> None:
        a, b = tensors
        self._dot += _dot(a, b)
        self._aa += _sq(a)
        self._bb += _sq(b)

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self) -> float:
        if self._aa == 0.0 or self._bb == 0.0:
            return 0.0
        return max(-1.0, min(1.0, self._dot / math.sqrt(self._aa * self._bb)))
