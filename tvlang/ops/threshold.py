"""Exact whole-model magnitude threshold in two streaming passes (radix select).

``|x|`` of a float32 (float16 and bfloat16 convert exactly) is a non-negative
float whose bit pattern, read as an integer, is ordered like its value. Pass 1
counts the high 16 bits of every entry and finds the bin holding the k-th
largest magnitude; pass 2 gathers the entries in that bin (usually a few per
mille) and counts their low 16 bits, which gives the exact value. Memory: two
65536-bin histograms, whatever the model size. The histograms add, so a pass can be split among copies of the
reducer fed different tensors and merged (``merge``) into the same result.
``k = keep_count(density, total entries, count)`` as for per-tensor
pruning; ``k == 0`` gives ``inf`` (keep nothing). Every entry tied at the
threshold is kept (whole-model scope breaks no ties: docs/operators.md). NaN sorts above ``inf``.
float64 inputs are rounded to float32 first.

>>> from tvlang.ops.context import TensorContext
>>> r = MagnitudeThreshold(0.5)
>>> for p in range(r.passes):
...     r.update(p, [torch.tensor([1.0, -4.0])], TensorContext("a"))
...     r.update(p, [torch.tensor([3.0, 2.0])], TensorContext("b"))
...     r.end_pass(p)
>>> r.result()
3.0
"""

from __future__ import annotations

import math
import sys

import numpy
import torch

from tvlang.ops.common import _pick_bin, bits_to_float, histogram, keep_count, scratch
from tvlang.ops.context import TensorContext
from tvlang.ops.native import window_gather
from tvlang.ops.ranks import read_window, window_of

__all__ = ["MagnitudeThreshold", "RadixSelect", "WindowSelect", "read_window"]

_BINS = 1 << 16


class RadixSelect:
    """The exact k-th largest ``|x|`` for a few ranks ``k``, over entries streamed in pieces.

    Two passes over the same entries in the same order: ``update(0, piece)`` for
    every piece, then ``want(k)`` for each rank (``1 <= k <= total``), then
    ``update(1, piece)`` for every piece again, then ``value(k)``.
    Memory: 65536-bin histograms, one plus one per distinct bin wanted.
    """

    passes = 2

    def __init__(self) -> None:
        self.total = 0
        self._high = torch.zeros(_BINS, dtype=torch.int64)
        self._lows: dict[int, torch.Tensor] = {}
        self._wanted: dict[int, tuple[int, int]] = {}

    def update(self, pass_index: int, x: torch.Tensor) -> None:
        flat = x.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.to(torch.float32)
        raw = flat.view(torch.int32)
        if not raw.is_contiguous():  # pragma: no cover - the evaluator's pieces are contiguous
            raw = raw.contiguous()
        if pass_index == 1 and not self._lows:
            return
        # the high 16 bits of |x|: the sign bit cleared. Read as the high int16 half of
        # each word (no shift), in int16, which torch.bincount counts faster than int32.
        half = raw.view(torch.int16)[1::2] if sys.byteorder == "little" else raw.view(torch.int16)[0::2]
        high = torch.bitwise_and(half, 0x7FFF, out=scratch("radix.high", half))
        if pass_index == 0:
            self.total += raw.numel()
            self._high += histogram(high, _BINS)
            return
        for bin_, counts in self._lows.items():
            _count_low_bits(raw, high, bin_, counts)

    def merge(self, pass_index: int, other: "RadixSelect") -> None:
        """Add the counts that ``other`` (a copy of this select taken before ``pass_index``,
        fed other entries) made in that pass: counts add exactly, in any order."""
        if pass_index == 0:
            self.total += other.total
            self._high += other._high
            return
        for high, counts in self._lows.items():
            counts += other._lows[high]

    def want(self, k: int) -> None:
        high, rank = _pick_bin(self._high, k)
        self._wanted[k] = (high, rank)
        self._lows.setdefault(high, torch.zeros(_BINS, dtype=torch.int64))

    def bin_bounds(self, k: int) -> tuple[float, float]:
        """After ``want(k)``: the magnitudes ``[lo, hi)`` of the bin holding the k-th largest
        (``|x| >= hi`` ranks above it, ``|x| < lo`` below; ``hi`` is ``inf`` for the top finite bin)."""
        high, _ = self._wanted[k]
        return bits_to_float(high << 16), bits_to_float((high + 1) << 16)

    def value(self, k: int) -> float:
        high, rank = self._wanted[k]
        low, _ = _pick_bin(self._lows[high], rank)
        return bits_to_float((high << 16) | low)

    def tied(self, k: int) -> tuple[int, int]:
        """``(need, tied)``: of the ``tied`` entries whose magnitude equals the k-th largest,
        the top ``k`` hold ``need`` (the rest rank below them)."""
        high, rank = self._wanted[k]
        low, need = _pick_bin(self._lows[high], rank)
        return need, int(self._lows[high][low])


