"""Random kernels: ``dare`` and ``random_like`` (DELLA's sampling: tvlang/ops/della.py).

Every random draw comes from a stream seeded by the user's seed and the tensor
name (``ctx.bits(seed)`` for ``dare``'s masks, ``ctx.generator(seed)`` for the
others): the same seed and tensor name give the same result whatever order
tensors are processed in. Two calls with the same seed on the same tensor draw
the same mask: give independent calls different seeds.

>>> from tvlang.ops.context import TensorContext
>>> x = torch.ones(6)
>>> dare([x], TensorContext("w"), p=1.0)
tensor([0., 0., 0., 0., 0., 0.])
>>> bool(torch.equal(dare([x], TensorContext("w"), p=0.0), x))
True
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy
import torch

from tvlang.ops.coefficients import noise_scale
from tvlang.ops.common import fresh, helper_thread, kernel_of
from tvlang.ops.context import TensorContext
from tvlang.ops.drops import CHUNK, L1_EPS, DropRule, l1_factor
from tvlang.ops.native import normal_f32
from tvlang.ops.sums import PIECE, BlockSums, Sums

__all__ = ["dare", "random_like", "Noise", "noise_scale", "drop_random", "Dropper", "restore_l1", "L1Norms", "L1_EPS"]


AHEAD = 4  # blocks a Dropper has drawn ahead of the one in use (4 MiB of float32 masks)


class Dropper:
    """DARE's random drop applied to a tensor's entries in order, in pieces of any size.

    Each entry gets a 32-bit random word ``r`` from a PCG64 bit generator
    (``ctx.bits(seed)``): its 64-bit outputs split into two words, low half first.
    The entry is dropped when ``r < ceil(p * 2**32)`` (so it is kept with
    probability ``1 - p`` to within 2**-32) and a kept entry is divided by ``1 - p``
    when ``rescale``. Words are drawn on the CPU in blocks of ``CHUNK`` entries
    counted from the start of the tensor, whatever the pieces handed to
    :meth:`apply`: the mask depends on the seed, the tensor name and the tensor's
    size only, so a tensor dropped whole or chunk by chunk, on the CPU or a GPU,
    loses the same entries. float32 masks come from the compiled helper where it is
    built (:mod:`tvlang.ops.native`: the same masks, drawn in about half the time).
    """

    def __init__(self, p: float, bits, rescale: bool, numel: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.rule = DropRule(float(p), bool(rescale))
        # the mask holds 0 or the rescale factor, in float64 for float64 data (else float32)
        self._mask_dtype = numpy.float64 if dtype == torch.float64 else numpy.float32
        self.bits = bits
        self.numel = numel
        self.device = torch.device(device)
        self.block: torch.Tensor | None = None  # the current block's mask
        self.host: numpy.ndarray | None = None  # the same mask in host memory (its keep flags: != 0)
        self.pos = 0  # entries done
        self.block_end = 0  # entries covered by the blocks drawn so far
        self._ahead: deque[Future] = deque()  # the next blocks' masks, being drawn in the background
        self._drawn_end = 0  # entries covered by the blocks taken or being drawn

    @staticmethod
    def words(p: float, numel: int) -> int:
        """How many 64-bit words dropping ``numel`` entries with probability ``p`` draws."""
        return DropRule(float(p), False).words(numel)

    def _take_block(self) -> tuple[torch.Tensor, numpy.ndarray]:
        """The next block's mask; up to ``AHEAD`` blocks after it are being drawn on the drawing thread.

        Blocks are drawn one after another from this dropper's own bit generator (the one
        drawing thread takes them in the order they were asked for), always the same sizes
        in the same order, so the masks do not depend on the thread; the words and
        comparisons (numpy, without the GIL) overlap the caller's arithmetic. Several blocks
        ahead keep that thread busy while the caller works on other inputs (``dare`` over
        three inputs at 1.5 GB: the caller waited 3.6 s for masks with one block ahead).
        """
        if self._ahead:
            block = self._ahead.popleft().result()
        else:
            size = min(CHUNK, self.numel - self._drawn_end)
            block = self._draw(size)
            self._drawn_end += size
        while len(self._ahead) < AHEAD and self._drawn_end < self.numel:
            size = min(CHUNK, self.numel - self._drawn_end)
            self._ahead.append(_drawing_thread().submit(self._draw, size))
            self._drawn_end += size
        return block

    def _draw(self, size: int) -> tuple[torch.Tensor, numpy.ndarray]:
        """The next ``size`` entries' mask (on the device) and the same mask as a numpy array."""
        mask = self.rule.mask(self.bits, size, self._mask_dtype)
        block = torch.from_numpy(mask)
        return block if self.device.type == "cpu" else block.to(self.device), mask

    def apply(self, x: torch.Tensor, out: torch.Tensor, flags: list | None = None) -> torch.Tensor:
        """Write the drop of the next ``x.numel()`` entries (``x`` flat) into ``out``; with
        ``flags``, append to it their keep flags (numpy bool arrays, in order)."""
        n = x.numel()
        if self.pos + n > self.numel:
            raise ValueError(f"dare: {self.pos + n} entries handed over, the tensor has {self.numel}")
        if not self.rule.draws:
            keep = self.rule.keeps_all
            self.pos += n
            if flags is not None:
                flags.append(numpy.full(n, keep))
            return out.copy_(x) if keep else out.zero_()
        done = 0
        while done < n:
            if self.pos == self.block_end:
                size = min(CHUNK, self.numel - self.pos)
                self.block, self.host = self._take_block()
                self.block_end += size
            take = min(n - done, self.block_end - self.pos)
            offset = self.pos % CHUNK
            torch.mul(x[done:done + take], self.block[offset:offset + take], out=out[done:done + take])
            if flags is not None:
                flags.append(self.host[offset:offset + take] != 0)  # a kept entry's mask is 1 or 1/(1-p)
            done += take
            self.pos += take
        return out


