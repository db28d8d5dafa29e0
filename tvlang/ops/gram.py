"""Merges whose result is a linear combination of their inputs, with coefficients read from
the inputs' Gram matrix: ``multislerp``, ``karcher`` and ``nuslerp`` (flattened).

Each of these spherical merges works on the directions and norms of its inputs, and every
vector it builds (unit vectors, means, tangents, the result) stays in the span of the inputs.
So a tensor is merged in two steps: the dot products ``G[i][j] = x_i . x_j`` of the flattened
inputs (in float64, by tvlang.ops.sums' fixed blocks: the same bits in chunks or whole), then
the merge itself in coefficient space (a few scalars, float64: tvlang.ops.coefficients), then
one linear combination ``sum_i c_i * x_i``. The arithmetic on tensors is one
pass of dot products and one of multiply-adds, whatever the method iterates, and the chunk
form :class:`GramChunks` runs the same two steps on consecutive pieces of a tensor (one pass
to observe, one to write), so these merges stream with bounded memory.

>>> from tvlang.ops.context import TensorContext
>>> gram([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])])
[[5.0, 3.0], [3.0, 9.0]]
>>> combine([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])], [2.0, -1.0])
tensor([-1.,  4.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tvlang.ops.coefficients import Gram, matvec, quadratic
from tvlang.ops.common import fresh
from tvlang.ops.sums import Sums

__all__ = ["Gram", "GramChunks", "gram", "combine", "quadratic", "matvec"]

#: ``coefficients(G) -> c``: the merge in coefficient space (may raise TvlangError).
Coefficients = Callable[[Gram], Sequence[float]]


def gram(vectors: Sequence[torch.Tensor]) -> Gram:
    """The Gram matrix of the flattened ``vectors``, in float64 (:func:`_sums`)."""
    sums = _sums(len(vectors))
    sums.add_whole(vectors)
    return _matrix(sums)


def _sums(n: int) -> Sums:
    """The dot products of ``n`` inputs (the upper triangle), by :class:`tvlang.ops.sums.Sums`:
    fixed blocks, each summed in float64 in a fixed order, the block sums added exactly, so a
    tensor handed over whole or in pieces of any length gives the same matrix, bit for bit."""
    return Sums(n, [(i, j) for i in range(n) for j in range(i, n)])


def _matrix(sums: Sums) -> Gram:
    n = max(j for _, j in sums.pairs) + 1
    g = [[0.0] * n for _ in range(n)]
    for (i, j), value in zip(sums.pairs, sums.totals()):
        g[i][j] = g[j][i] = value
    return g


def combine(vectors: Sequence[torch.Tensor], coefficients: Sequence[float],
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i coefficients[i] * vectors[i]``, into ``out`` (a fresh tensor when None)."""
    first = vectors[0]
    out = fresh(first) if out is None else out
    torch.mul(first, float(coefficients[0]), out=out)
    for vector, c in zip(vectors[1:], coefficients[1:]):
        if c != 0.0:
            out.add_(vector, alpha=float(c))
    return out


class GramChunks:
    """The chunk form of a Gram-coefficient merge: pass 0 accumulates the Gram matrix over
    the pieces, then each piece of the result is ``sum_i c_i * piece_i``."""

    passes = 1

    def __init__(self, n_inputs: int, coefficients: Coefficients) -> None:
        self.sums = _sums(n_inputs)
        self.coefficients_of = coefficients
        self.c: Sequence[float] | None = None

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        self.sums.add([p.reshape(-1) for p in pieces])

    def end_pass(self, pass_index: int) -> None:
        self.c = self.coefficients_of(_matrix(self.sums))

    def restart(self) -> None:
        pass

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        assert self.c is not None, "apply before the Gram pass"
        combine([p.reshape(out.shape) for p in pieces], self.c, out=out)