def _count_low_bits(raw: torch.Tensor, high: torch.Tensor, bin_: int, counts: torch.Tensor) -> None:
    """Add to ``counts`` (65536, int64) the low 16 bits of the entries of ``raw`` (float32 bit
    patterns) whose high bits ``high`` (int16, sign cleared) are ``bin_``.

    Only those entries are gathered (usually a few per mille of a piece) and counted: a
    histogram of every entry (the others spread over counters of their own) took about four
    times as long, most of it cache misses over its 131072 counters."""
    if raw.device.type == "cpu":
        # numpy compares and gathers int16/bool arrays several times faster than torch here
        inside = numpy.equal(high.numpy(), bin_, out=scratch("radix.inside", high, torch.bool).numpy())
        picked = torch.from_numpy(raw.numpy()[inside])
    else:
        picked = torch.masked_select(raw, high == bin_).cpu()
    if picked.numel():
        low = picked.bitwise_and_(0xFFFF)
        counts.index_add_(0, low, torch.ones(1, dtype=torch.int64).expand(low.numel()))


# Entries of a piece handled at a time by the window pass: its temporaries stay in the CPU's
# L2 cache (a whole 2^20-entry chunk at once took about twice as long here).
_BLOCK = 1 << 17


class WindowSelect:
    """The exact k-th largest ``|x|`` for a few ranks ``k`` of ``numel`` entries, in one pass
    over the pieces in the common case, in three where it must fall back.

    Without a sample it is a :class:`RadixSelect` (two passes). With one: ``sample(piece)``
    for a few pieces taken across the tensor (any number, any positions), then
    ``end_sample()``: each rank gets a window of magnitudes that its k-th largest very likely
    falls in (its rank in the sample, ``SPREAD`` (tvlang.ops.ranks) standard deviations of a sampled rank to
    each side). Pass 0 counts the entries above each window and gathers the (few) entries
    inside it; at its end, a rank whose k-th largest falls inside its window reads it, and
    how many of the entries tied there the top ``k`` hold, from the gathered entries. When
    one does not, or the gathered entries outgrow ``limit``, ``passes`` grows from 1 to 3 and
    passes 1 and 2 are a :class:`RadixSelect`'s two (``fell_back``); a sample too thin for a
    window of at most an eighth of the entries gives the radix select from the start. The
    same values every way, exactly: they are read from the same bit patterns of ``|x|``
    (float32; NaN above ``inf``). Memory: the sample and the gathered windows, at most
    ``SPREAD / sqrt(sample size)`` of the entries and a few more (a sample of 65,536: 2.3 %;
    1.9 % at density 0.2).
    """

    def __init__(self, numel: int, ranks: list[int], limit: int | None = None) -> None:
        self.numel = numel
        self.ranks = list(ranks)
        self.limit = limit if limit is not None else max(1 << 16, min(numel // 8, 1 << 23))
        self.passes = 2
        self.fell_back = False
        self._sample: list[numpy.ndarray] = []
        self._windows: dict[int, tuple[int, int | None]] = {}  # k -> (lo, hi) bit patterns, inclusive
        self._above: dict[int, int] = {}
        self._inside: dict[int, list[numpy.ndarray]] = {}
        self._gathered = 0
        self._found: dict[int, tuple[int, int, int]] = {}  # k -> (bits, need, tied)
        self._radix: RadixSelect | None = RadixSelect()  # until a sample gives windows
        self._radix_from = 0
        self._buffers: tuple[numpy.ndarray, ...] | None = None

    def sample(self, x: torch.Tensor) -> None:
        self._sample.append(numpy.bitwise_and(_raw_bits(x), 0x7FFFFFFF))

    def end_sample(self) -> None:
        bits = numpy.sort(numpy.concatenate(self._sample)) if self._sample else numpy.empty(0, numpy.int32)
        self._sample = []
        s = bits.size
        for k in self.ranks:
            window = window_of(bits, s, k, self.numel) if s else None
            if window is None:
                self._windows = {}
                break
            self._windows[k] = window
        if self._windows:
            self._radix = None
            self.passes = 1
            self._above = dict.fromkeys(self._windows, 0)
            self._inside = {k: [] for k in self._windows}
        else:
            self._fall_back(0)

    def update(self, pass_index: int, x: torch.Tensor) -> None:
        if pass_index >= self.passes:
            return
        if self._radix is not None:
            if pass_index >= self._radix_from:
                self._radix.update(pass_index - self._radix_from, x)
            return
        if self._gathered > self.limit:
            return
        raw = _raw_bits(x)
        if self._buffers is None:
            self._buffers = (numpy.empty(_BLOCK + 1, numpy.int32), numpy.empty(_BLOCK, bool), numpy.empty(_BLOCK, bool))
        for start in range(0, raw.size, _BLOCK):
            part = raw[start:start + _BLOCK]
            if self._gather_natively(part):
                continue
            block, inside, above = (b[:part.size] for b in self._buffers)
            numpy.bitwise_and(part, 0x7FFFFFFF, out=block)
            for k, (lo, hi) in self._windows.items():
                numpy.greater_equal(block, lo, out=inside)
                if hi is not None:
                    numpy.greater(block, hi, out=above)
                    self._above[k] += int(numpy.count_nonzero(above))
                    numpy.logical_xor(inside, above, out=inside)
                picked = block[inside]
                self._inside[k].append(picked)
                self._gathered += picked.size
        if self._gathered > self.limit:  # not the narrow window hoped for: fall back, free them
            self._inside = {}

    def _gather_natively(self, part: numpy.ndarray) -> bool:
        """Pass 0 over one block in the compiled helper (tvlang/ops/native.py: the same entries
        gathered and counted in one loop instead of five numpy passes); False without it."""
        for k, (lo, hi) in self._windows.items():
            done = window_gather(part, lo, hi, self._buffers[0])
            if done is None:
                return False
            picked, above = done
            self._above[k] += above
            self._inside[k].append(picked)
            self._gathered += picked.size
        return True

    def end_pass(self, pass_index: int) -> None:
        if pass_index >= self.passes:
            return
        if self._radix is not None:
            if pass_index == self._radix_from:
                for k in self.ranks:
                    self._radix.want(k)
            return
        if self._gathered <= self.limit:
            for k in self.ranks:
                found = read_window(self._inside[k], self._above[k], k)
                if found is None:
                    break
                self._found[k] = found
            else:
                self._inside = {}
                return
        self._found = {}
        self._inside = {}
        self._fall_back(1)

    def _fall_back(self, start: int) -> None:
        self.fell_back = start > 0
        self._radix = RadixSelect()
        self._radix_from = start
        self.passes = start + 2

    def value(self, k: int) -> float:
        if self._radix is not None:
            return self._radix.value(k)
        return bits_to_float(self._found[k][0])

    def tied(self, k: int) -> tuple[int, int]:
        """As :meth:`RadixSelect.tied`."""
        if self._radix is not None:
            return self._radix.tied(k)
        return self._found[k][1:]


def _raw_bits(x: torch.Tensor) -> numpy.ndarray:
    """The float32 bit patterns of ``x`` as int32, on the CPU (``& 0x7FFFFFFF``: those of ``|x|``,
    ordered as the magnitudes, NaN above inf)."""
    flat = x.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.contiguous().numpy().view(numpy.int32)


class MagnitudeThreshold:
    """The exact k-th largest ``|x|`` over all tensors streamed through it."""

    passes = 2

    def __init__(self, density: float, count: str = "floor") -> None:
        self.density = float(density)
        self.count = count
        self._select = RadixSelect()
        self._k = 0
        self._result: float | None = None

    def update(self, pass_index: int, tensors: list[torch.Tensor], ctx: TensorContext) -> None:
        if pass_index == 0 or self._k > 0:
            self._select.update(pass_index, tensors[0])

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            self._k = keep_count(self.density, self._select.total, self.count)
            if self._k == 0:
                self._result = math.inf
            else:
                self._select.want(self._k)
        elif pass_index == 1 and self._k > 0:
            self._result = self._select.value(self._k)

    def merge(self, pass_index: int, other: "MagnitudeThreshold") -> None:
        """Add ``other``'s histogram of ``pass_index`` (``other``: a copy of this reducer taken
        before that pass, fed other tensors); then ``end_pass`` as after feeding them here."""
        if pass_index == 0 or self._k > 0:
            self._select.merge(pass_index, other._select)

    def result(self) -> float:
        if self._result is None:
            raise RuntimeError("MagnitudeThreshold.result() before both passes ended")
        return self._result
