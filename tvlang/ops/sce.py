"""SCE (Wan et al. 2024, FuseChat): select, calculate, erase, as mergekit 0.1.5's ``sce``.

For task vectors ``x_1..x_m`` of one tensor:

1. **Select** (``select_topk < 1``): the per-entry variance across the inputs
   (population variance, ``unbiased=False``); of the ``nz`` entries whose variance
   is not 0, the ``k`` with the largest variance are kept in every input, the
   others zeroed. ``k = keep_count(select_topk, nz)``, or mergekit's
   ``int(select_topk * nz)`` with ``count="mergekit"``; exactly ``k`` entries,
   equal variances ranked by flat index (docs/operators.md, shared rules).
2. **Calculate**: each input's weight is its mean square over the tensor (after
   selection), divided by the sum of the weights; uniform ``1/m`` when that sum is
   below 1e-6 (mergekit's rule).
3. **Erase**: the elected sign per entry is that of the sum of the inputs (0
   elects +); an input agrees where its sign is the elected one (a zero never
   does). The result is ``sum of agreeing w_i x_i / max(sum of agreeing w_i, 1e-6)``.

>>> from tvlang.ops.context import TensorContext
>>> a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 2.0, -1.0])
>>> sce([a, b], TensorContext("w"))  # weights 5/19 and 14/19
tensor([ 2.4737,  2.0000, -1.0000])
"""

from __future__ import annotations

import numpy
import torch

from tvlang.ops.coefficients import sce_weights
from tvlang.ops.common import (
    ChunkKernel,
    bits_to_float,
    chunk_form_of,
    fresh,
    keep_count,
    kernel_of,
    kth_largest_abs,
    scratch,
    settle_ties,
    truncated_count,
)
from tvlang.ops.context import TensorContext
from tvlang.ops.sums import BlockSums
from tvlang.ops.threshold import RadixSelect, read_window

__all__ = ["SceChunks", "sce", "sce_chunks", "select_by_variance", "variance"]

DIVISOR_EPS = 1e-6  # mergekit's sce_merge: the divisor is clamped to at least this


_BLOCK = 1 << 20  # entries of each input at a time in :func:`variance`


def variance(tvs: torch.Tensor) -> torch.Tensor:
    """``torch.var(tvs, dim=0, unbiased=False)``, bit for bit, block by block: Welford's
    update over the inputs in float64 (as torch's CPU kernel accumulates), rounded to
    ``tvs``' dtype once. torch's reduction over a short leading dimension took about 2.5 times
    as long (a strided reduction per entry), and this one needs a few blocks of memory only."""
    m = tvs.shape[0]
    flat = tvs.reshape(m, -1)
    out = torch.empty(flat.shape[1], dtype=tvs.dtype, device=tvs.device)
    for start in range(0, flat.shape[1], _BLOCK):
        block = flat[:, start:start + _BLOCK]
        like = block[0]
        mean, m2, xd, delta, tmp = (scratch(f"sce.{slot}", like, torch.float64)
                                    for slot in ("mean", "m2", "x", "delta", "tmp"))
        mean.zero_()
        m2.zero_()
        for n, x in enumerate(block, 1):  # mean += delta / n; m2 += delta * (x - mean)
            xd.copy_(x)
            torch.sub(xd, mean, out=delta)
            mean.add_(torch.div(delta, n, out=tmp))
            m2.add_(torch.sub(xd, mean, out=tmp).mul_(delta))
        out[start:start + _BLOCK] = m2.div_(m)
    return out.view(tvs.shape[1:])


