"""Merges whose result is a linear combination of their inputs, with coefficients read from
the inputs' Gram matrix: ``multislerp``, ``karcher`` and ``nuslerp`` (flattened).

Each of these spherical merges works on the directions and norms of its inputs, and every
vector it builds (unit vectors, means, tangents, the result) stays in the span of the inputs.
So a tensor is merged in two steps: the dot products ``G[i][j] = x_i . x_j`` of the flattened
inputs (in float64), then the merge itself in coefficient space (a few scalars,
float64), then one linear combination ``sum_i c_i * x_i``. The arithmetic on tensors is one
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

from tvlang.ops.common import fresh

__all__ = ["Gram", "GramChunks", "gram", "combine", "quadratic", "matvec"]

Gram = list[list[float]]
#: ``coefficients(G) -> c``: the merge in coefficient space (may raise TvlangError).
Coefficients = Callable[[Gram], Sequence[float]]


def gram(vectors: Sequence[torch.Tensor]) -> Gram:
    """The Gram matrix of the flattened ``vectors``, in float64."""
    n = len(vectors)
    flat = [v.reshape(-1) for v in vectors]
    g = [[0.0] * n for _ in range(n)]
    _accumulate(g, flat)
    return g


_BLOCK = 1 << 16  # entries of each input converted to float64 at a time


def _accumulate(g: Gram, flat: Sequence[torch.Tensor]) -> None:
    """Add the dot products of the flat ``flat`` to ``g``: block by block, the inputs' entries
    in float64 and one matrix product (one conversion per entry, products and sums in float64)."""
    n = len(flat)
    count = flat[0].numel()
    block = torch.empty((n, min(_BLOCK, max(count, 1))), dtype=torch.float64, device=flat[0].device)
    total = torch.zeros((n, n), dtype=torch.float64, device=flat[0].device)
    for start in range(0, count, _BLOCK):
        stop = min(count, start + _BLOCK)
        rows = block[:, :stop - start]
        for i, f in enumerate(flat):
            rows[i].copy_(f[start:stop])
        total.addmm_(rows, rows.T)
    values = total.tolist()
    for i in range(n):
        for j in range(n):
            g[i][j] += values[i][j]


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


def matvec(g: Gram, c: Sequence[float]) -> list[float]:
    """``G c``: the dot products of ``sum_j c_j x_j`` with each input."""
    return [sum(row[j] * c[j] for j in range(len(c))) for row in g]


def quadratic(g: Gram, c: Sequence[float]) -> float:
    """``|sum_i c_i x_i|^2 = c^T G c``, never below 0 (rounding)."""
    return max(0.0, sum(ci * gi for ci, gi in zip(c, matvec(g, c))))


class GramChunks:
    """The chunk form of a Gram-coefficient merge: pass 0 accumulates the Gram matrix over
    the pieces, then each piece of the result is ``sum_i c_i * piece_i``."""

    passes = 1

    def __init__(self, n_inputs: int, coefficients: Coefficients) -> None:
        self.g: Gram = [[0.0] * n_inputs for _ in range(n_inputs)]
        self.coefficients_of = coefficients
        self.c: Sequence[float] | None = None

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        _accumulate(self.g, [p.reshape(-1) for p in pieces])

    def end_pass(self, pass_index: int) -> None:
        self.c = self.coefficients_of(self.g)

    def restart(self) -> None:
        pass

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        assert self.c is not None, "apply before the Gram pass"
        combine([p.reshape(out.shape) for p in pieces], self.c, out=out)
