"""Sums over tensors that do not depend on how a tensor is cut into pieces.

The whole-model reducers (``norm``, ``dot``, ``cos``: tvlang/ops/reduce.py) and the kernels
that need a tensor's norms or dot products before their first result (``slerp``,
``model_stock``, ``random_like``) sum over a tensor handed over whole or chunk by chunk, and
both must give the same numbers, bit for bit, so that results do not depend on the chunk
size (nor, for the reducers, on how a model is split among Ray tasks). A float64 sum of the
pieces' sums would not: rounding depends on where the cuts fall, and torch splits a long
reduction over however many threads it has.

:class:`BlockSums` therefore sums fixed blocks of :data:`BLOCK` consecutive entries, counted
from the tensor's first entry (a block cut by a piece's end is completed from the next
piece), each block by :func:`block_values`' fixed tree of float64 additions (the same bits in
the compiled helper, in torch on the CPU and on a GPU), and adds the block sums exactly
(:class:`ExactSum`, rounded once). :class:`Sums` keeps the sums of squares and products of
one tensor's inputs that a kernel asks for.

>>> s = Sums(2, [(0, 0), (0, 1)])
>>> a, b = torch.tensor([3.0, 4.0, 0.0, 12.0]), torch.ones(4)
>>> s.add([a[:1], b[:1]]); s.add([a[1:], b[1:]])
>>> s.totals()
[169.0, 19.0]
>>> whole = Sums(2, [(0, 0), (0, 1)]); whole.add([a, b]); whole.totals() == s.totals()
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BLOCK", "PIECE", "BlockSums", "Blocks", "ExactMatrix", "ExactSum", "Sums", "block_values"]

#: entries per block (the compiled helper's TV_BLOCK: tvlang.ops.native.BLOCK)
BLOCK = 1 << 14
#: entries per piece when a whole tensor is summed
PIECE = 1 << 20


ROWS = 64  # blocks converted to float64 at a time (8 MiB of temporaries)
_UNIT_BITS = 1074  # 2**-1074 is the smallest float64: every finite float is a whole number of these


def block_values(first: torch.Tensor, second: torch.Tensor | None = None, *, l1: bool = False) -> list[float]:
    """One float64 sum per row of ``first`` (rows of :data:`BLOCK` entries, or one shorter row):
    of ``first * second``, of ``first * first`` (``second`` ``None``) or of ``|first|`` (``l1``).

    Each term is exact in float64 for float32, bfloat16 and float16 entries (a product of two
    24-bit significands fits in 53 bits). A row, zero-padded to ``BLOCK`` entries, is summed by a
    fixed halving tree: ``s[q] = t[q] + t[q + BLOCK/2]``, then ``s[q] += s[q + h]`` for ``h`` from
    ``BLOCK/4`` down to 1. Every addition is one IEEE float64 addition in an order fixed here, so
    the compiled helper (tvlang.ops.native.block_sums_f32, float32 on the CPU) and the torch loop
    below (any other dtype or device) give the same bits, and so does the torch-free executor
    (tvlang.run.direct). float64 entries (``dtype="float64"``) are rounded once per product.

    >>> block_values(torch.tensor([[3.0, -4.0]])), block_values(torch.tensor([[3.0, -4.0]]), l1=True)
    ([25.0], [7.0])
    """
    rows, width = first.shape
    whole_rows = width == BLOCK or rows == 1  # the helper cuts its input into blocks of BLOCK itself
    if whole_rows and first.is_contiguous() and (second is None or second.is_contiguous()):
        from tvlang.ops.native import block_sums_f32

        found = block_sums_f32(first.reshape(-1), None if second is None else second.reshape(-1), l1)
        if found is not None:
            return found
    values: list[float] = []
    for start in range(0, rows, ROWS):
        x = first[start:start + ROWS].to(torch.float64)
        if l1:
            terms = x.abs()  # not in place: .to() returns a float64 input itself
        else:
            terms = x * (x if second is None else second[start:start + ROWS].to(torch.float64))
        if width < BLOCK:
            terms = torch.nn.functional.pad(terms, (0, BLOCK - width))
        half = BLOCK
        while half > 1:
            half //= 2
            terms = terms[:, :half] + terms[:, half:2 * half]
        values += terms[:, 0].tolist()
    return values


class ExactSum:
    """The sum of floats, kept exactly and rounded once (correctly) by ``value()``.

    Finite values are held as one integer count of ``2**-1074`` (Python integers do not
    overflow), so ``add`` and ``merge`` in any order and grouping give the same value.
    Non-finite values are added as floats apart (``inf``, ``nan``: also order-free).

    >>> s, t = ExactSum(), ExactSum()
    >>> for x in (1e16, 1.0, -1e16): s.add(x)
    >>> s.value(), 1e16 + 1.0 - 1e16
    (1.0, 0.0)
    >>> t.add(0.5); t.merge(s); t.value()
    1.5
    """

    __slots__ = ("units", "special")

    def __init__(self) -> None:
        self.units = 0
        self.special = 0.0

    def add(self, x: float) -> None:
        if math.isfinite(x):
            numerator, denominator = float(x).as_integer_ratio()  # the denominator is a power of two
            self.units += numerator << (_UNIT_BITS - denominator.bit_length() + 1)
        else:
            self.special += x

    def add_all(self, xs: list[float]) -> None:
        for x in xs:
            self.add(x)

    def merge(self, other: "ExactSum") -> None:
        self.units += other.units
        self.special += other.special

    def value(self) -> float:
        if self.special != 0.0:  # an inf or a nan was added (nan != 0.0 too)
            return self.special
        try:
            return self.units / (1 << _UNIT_BITS)  # int / int: correctly rounded
        except OverflowError:
            return math.inf if self.units > 0 else -math.inf

    def __getstate__(self) -> tuple[int, float]:
        return self.units, self.special

    def __setstate__(self, state: tuple[int, float]) -> None:
        self.units, self.special = state


class ExactMatrix:
    """A symmetric ``n x n`` matrix of :class:`ExactSum` (its upper triangle): float64 matrices
    added in any order and grouping give the same ``value()``, bit for bit.

    >>> a, b = ExactMatrix(2), ExactMatrix(2)
    >>> a.add(np.array([[1e16, 1.0], [1.0, 2.0]])); b.add(np.array([[-1e16, 0.0], [0.0, 1.0]]))
    >>> a.merge(b); a.value().tolist()
    [[0.0, 1.0], [1.0, 3.0]]
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.sums = [ExactSum() for _ in range(n * (n + 1) // 2)]

    def add(self, matrix) -> None:
        """Add a symmetric float64 matrix (a numpy array; its upper triangle is read)."""
        rows, cols = _upper(self.n)
        for acc, x in zip(self.sums, matrix[rows, cols].tolist()):
            acc.add(x)

    def merge(self, other: "ExactMatrix") -> None:
        for mine, theirs in zip(self.sums, other.sums):
            mine.merge(theirs)

    def value(self):
        """The sums, each rounded once, as a symmetric float64 numpy array."""
        out = np.zeros((self.n, self.n), dtype=np.float64)
        rows, cols = _upper(self.n)
        out[rows, cols] = [acc.value() for acc in self.sums]
        out[cols, rows] = out[rows, cols]
        return out


def _upper(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n)


class Blocks:
    """Cuts flat streams handed over in pieces of any length (in order, the streams' pieces
    of one length) into blocks of ``BLOCK`` consecutive entries counted from their first
    entry: a block cut by a piece's end is completed from the next piece, so the blocks do
    not depend on the cuts. ``emit`` gets one ``(rows, width)`` tensor per stream, a block a
    row (views of the pieces, or of the carried block's copy).

    >>> rows = []
    >>> blocks = Blocks()
    >>> blocks.feed([torch.arange(BLOCK + 3.0)], lambda r: rows.append(tuple(r[0].shape)))
    >>> blocks.feed([torch.arange(BLOCK - 1.0)], lambda r: rows.append(tuple(r[0].shape)))
    >>> blocks.finish(lambda r: rows.append(tuple(r[0].shape)))
    >>> rows == [(1, BLOCK), (1, BLOCK), (1, 2)]
    True
    """

    def __init__(self) -> None:
        self.carry: list[torch.Tensor] = []  # the start of a block cut by the last piece's end
        self.filled = 0

    def feed(self, flat: list[torch.Tensor], emit) -> None:
        count, start = flat[0].numel(), 0
        if self.filled:
            start = min(BLOCK - self.filled, count)
            for carry, f in zip(self.carry, flat):
                carry[self.filled:self.filled + start].copy_(f[:start])
            self.filled += start
            if self.filled < BLOCK:
                return
            emit([carry.view(1, BLOCK) for carry in self.carry])
            self.filled = 0
        full = (count - start) // BLOCK * BLOCK
        if full:
            emit([f[start:start + full].view(-1, BLOCK) for f in flat])
        rest = count - start - full
        if rest:
            if [(c.dtype, c.device) for c in self.carry] != [(f.dtype, f.device) for f in flat]:
                self.carry = [torch.empty(BLOCK, dtype=f.dtype, device=f.device) for f in flat]
            for carry, f in zip(self.carry, flat):
                carry[:rest].copy_(f[start + full:])
            self.filled = rest

    def finish(self, emit) -> None:
        """The last, short block (if any); the next feed starts a new stream."""
        if self.filled:
            emit([carry[:self.filled].view(1, -1) for carry in self.carry])
            self.filled = 0


class BlockSums:
    """An :class:`ExactSum` of float64 sums of ``x**2`` (or of ``x*y``, or ``|x|``) over blocks of ``BLOCK``
    consecutive entries, counted from each tensor's first entry, whether the tensor is handed
    over whole or in pieces (in order; a new tensor name starts a new tensor).

    A block cut by a piece's end is completed from the next piece, so the blocks, and the
    bits, do not depend on the cuts; each block by :func:`block_values`.
    """

    def __init__(self, products: bool, *, l1: bool = False) -> None:
        self.sum = ExactSum()
        self.products = products
        self.l1 = l1
        self._name: str | None = None
        self._blocks = Blocks()

    def add(self, name: str, tensors: list[torch.Tensor]) -> None:
        if name != self._name:
            self.flush()
            self._name = name
        self._blocks.feed([t.reshape(-1) for t in tensors[:2 if self.products else 1]], self._add_rows)

    def flush(self) -> None:
        """End the current tensor: its last, short block goes into the sum."""
        self._blocks.finish(self._add_rows)
        self._name = None

    def merge(self, other: "BlockSums") -> None:
        other.flush()
        self.flush()
        self.sum.merge(other.sum)

    def value(self) -> float:
        self.flush()
        return self.sum.value()

    def _add_rows(self, rows: list[torch.Tensor]) -> None:
        self.sum.add_all(block_values(rows[0], rows[1] if self.products else None, l1=self.l1))


class Sums:
    """For each ``(i, j)`` in ``pairs``, the sum over one tensor of ``x_i * x_j`` (squares
    when ``i == j``), by :class:`BlockSums`: the same numbers whether the tensor is handed
    over whole or in pieces of any length, in order."""

    def __init__(self, n_inputs: int, pairs: Sequence[tuple[int, int]]) -> None:
        self.pairs = list(pairs)
        self.sums = [BlockSums(products=i != j) for i, j in self.pairs]

    def add(self, pieces: Sequence[torch.Tensor]) -> None:
        """Add the next entries of each input (pieces of the same length, in input order)."""
        for (i, j), acc in zip(self.pairs, self.sums):
            acc.add("", [pieces[i]] if i == j else [pieces[i], pieces[j]])

    def add_whole(self, tensors: Sequence[torch.Tensor]) -> None:
        """Add whole tensors (:data:`PIECE` entries at a time: the same totals as one call)."""
        flat = [t.reshape(-1) for t in tensors]
        count = flat[0].numel()
        for start in range(0, count, PIECE):
            self.add([f[start:start + PIECE] for f in flat])

    def totals(self) -> list[float]:
        return [acc.value() for acc in self.sums]