def select_by_variance(tvs: torch.Tensor, select_topk: float, count: str) -> torch.Tensor:
    """The 0/1 mask (shape of one input) of the entries ``sce`` keeps: the ``k`` largest
    variances across the inputs (``tvs`` stacked on dim 0)."""
    var = variance(tvs)
    if select_topk <= 0.0:
        return torch.zeros_like(var)
    k = _count(select_topk, int(torch.count_nonzero(var)), count)
    if k == 0:
        return torch.zeros_like(var)
    t = kth_largest_abs(var, k)
    # var >= 0, and t > 0 since k <= the number of nonzero variances
    kept = torch.where(var >= t, var, torch.zeros_like(var))
    settle_ties(var, kept, t, k)
    return (kept != 0).to(var.dtype)


@kernel_of("sce")
def sce(inputs: list[torch.Tensor], ctx: TensorContext, *, select_topk: float, count: str) -> torch.Tensor:
    """SCE merge of the task vectors ``inputs`` (see the module docstring)."""
    m = len(inputs)
    tvs = torch.stack(inputs).reshape(m, -1)
    if float(select_topk) < 1.0:
        tvs.mul_(select_by_variance(tvs, float(select_topk), count).unsqueeze(0))
    squares = [_SquareSums() for _ in range(m)]
    for sums, tv in zip(squares, tvs):
        sums.add(tv)
    out = fresh(inputs[0])
    _erase(tvs, sce_weights([s.mean(tv.numel()) for s, tv in zip(squares, tvs)]), out.view(-1))
    return out


class _SquareSums:
    """An input's sum of squares over the tensor (:class:`BlockSums`: the same bits whole or in chunks)."""

    def __init__(self) -> None:
        self.sums = BlockSums(False)

    def add(self, tv: torch.Tensor) -> None:
        self.sums.add("", [tv])

    def mean(self, numel: int) -> float:
        return self.sums.value() / numel if numel else 0.0


def _erase(tvs: torch.Tensor, weights: list[float], out: torch.Tensor) -> torch.Tensor:
    """Elect the sign of the sum of the (selected) inputs ``tvs`` (stacked, flat; 0 elects +) and
    write the weighted mean of the agreeing ones into ``out`` (flat); entry by entry."""
    elected = torch.sign(tvs.sum(0))
    elected.add_(0.5).sign_()  # 0 elects +
    merged = torch.zeros_like(tvs[0])
    divisor = torch.zeros_like(tvs[0])
    for w, tv in zip(weights, tvs):
        agree = (torch.sign(tv) == elected).to(tv.dtype)
        merged.add_(tv * agree, alpha=w)
        divisor.add_(agree, alpha=w)
    return torch.div(merged, divisor.clamp_(min=DIVISOR_EPS), out=out)


