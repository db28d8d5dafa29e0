"""Counts and exact k-th largest magnitudes without torch: the pieces of the magnitude rule
(:mod:`tvlang.ops.common`'s module docstring) that the torch-free executor
(:mod:`tvlang.run.direct`) shares with the kernels.

A float32's ``|x|`` read as the int32 bit pattern ``raw & 0x7FFFFFFF`` is ordered as the
magnitudes (NaN above ``inf``), so ranks are found on bit patterns: a window of patterns guessed
from a sorted sample (:func:`window_of`), the entries gathered inside it and the count above it
(:func:`read_window`), or a 65,536-bin histogram of the high 16 bits (:func:`pick_bin`).

>>> keep_count(0.29, 100), keep_count(0.2, 3, "mergekit"), truncated_count(0.2, 3)
(29, 1, 0)
>>> import numpy
>>> read_window([numpy.array([5, 7, 7, 6], dtype=numpy.int32)], above=2, k=4)  # 4th largest: 7, 2 of 2 tied
(7, 2, 2)
>>> pick_bin(numpy.array([4, 0, 3, 1]), 2)  # the 2nd largest is in bin 2, the 1st from its top
(2, 1)
>>> bits_to_float(0x3F800000)
1.0
"""

from __future__ import annotations

import math
import struct

import numpy

__all__ = ["keep_count", "truncated_count", "breadcrumb_counts", "breadcrumb_windows", "tie_span", "sample_ranges",
           "window_of", "read_window", "pick_bin", "bits_to_float", "SPREAD"]

#: standard deviations of a sampled rank's spread, on each side, that a window spans
SPREAD = 6.0


def keep_count(density: float, n: int, count: str = "floor") -> int:
    """Number of entries that ``density`` keeps out of ``n`` (see tvlang.ops.common's docstring)."""
    if count == "mergekit":
        if density >= 1.0:
            return n
        if density <= 0.0 or n == 0:
            return 0
        return min(max(1, int(density * n)), n)
    exact = density * n
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-6:
        return int(min(max(nearest, 0), n))
    return int(min(max(math.floor(exact), 0), n))


def truncated_count(fraction: float, n: int) -> int:
    """mergekit's ``int(fraction * n)``, within ``[0, n]`` (no tolerance, no minimum of one)."""
    return min(max(int(fraction * n), 0), n)


def breadcrumb_counts(density: float, gamma: float, n: int, count: str) -> tuple[int, int]:
    """``(keep, top)``: entries kept, and largest entries dropped before them (``top`` reduced
    to ``n - keep`` when both do not fit)."""
    if count == "mergekit":  # sparsify.magnitude_outliers: int(), no minimum; density >= 1 keeps all
        keep = n if density >= 1.0 else truncated_count(density, n)
        top = 0 if density >= 1.0 else truncated_count(gamma, n)
    else:
        keep, top = keep_count(density, n), keep_count(gamma, n)
    return keep, min(top, n - keep)


def breadcrumb_windows(low: float, high: float, low_split: tuple[int, int],
                       high_split: tuple[int, int]) -> list[tuple[float, float, float]]:
    """The tie windows, ``(magnitude, start, stop)`` (:class:`tvlang.ops.common.TieWindow`'s), that
    turn ``trim(x, low, high)`` (kept: ``low <= |x| < high``) into exactly the entries ranked
    ``top+1 .. top+keep``. ``low``/``high`` are the ``(top+keep)``-th and ``top``-th largest
    magnitudes (``high`` is ``inf`` without outliers), the splits their ``(need, tied)``."""
    (need_low, tied_low), (need_high, tied_high) = low_split, high_split
    if high == low:  # one tie group holds both cuts: entries need_high+1 .. need_low of it
        return [(low, need_high, need_low)] if low > 0.0 else []
    windows = []
    if high != math.inf and need_high < tied_high:
        windows.append((high, need_high, math.inf))  # ties below the outlier cut stay
    if low > 0.0 and need_low < tied_low:
        windows.append((low, 0, need_low))  # ties at the lower cut: only the first ones
    return windows


def tie_span(start: float, stop: float, seen: int, m: int) -> tuple[int, int]:
    """Of the ``m`` entries of a piece tied at a tie window's magnitude, numbered ``seen + 1`` to
    ``seen + m`` over the tensor: the positions ``[lo, hi)`` of those numbered in ``(start, stop]``
    (tvlang.ops.common.TieWindow's, and the torch-free executor's)."""
    lo = int(min(max(start - seen, 0), m))
    return lo, int(min(max(stop - seen, lo), m))


def sample_ranges(count: int, blocks: int, block: int) -> list[tuple[int, int]]:
    """``blocks`` runs of ``block`` entries spread evenly over ``count`` (the first at the start, the
    last at the end), or the whole tensor when it is not larger than them: where a threshold's
    window is guessed from."""
    if count <= blocks * block:
        return [(0, count)]
    span = count - block
    starts = [i * span // (blocks - 1) for i in range(blocks)]
    return [(start, start + block) for start in starts]


def window_of(bits: numpy.ndarray, s: int, k: int, n: int) -> tuple[int, int | None] | None:
    """The magnitudes (inclusive bit patterns ``lo, hi``; ``hi`` None: no upper end) that the k-th
    largest of ``n`` very likely falls in, from a sorted sample ``bits`` of ``s`` of them; ``None``
    when that window would hold more than an eighth of the entries."""
    q = k / n
    spread = SPREAD * math.sqrt(s * q * (1.0 - q)) + 8.0
    top = math.floor(q * s - spread)  # sample ranks from the top, 0-based
    bottom = math.ceil(q * s + spread)
    if min(bottom, s) - max(top, 0) > s / 8 or bottom >= s:
        return None
    lo = int(bits[s - 1 - bottom])
    hi = int(bits[s - 1 - top]) if top >= 0 else None
    return lo, hi


def read_window(inside: list[numpy.ndarray], above: int, k: int) -> tuple[int, int, int] | None:
    """``(bits, need, tied)`` of the k-th largest from the entries gathered inside its window (int32
    bit patterns of magnitudes) and the count of entries above it, or ``None`` when the k-th largest
    is not inside: ``need`` of the ``tied`` entries equal to it rank among the top k."""
    entries = numpy.concatenate(inside) if inside else numpy.empty(0, numpy.int32)
    rank = k - above  # the k-th largest is the rank-th largest inside the window
    if not 0 < rank <= entries.size:
        return None
    position = entries.size - rank
    kth = int(numpy.partition(entries, position)[position])
    greater = above + int(numpy.count_nonzero(entries > kth))
    return kth, k - greater, int(numpy.count_nonzero(entries == kth))


def pick_bin(counts: numpy.ndarray, k: int) -> tuple[int, int]:
    """The bin of histogram ``counts`` holding the k-th largest entry, and that entry's rank within
    the bin from the top."""
    at_or_above = numpy.cumsum(counts[::-1])[::-1]
    b = int(numpy.flatnonzero(at_or_above >= k)[-1])
    above = int(at_or_above[b + 1]) if b + 1 < counts.size else 0
    return b, k - above


def bits_to_float(pattern: int) -> float:
    """The float32 of bit pattern ``pattern``, as a Python float."""
    return struct.unpack("<f", struct.pack("<I", pattern))[0]