def _drawing_thread() -> ThreadPoolExecutor:
    """The background thread that draws masks, shared by every Dropper of the process."""
    return helper_thread("draw")


def drop_random(x: torch.Tensor, p: float, bits, rescale: bool, out: torch.Tensor) -> torch.Tensor:
    """Write DARE of ``x`` into ``out`` (see :class:`Dropper`: the same mask, in one go)."""
    Dropper(p, bits, rescale, x.numel(), x.device, x.dtype).apply(x.reshape(-1), out.view(-1))
    return out


class L1Norms:
    """Each input's L1 norm before and after its drop, and the factor that restores it.

    Summed by :class:`tvlang.ops.sums.BlockSums` (magnitudes in float64 over fixed blocks
    counted from the tensor's first entry, added exactly): a tensor handed over whole
    (:func:`restore_l1`) or chunk by chunk (the chunk forms' pass before the main one) gives
    the same norms, bit for bit, so the same factor.
    """

    def __init__(self, n_inputs: int) -> None:
        self.sums = [(BlockSums(False, l1=True), BlockSums(False, l1=True)) for _ in range(n_inputs)]

    def add(self, i: int, x: torch.Tensor, kept: torch.Tensor) -> None:
        """The next entries of input ``i`` (flat or not) and of its drop ``kept``."""
        before, after = self.sums[i]
        before.add("", [x])
        after.add("", [kept])

    def add_whole(self, i: int, x: torch.Tensor, kept: torch.Tensor) -> None:
        """A whole input and its drop, :data:`PIECE` entries at a time (no float64 copy of the
        whole tensor; the same sums as any other cuts)."""
        flat, flat_kept = x.reshape(-1), kept.reshape(-1)
        for start in range(0, flat.numel(), PIECE):
            self.add(i, flat[start:start + PIECE], flat_kept[start:start + PIECE])

    def factors(self) -> list[float | None]:
        """Per input, ``before / after``, or ``None`` (left unscaled) when either norm is below
        :data:`L1_EPS`, as mergekit 0.1.5's ``rescaled_masked_tensor``."""
        out: list[float | None] = []
        for before, after in self.sums:
            out.append(l1_factor(before.value(), after.value()))
        return out


def restore_l1(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale ``kept`` (``x`` with entries dropped) in place so that its L1 norm is ``x``'s, as
    mergekit 0.1.5 rescales (``rescale: true``); unscaled when either norm is below
    :data:`L1_EPS`. Norms: :class:`L1Norms`, as the chunk forms'."""
    norms = L1Norms(1)
    norms.add_whole(0, x, kept)
    (factor,) = norms.factors()
    return kept.mul_(factor) if factor is not None else kept


@kernel_of("dare")
def dare(inputs: list[torch.Tensor], ctx: TensorContext, *, p: float, seed: float, rescale: bool,
         rescale_by: str) -> torch.Tensor:
    """Drop each entry with probability ``p``; rescale survivors by ``1/(1-p)``
    (``rescale_by="probability"``) or to the tensor's L1 norm (``"l1"``)."""
    (x,) = inputs
    l1 = bool(rescale) and rescale_by == "l1"
    out = drop_random(x, float(p), ctx.bits(seed), bool(rescale) and not l1, fresh(x))
    return restore_l1(x, out) if l1 else out


class Noise:
    """Standard Gaussian noise for a tensor's entries in order, in pieces of any size.

    Drawn on the CPU by numpy's ``Generator`` over the ``ctx.bits(seed)`` stream (ziggurat,
    float32, or float64 for float64 data): it draws entry after entry, so pieces give the
    same noise as one draw of the whole tensor, on every device. float32 noise comes from the
    compiled helper where it is built (:func:`tvlang.ops.native.normal_f32`: numpy's draws, bit
    for bit, in about a quarter of the time).
    """

    def __init__(self, bits, dtype: torch.dtype, device: torch.device | str) -> None:
        self.bits = bits
        self.rng = numpy.random.Generator(bits)
        self.dtype = numpy.float64 if dtype == torch.float64 else numpy.float32
        self.device = torch.device(device)

    def next(self, n: int) -> torch.Tensor:
        drawn = normal_f32(self.bits, n) if self.dtype == numpy.float32 else None
        noise = torch.from_numpy(self.rng.standard_normal(n, dtype=self.dtype) if drawn is None else drawn)
        return noise if self.device.type == "cpu" else noise.to(self.device)


@kernel_of("random_like")
def random_like(inputs: list[torch.Tensor], ctx: TensorContext, *, seed: float) -> torch.Tensor:
    """Standard Gaussian noise (:class:`Noise`) rescaled to ``x``'s Frobenius norm (zeros for a
    zero tensor). Norms: :class:`tvlang.ops.sums.Sums`, as the chunk form."""
    (x,) = inputs
    noise = Noise(ctx.bits(seed), x.dtype, x.device).next(x.numel()).view(x.shape)
    sums = Sums(2, [(0, 0), (1, 1)])
    sums.add_whole([x, noise])
    return noise.mul_(noise_scale(sums.totals())).to(x.dtype)
