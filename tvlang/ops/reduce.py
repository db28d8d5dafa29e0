"""Linear kernels (``mean``, ``sum``) and the whole-model reducers ``norm``, ``dot``, ``cos``.

Reducers accumulate in one streaming pass over every tensor of their inputs.
A tensor's sums (of squares, of products) are taken in float64 over fixed blocks
of ``tvlang.ops.sums.BLOCK`` consecutive entries counted from its first entry
(:class:`BlockSums`: one block is summed on one thread, so the bits do not depend
on torch's thread count, a Ray worker running one thread and the driver several,
nor on whether the tensor comes whole or in chunks), and the block sums of every
tensor are added exactly (:class:`ExactSum`), rounded once at the end. So a
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

from tvlang.ops.common import fresh
from tvlang.ops.context import TensorContext
from tvlang.ops.sums import BLOCK

__all__ = ["mean", "sum_", "BlockSums", "ExactSum", "NormReducer", "DotReducer", "CosReducer"]


def sum_(inputs: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    out = fresh(inputs[0])
    out.copy_(inputs[0])
    for x in inputs[1:]:
        out.add_(x)
    return out


def mean(inputs: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return sum_(inputs, ctx).div_(len(inputs))


ROWS = 64  # blocks multiplied in float64 at a time (8 MiB of temporaries)
_UNIT_BITS = 1074  # 2**-1074 is the smallest float64: every finite float is a whole number of these


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


class BlockSums:
    """An :class:`ExactSum` of float64 sums of ``x**2`` (or of ``x*y``) over blocks of ``BLOCK``
    consecutive entries, counted from each tensor's first entry, whether the tensor is handed
    over whole or in pieces (in order; a new tensor name starts a new tensor).

    A block cut by a piece's end is completed from the next piece, so the blocks, and the
    bits, do not depend on the cuts. Squares go through ``vector_norm`` in float64 (no
    overflow for large float32 values); products in float64 (exact for float32 values),
    a few rows at a time. Not :class:`tvlang.ops.sums.Sums` (the same idea for kernels
    fed pieces of any length), which converts every entry to float64 before squaring:
    several times slower, and a reduction pass reads the whole model.
    """

    def __init__(self, products: bool) -> None:
        self.sum = ExactSum()
        self.products = products
        self._name: str | None = None
        self._carry: list[torch.Tensor] = []  # the start of a block cut by the last piece's end
        self._filled = 0

    def add(self, name: str, tensors: list[torch.Tensor]) -> None:
        if name != self._name:
            self.flush()
            self._name = name
        flat = [t.reshape(-1) for t in tensors[:2 if self.products else 1]]
        count, start = flat[0].numel(), 0
        if self._filled:
            start = min(BLOCK - self._filled, count)
            for carry, f in zip(self._carry, flat):
                carry[self._filled:self._filled + start].copy_(f[:start])
            self._filled += start
            if self._filled < BLOCK:
                return
            self._add_rows([carry.view(1, BLOCK) for carry in self._carry])
            self._filled = 0
        full = (count - start) // BLOCK * BLOCK
        if full:
            self._add_rows([f[start:start + full].view(-1, BLOCK) for f in flat])
        rest = count - start - full
        if rest:
            if [(c.dtype, c.device) for c in self._carry] != [(f.dtype, f.device) for f in flat]:
                self._carry = [torch.empty(BLOCK, dtype=f.dtype, device=f.device) for f in flat]
            for carry, f in zip(self._carry, flat):
                carry[:rest].copy_(f[start + full:])
            self._filled = rest

    def flush(self) -> None:
        """End the current tensor: its last, short block goes into the sum."""
        if self._filled:
            self._add_rows([carry[:self._filled].view(1, -1) for carry in self._carry])
            self._filled = 0
        self._name = None

    def merge(self, other: "BlockSums") -> None:
        other.flush()
        self.flush()
        self.sum.merge(other.sum)

    def value(self) -> float:
        self.flush()
        return self.sum.value()

    def _add_rows(self, rows: list[torch.Tensor]) -> None:
        if self.products:  # in float64, ROWS rows at a time: exact products of float32 values
            values = torch.cat([torch.sum(rows[0][i:i + ROWS].to(torch.float64).mul_(rows[1][i:i + ROWS]), dim=1)
                                for i in range(0, rows[0].shape[0], ROWS)])
        else:
            values = torch.linalg.vector_norm(rows[0], dim=1, dtype=torch.float64).square_()
        self.sum.add_all(values.tolist())


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
        aa, bb = self._aa.value(), self._bb.value()
        if aa == 0.0 or bb == 0.0:
            return 0.0
        return max(-1.0, min(1.0, self._dot.value() / math.sqrt(aa * bb)))