class SceChunks(ChunkKernel):
    """``sce`` chunk by chunk. With ``0 < select_topk < 1``, pass 0 finds the radix bin of the
    k-th largest variance (the high 16 bits' histogram of :class:`RadixSelect`, ``k`` from the
    count of nonzero variances at the end of the pass). Pass 1 keeps, per chunk, a bit for each
    entry whose variance is above that bin and the positions and variances of the entries inside
    it (a few per mille); after it the k-th largest is the right one of those variances, and the
    selection (the first tied entries in flat order) is known without computing a variance
    again: the last pass before the results sums each selected input's
    squares (the whole kernel's block sums), then each chunk is selected and merged. Memory:
    a bit per entry of the tensor. The same selection, weights and results as :func:`sce`."""

    def __init__(self, n: int, numel: int, select_topk: float, count: str) -> None:
        self.numel, self.select_topk, self.count = numel, float(select_topk), count
        self.selecting = 0.0 < self.select_topk < 1.0
        self.passes = 3 if self.selecting else 1
        self.radix = RadixSelect() if self.selecting else None
        self.nonzero = self.k = self.above = 0  # above: entries ranked above the bin (NaN included)
        self.bounds: tuple[float, float] | None = None  # the threshold's bin
        # per chunk of pass 1: (bits of the entries above the bin, positions and values inside it)
        self.chunks: list[tuple[numpy.ndarray, torch.Tensor, torch.Tensor]] = []
        self.masks: list[numpy.ndarray] = []  # per chunk, the selection's bits
        self.at = 0  # the next chunk's index, in the passes after the selection
        self.squares = [_SquareSums() for _ in range(n)]
        self.weights: list[float] | None = None

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        tvs = _stacked(pieces)
        if pass_index < self.passes - 1:  # the selection's passes
            var = variance(tvs)
            if pass_index == 0:
                self.nonzero += int(torch.count_nonzero(var))
            elif self.k:
                lo, hi = self.bounds
                inside = torch.nonzero((var >= lo) & (var < hi)).view(-1)
                higher = var >= hi
                self.above += int(higher.sum()) + int(var.isnan().sum())  # the radix ranks NaN above inf
                self.chunks.append((numpy.packbits(higher.cpu().numpy()), inside.cpu(), var[inside].cpu()))
                return
            self.radix.update(pass_index, var)
            return
        for sums, tv in zip(self.squares, self._selected(tvs)):
            sums.add(tv)

    def end_pass(self, pass_index: int) -> None:
        if pass_index == self.passes - 1:
            self.weights = sce_weights([s.mean(self.numel) for s in self.squares])
        elif pass_index == 0:
            self.k = _count(self.select_topk, self.nonzero, self.count)
            if self.k:
                self.radix.want(self.k)
                self.bounds = self.radix.bin_bounds(self.k)
        elif self.k:
            self._select()
        self.at = 0

    def _select(self) -> None:
        """The selection's bits per chunk: above the bin, or inside it and above the threshold,
        or tied at it and among the first ``need`` tied ones (flat order)."""
        # the k-th largest is inside the bin (above: the entries ranked above it): its value, and
        # how many of the entries tied at it the top k hold
        inside_bits = [numpy.bitwise_and(values.float().numpy().view(numpy.int32), 0x7FFFFFFF)
                       for _, _, values in self.chunks]
        kth, need, _ = read_window(inside_bits, self.above, self.k)
        t = bits_to_float(kth)
        seen = 0
        for above, inside, values in self.chunks:
            keep = values > t
            tied = torch.nonzero(values == t).view(-1)
            keep[tied[:max(0, need - seen)]] = True
            seen += tied.numel()
            bits = numpy.unpackbits(above)  # padded to whole bytes: unpacked with the piece's length later
            bits[inside[keep].numpy()] = 1
            self.masks.append(numpy.packbits(bits))
        self.chunks = []

    def restart(self) -> None:
        self.at = 0

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        _erase(self._selected(_stacked(pieces)), self.weights, out.view(-1))

    def _selected(self, tvs: torch.Tensor) -> torch.Tensor:
        """The chunk's inputs (stacked, flat) times the selection mask, as :func:`select_by_variance`'s."""
        if self.select_topk >= 1.0:
            return tvs
        if self.select_topk <= 0.0 or self.k == 0:
            return tvs.mul_(torch.zeros_like(tvs[0]).unsqueeze(0))
        bits = numpy.unpackbits(self.masks[self.at], count=tvs.shape[1])
        self.at += 1
        mask = torch.from_numpy(bits).to(device=tvs.device, dtype=tvs.dtype)
        return tvs.mul_(mask.unsqueeze(0))


def _stacked(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces (flat) as the rows of a scratch matrix (changed in place by the selection)."""
    flat = [p.reshape(-1) for p in pieces]
    rows = scratch("sce.stacked", flat[0].expand(len(flat), -1))
    return torch.stack(flat, out=rows)


def _count(select_topk: float, nonzero: int, count: str) -> int:
    return truncated_count(select_topk, nonzero) if count == "mergekit" else keep_count(select_topk, nonzero)


@chunk_form_of("sce")
def sce_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, select_topk: float,
               count: str) -> SceChunks | None:
    """``None`` in float64 (the radix select compares float32 variances; the whole kernel, float64)."""
    return None if dtype == torch.float64 else SceChunks(n_inputs, numel, select_topk, count)
