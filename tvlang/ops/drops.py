"""DARE's drop rule without torch: which entries a seed drops, and by what survivors are scaled.

Both executors draw ``dare``'s masks here: the local one through
:class:`tvlang.ops.dare.Dropper`, the torch-free one (:mod:`tvlang.run.direct`) directly, so the
two drop the same entries. Each entry gets a 32-bit word from a PCG64 stream seeded by the
user's seed and the tensor name (:func:`tvlang.ops.context.seed_for`), its 64-bit outputs split
low half first; the entry is dropped when its word is below ``threshold`` (``ceil(p * 2**32)``).
Words are drawn in blocks of :data:`CHUNK` entries counted from the tensor's first entry, and a
block of ``n`` entries takes ``(n + 1) // 2`` outputs, so the mask depends on the seed, the name
and the tensor's size only.

>>> rule = DropRule(0.5, rescale=True)
>>> rule.threshold, rule.scale, rule.draws
(2147483648, 2.0, True)
>>> DropRule(0.0, rescale=True).words(10), DropRule(1.0, rescale=True).draws
(0, False)
>>> DropRule(0.5, rescale=False).words(CHUNK + 3)  # a full block's words, then the last 3 entries'
131074
>>> import numpy
>>> mask = rule.mask(numpy.random.PCG64(1), 8)
>>> sorted(set(mask.tolist())), mask.dtype
([0.0, 2.0], dtype('float32'))
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy

from tvlang.ops.native import drop_mask_f32

__all__ = ["CHUNK", "DropRule", "L1_EPS", "l1_factor"]

CHUNK = 1 << 18  # entries per block of words
#: mergekit 0.1.5's ``rescaled_masked_tensor`` leaves a tensor unscaled when its L1 norm
#: before or after the mask is below this
L1_EPS = 1e-7


def l1_factor(before: float, after: float) -> float | None:
    """``rescale_by="l1"``: the factor that restores an input's L1 norm ``before`` to its drop, whose
    norm is ``after``; ``None`` (left unscaled) when either is below :data:`L1_EPS`.

    >>> l1_factor(6.0, 4.0), l1_factor(6.0, 0.0)
    (1.5, None)
    """
    return before / after if before >= L1_EPS and after >= L1_EPS else None


@dataclass(frozen=True)
class DropRule:
    """Drop each entry with probability ``p``; a kept entry is multiplied by ``scale``
    (``1 / (1 - p)`` when ``rescale``, else 1). Where ``p`` is 0 or at least 1 (or so close
    to 1 that ``threshold`` reaches ``2**32``) nothing is drawn (:attr:`draws` is false): every
    entry is kept as it is, or every entry is zero."""

    p: float
    rescale: bool

    @property
    def threshold(self) -> int:
        return math.ceil(self.p * 2.0**32) if 0.0 < self.p < 1.0 else 0

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p) if self.rescale and self.p < 1.0 else 1.0

    @property
    def draws(self) -> bool:
        return 0.0 < self.p < 1.0 and self.threshold < 2**32

    @property
    def keeps_all(self) -> bool:
        """Without drawing: whether every entry is kept as it is (else every entry is zero)."""
        return self.p <= 0.0

    def words(self, numel: int) -> int:
        """How many 64-bit outputs dropping ``numel`` entries draws."""
        if not self.draws:
            return 0
        full, rest = divmod(numel, CHUNK)
        return full * ((CHUNK + 1) // 2) + (rest + 1) // 2

    def mask(self, bits, n: int, dtype=numpy.float32, out: numpy.ndarray | None = None) -> numpy.ndarray:
        """The next ``n`` entries' mask from ``bits`` (a numpy ``PCG64``): ``scale`` where an entry
        is kept, else 0, in ``dtype`` (float32, or float64 for float64 data). ``n`` is a block's
        size (:data:`CHUNK`, or what is left of the tensor): ``bits`` moves on ``(n + 1) // 2``
        outputs. float32 masks come from the compiled helper where it is built (the same values
        in about half the time), in ``out`` where given (a float32 buffer of at least ``n``
        entries: a fresh 1 MiB array for each block costs its pages' faults)."""
        if dtype == numpy.float32:
            mask = drop_mask_f32(bits, n, self.threshold, self.scale, out)
            if mask is not None:
                return mask
        raw = bits.random_raw((n + 1) // 2)
        if sys.byteorder == "little":
            words = raw.view(numpy.uint32)[:n]
        else:  # pragma: no cover - the same words, low half first, on a big-endian machine
            words = numpy.empty(2 * raw.size, dtype=numpy.uint32)
            words[0::2], words[1::2] = raw & 0xFFFFFFFF, raw >> 32
            words = words[:n]
        mask = numpy.greater_equal(words, numpy.uint32(self.threshold)).astype(dtype)
        if self.scale != 1.0:
            mask *= dtype(self.scale)
        return mask
