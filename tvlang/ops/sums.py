"""Per-tensor sums that do not depend on how the tensor is cut into pieces.

A kernel that needs a tensor's norms or dot products before its first result (``slerp``,
``model_stock``, ``random_like``) computes them in a pass over the chunks when it runs in a
chunked program, and on the whole tensor when it does not. Both must give the same numbers,
bit for bit, so that the result does not depend on the chunk size. A float64 sum of the
pieces' sums would not: rounding depends on where the cuts fall, and torch splits a long
reduction over however many threads it has.

:class:`BlockSum` therefore sums fixed blocks of :data:`BLOCK` consecutive entries, counted
from the tensor's first entry (a block cut by a piece's end is completed from the next
piece), each block in float64 as one row of a ``(blocks, BLOCK)`` view (short enough that
torch never splits a row over threads), and adds the block sums with :func:`math.fsum`
(correctly rounded, so their order does not matter). :class:`Sums` keeps the sums of
squares and products a kernel asks for.

>>> s = Sums(2, [(0, 0), (0, 1)])
>>> a, b = torch.arange(10.0), torch.ones(10)
>>> s.add([a[:3], b[:3]]); s.add([a[3:], b[3:]])
>>> s.totals()
[285.0, 45.0]
>>> whole = Sums(2, [(0, 0), (0, 1)]); whole.add([a, b]); whole.totals() == s.totals()
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["BLOCK", "PIECE", "BlockSum", "Sums"]

#: entries per block; below torch's grain size (32768), so a block is summed on one thread
BLOCK = 1 << 14
#: entries per piece when a whole tensor is summed
PIECE = 1 << 20
#: entries converted to float64 at a time
STRIDE = 1 << 16


class BlockSum:
    """The float64 sum of values handed over in order, in pieces of any size (see the module)."""

    def __init__(self) -> None:
        # block sums as Python floats: small tensors kept between the float64 temporaries
        # would pin the allocator's freed memory (fragmentation: 35 MB per million entries)
        self.partials: list[float] = []
        self.carry: torch.Tensor | None = None  # the block cut by the last piece's end
        self.filled = 0

    def add(self, values: torch.Tensor) -> None:
        """Add the next ``values`` (flat, float64)."""
        v = values.reshape(-1)
        if self.filled:
            take = min(BLOCK - self.filled, v.numel())
            self.carry[self.filled:self.filled + take].copy_(v[:take])
            self.filled += take
            v = v[take:]
            if self.filled < BLOCK:
                return
            self.partials += _row_sums(self.carry.view(1, BLOCK))
            self.filled = 0
        full = v.numel() // BLOCK * BLOCK
        if full:
            self.partials += _row_sums(v[:full].view(-1, BLOCK))
        rest = v[full:]
        if rest.numel():
            if self.carry is None or self.carry.device != rest.device:
                self.carry = torch.empty(BLOCK, dtype=torch.float64, device=rest.device)
            self.carry[:rest.numel()].copy_(rest)
            self.filled = rest.numel()

    def total(self) -> float:
        """The sum of every value handed over."""
        if self.filled:
            self.partials += _row_sums(self.carry[:self.filled].view(1, -1))
            self.filled = 0
        return math.fsum(self.partials)


def _row_sums(rows: torch.Tensor) -> list[float]:
    return rows.sum(dim=1, dtype=torch.float64).tolist()


class Sums:
    """For each ``(i, j)`` in ``pairs``, the float64 sum over the tensor of ``x_i * x_j``
    (products of the values converted to float64: exact for float32 inputs)."""

    def __init__(self, n_inputs: int, pairs: Sequence[tuple[int, int]]) -> None:
        self.n = n_inputs
        self.pairs = list(pairs)
        self.sums = [BlockSum() for _ in self.pairs]

    def add(self, pieces: Sequence[torch.Tensor]) -> None:
        """Add the next entries of each input (pieces of the same length, in input order),
        :data:`STRIDE` entries at a time (small float64 temporaries, in the CPU cache)."""
        flat = [p.reshape(-1) for p in pieces]
        for start in range(0, flat[0].numel(), STRIDE):
            wide = [f[start:start + STRIDE].to(torch.float64) for f in flat]
            for (i, j), acc in zip(self.pairs, self.sums):
                acc.add(torch.square(wide[i]) if i == j else torch.mul(wide[i], wide[j]))

    def add_whole(self, tensors: Sequence[torch.Tensor]) -> None:
        """Add whole tensors, :data:`PIECE` entries at a time (the same totals as one call)."""
        flat = [t.reshape(-1) for t in tensors]
        count = flat[0].numel()
        for start in range(0, count, PIECE):
            self.add([f[start:start + PIECE] for f in flat])

    def totals(self) -> list[float]:
        return [acc.total() for acc in self.sums]
