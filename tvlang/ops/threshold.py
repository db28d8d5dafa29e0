"""Exact whole-model magnitude threshold in two streaming passes (radix select).

``|x|`` of a float32 (float16 and bfloat16 convert exactly) is a non-negative
float whose bit pattern, read as an integer, is ordered like its value. Pass 1
counts the high 16 bits of every entry and finds the bin holding the k-th
largest magnitude; pass 2 counts the low 16 bits of the entries in that bin
and finds the exact value. Memory: two 65536-bin histograms, whatever the
model size. ``k = keep_count(density, total entries)`` as for per-tensor
pruning; ``k == 0`` gives ``inf`` (keep nothing). NaN sorts above ``inf``.
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

import torch

from tvlang.ops.common import _pick_bin, bits_to_float, histogram, keep_count
from tvlang.ops.context import TensorContext

__all__ = ["MagnitudeThreshold", "RadixSelect"]

_BINS = 1 << 16


def _bits(x: torch.Tensor) -> torch.Tensor:
    mag = x.reshape(-1).to(torch.float32).abs()
    return mag.view(torch.int32)


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
        bits = _bits(x)
        if pass_index == 0:
            self.total += bits.numel()
            self._high += histogram(bits >> 16, _BINS)
            return
        for high, counts in self._lows.items():
            # entries of this bin map to 1..65536; the others to 0 or 65537
            low = (bits - (high << 16)).clamp_(-1, _BINS).add_(1)
            counts += histogram(low, _BINS + 2)

    def want(self, k: int) -> None:
        high, rank = _pick_bin(self._high, k)
        self._wanted[k] = (high, rank)
        self._lows.setdefault(high, torch.zeros(_BINS + 2, dtype=torch.int64))

    def value(self, k: int) -> float:
        high, rank = self._wanted[k]
        low, _ = _pick_bin(self._lows[high][1:_BINS + 1], rank)
        return bits_to_float((high << 16) | low)


class MagnitudeThreshold:
    """The exact k-th largest ``|x|`` over all tensors streamed through it."""

    passes = 2

    def __init__(self, density: float) -> None:
        self.density = float(density)
        self._select = RadixSelect()
        self._k = 0
        self._result: float | None = None

    def update(self, pass_index: int, tensors: list[torch.Tensor], ctx: TensorContext) -> None:
        if pass_index == 0 or self._k > 0:
            self._select.update(pass_index, tensors[0])

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            self._k = keep_count(self.density, self._select.total)
            if self._k == 0:
                self._result = math.inf
            else:
                self._select.want(self._k)
        elif pass_index == 1 and self._k > 0:
            self._result = self._select.value(self._k)

    def result(self) -> float:
        if self._result is None:
            raise RuntimeError("MagnitudeThreshold.result() before both passes ended")
        return self._result
