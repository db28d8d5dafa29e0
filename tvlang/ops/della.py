"""DELLA (Deep et al. 2024): ``della`` and ``della_linear``, whole tensors and chunk forms.

Each input is sampled by MAGPRUNE (:class:`Magprune`): within each row (``x.reshape(x.shape[0],
-1)``; a vector is one row) of ``m`` entries ranked ``r = 0 .. m-1`` by increasing ``|x|``
(ties by position), an entry is kept with probability ``density - epsilon + 2*epsilon*r/(m-1)``
(``density`` when ``m == 1``) and, with ``rescale``, divided by it. The samples are then merged
as in TIES (:func:`tvlang.ops.ties.sign_merge`; ``elect="none"`` for ``della_linear``) and
scaled by ``lambda``.

Ranks are per row, so a piece of a tensor made of whole rows is sampled on its own: the chunk
form (:func:`della_chunks`) asks the evaluator for chunks cut at row ends (``row``) and needs
no pass before its results. Randomness is keyed by entry: each entry gets one 32-bit word of
the ``ctx.bits(seed)`` stream (PCG64 outputs split low half first), input ``i`` starting where
input ``i-1``'s words end, and is kept when ``word / 2**32 < probability``. So a tensor sampled
whole, row block by row block, or chunk by chunk keeps the same entries, on every device.
(Before 0.3, ``della`` drew from torch's generator over the whole tensor at once: the same seed
now keeps other entries.)

``rescale_by="l1"`` scales each input's kept entries together to its L1 norm: the norms
before and after sampling are sums over the whole input, so the chunk form (and the
whole-tensor kernel, over its blocks of rows) first runs one pass that samples every input and
sums them (:class:`tvlang.ops.dare.L1Norms`), then samples again, the same words, and scales.

>>> from tvlang.ops.context import TensorContext
>>> x = torch.tensor([[0.1, -0.5, 0.3, 2.0, -1.0]])
>>> della([x], TensorContext("w"), density=1.0, elect="none", merge="sum")
tensor([[ 0.1000, -0.5000,  0.3000,  2.0000, -1.0000]])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy
import torch

from tvlang.ops.common import ChunkKernel, chunk_form_of, fresh, helper_thread, kernel_of, scratch
from tvlang.ops.context import TensorContext
from tvlang.ops.dare import L1Norms, restore_l1
from tvlang.ops.magprune import MAX_ROW, SAVED_BITS_LIMIT, Words, input_bits, row_length, sample_rows
from tvlang.ops.native import library
from tvlang.ops.ties import sign_merge

__all__ = ["Magprune", "Words", "della", "della_linear", "della_chunks", "della_linear_chunks", "della_sample",
           "rank_order", "row_length"]

#: entries per block when a whole tensor is sampled (whole rows; at least one row)
BLOCK = 1 << 18
#: entries of a block from which rank_order sorts half its rows on a helper thread
SPLIT_SORT = 1 << 15


def _sort_thread() -> ThreadPoolExecutor:
    """The helper thread that sorts half of a block's rows (one per process)."""
    return helper_thread("sort")


def rank_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the column indices ordered by increasing ``|x|`` (ties by position).

    float32 magnitudes sort like their int32 bit patterns (below 2**31). On the
    CPU each entry's key is its bit pattern shifted left past the column number,
    plus the column number: the keys of a row are distinct, so any sort orders
    them as the stable sort would, and numpy's row-wise sort of int64 keys
    (vectorized) is about 3.5x faster than torch's argsort; the columns are the
    low bits of the sorted keys. Elsewhere (or rows longer than 2**32), a flat
    stable sort of integer keys (row number in the high bits), about twice as
    fast as a row-wise float argsort.
    """
    if rows.dtype != torch.float32:
        return torch.argsort(rows.abs(), dim=1, stable=True)
    count, m = rows.shape
    bits = rows.abs().view(torch.int32)
    shift = max(1, (m - 1).bit_length())
    if rows.device.type == "cpu" and shift <= 32:  # keys below 2**(31 + shift) <= 2**63
        source = bits.detach().numpy()
        key = numpy.empty((count, m), dtype=numpy.int64)
        columns = numpy.arange(m, dtype=numpy.int64)

        def sort_rows(start: int, stop: int) -> None:  # numpy lets go of the GIL in each step
            part = key[start:stop]
            part[...] = source[start:stop]
            part <<= shift
            part |= columns
            part.sort(axis=1)
            part &= (1 << shift) - 1

        # The rows of a block split between this thread and a helper: the sort is most of
        # della's time (18.5 ns an entry on one thread, 10.2 ns on two, rows of 4,096), and
        # rows sort independently, to the same keys.
        half = count // 2 if count >= 2 and count * m >= SPLIT_SORT and (os.cpu_count() or 1) > 1 else 0
        helper = _sort_thread().submit(sort_rows, 0, half) if half else None
        sort_rows(half, count)
        if helper is not None:
            helper.result()
        return torch.from_numpy(key)
    if count == 1:
        return torch.argsort(bits.reshape(-1), stable=True).view(1, m)
    starts = torch.arange(count, dtype=torch.int64, device=rows.device).unsqueeze(1)
    key = bits.to(torch.int64).add_(starts << 31)
    flat = torch.argsort(key.view(-1), stable=True).view(count, m)
    return flat.sub_(starts * m)


class Magprune:
    """MAGPRUNE of one input, whole rows of ``m`` entries at a time, in order (see the module).

    ``rescale`` divides a kept entry by its probability; without it kept entries are unchanged
    (``rescale_by="l1"`` scales them afterwards: ``_Della``, :func:`della_sample`).
    """

    def __init__(self, density: float, epsilon: float, bits, rescale: bool, m: int) -> None:
        self.density, self.epsilon, self.rescale, self.m = density, epsilon, rescale, m
        self.words = Words(bits)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Sample the next whole rows ``x`` (any shape holding ``k*m`` entries) into ``out``."""
        if self.density >= 1.0:
            return out.copy_(x)
        if self.density <= 0.0:
            return out.zero_()
        if self._native(x, out, None):
            return out
        prob, kept = self._draw(x)
        rows = x.reshape(prob.shape)
        flat = out.view(rows.shape)
        if self.rescale:
            torch.div(rows, prob, out=flat)
            return out.mul_(kept.view(out.shape))
        return torch.mul(rows, kept, out=flat).view(out.shape)

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """The next whole rows' keep flags (bool, one row of ``m`` a row), as :meth:`apply` draws
        them (``0 < density < 1``)."""
        flags = numpy.empty(x.numel(), dtype=numpy.uint8)
        if self._native(x, None, flags):
            return torch.from_numpy(flags).view(torch.bool).view(-1, self.m)
        return self._draw(x)[1]

    def _native(self, x: torch.Tensor, out: torch.Tensor | None, flags: numpy.ndarray | None) -> bool:
        """:meth:`apply` (into ``out``) or :meth:`kept` (into ``flags``, 0 or 1 a byte) by the compiled
        helper (:func:`tvlang.ops.magprune.sample_rows`: the same words, ranks, probabilities,
        comparisons and products as :meth:`_draw` and :meth:`apply`, bit for bit;
        tests/test_native.py): float32 CPU tensors, blocks of rows shared with the sort thread. ``False``
        where the helper cannot (nothing drawn)."""
        lib = library()
        n, m = x.numel(), self.m
        plain = x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
        if out is not None:
            plain = plain and out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous()
        st = self.words.state() if lib is not None and plain and n and m <= MAX_ROW else None
        if st is None:
            return False
        sample_rows(lib, st, x.data_ptr(), n, m, self.density, self.epsilon, self.rescale,
                    out.data_ptr() if out is not None else None, flags,
                    _sort_thread() if (os.cpu_count() or 1) > 1 else None)
        self.words.set_state(st)
        return True

    def _draw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.m
        rows = x.reshape(-1, m)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        ranks = scratch("della.ranks", rows, work)
        if m > 1:
            ramp = torch.arange(m, dtype=work, device=x.device).expand_as(rows)
            ranks.scatter_(1, rank_order(rows), ramp)
            prob = ranks.mul_(2.0 * self.epsilon / (m - 1)).add_(self.density - self.epsilon)
        else:
            prob = ranks.fill_(self.density)
        u = torch.from_numpy(self.words.next(rows.numel()).astype(numpy.float64)).view(rows.shape)
        u = u.to(x.device).mul_(2.0 ** -32)
        return prob, torch.lt(u, prob)


def della_sample(x: torch.Tensor, density: float, epsilon: float, bits, rescale: bool, out: torch.Tensor,
                 rescale_by: str = "probability") -> torch.Tensor:
    """MAGPRUNE of a whole tensor ``x`` into ``out``, words from ``bits`` (see the module);
    ``rescale_by="l1"``: kept entries scaled together to ``x``'s L1 norm instead."""
    l1 = rescale and rescale_by == "l1"
    sampler = Magprune(density, epsilon, bits, rescale and not l1, row_length(x.shape))
    _blocks([x], out, lambda pieces, target: sampler.apply(pieces[0], target), sampler.m)
    return restore_l1(x, out) if l1 and 0.0 < density < 1.0 else out


def _blocks(inputs: list[torch.Tensor], out: torch.Tensor | None, apply, m: int) -> None:
    """``apply(pieces, out_piece)`` over blocks of whole rows, in order (``out_piece`` ``None``
    without ``out``)."""
    flats = [x.reshape(-1) for x in inputs]
    flat_out = out.view(-1) if out is not None else None
    step = max(1, BLOCK // max(m, 1)) * max(m, 1)
    for start in range(0, flats[0].numel(), step):
        s = slice(start, start + step)
        apply([f[s] for f in flats], flat_out[s] if flat_out is not None else None)


class _Della(ChunkKernel):
    """Every input's MAGPRUNE (input ``i``'s words from where input ``i-1``'s end), then the
    merge and ``lambda``; pieces of whole rows. ``l1`` (``rescale_by="l1"``, ``0 < density <
    1``): a pass first samples every input and sums its L1 norms before and after
    (:class:`L1Norms`); the main pass samples again and scales each input's kept entries."""

    def __init__(self, ctx: TensorContext, numel: int, n: int, m: int, density: float, epsilon: float, seed: float,
                 rescale: bool, factor: float, merge_options: dict, l1: bool = False) -> None:
        l1 = l1 and 0.0 < density < 1.0
        self.args = (ctx, numel, n, density, epsilon, seed, rescale and not l1)
        self.row = max(m, 1)
        self.factor, self.merge_options = factor, merge_options
        self.norms = L1Norms(n) if l1 else None
        self.passes = 1 if l1 else 0
        # l1: the pass keeps each entry's keep flag (one bit) for the main pass, which then
        # neither ranks (sorts) nor draws again, when the bits of every input take at most
        # SAVED_BITS_LIMIT bytes; past that it ranks and draws again (the same flags).
        self.saved = [[] for _ in range(n)] if l1 and n * ((numel + 7) // 8) <= SAVED_BITS_LIMIT else None
        self.scales: list[float | None] = [None] * n
        self.restart()

    def _from_saved(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Input ``i``'s next piece with the flags its pass kept: the same values as
        ``Magprune.apply`` (``x * kept``; no division: l1 scales afterwards)."""
        bits = self.saved[i].pop(0)
        kept = torch.from_numpy(numpy.unpackbits(bits, count=x.numel()).view(numpy.bool_)).to(x.device)
        return torch.mul(x.reshape(-1), kept, out=scratch(f"della.part{i}", x).view(-1)).view(x.shape)

    def restart(self) -> None:
        ctx, numel, n, density, epsilon, seed, rescale = self.args
        self.samplers = [Magprune(density, epsilon, bits, rescale, self.row)
                         for bits in input_bits(ctx, seed, n, numel)]

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        for i, (s, x) in enumerate(zip(self.samplers, pieces)):  # (0 < density < 1 here)
            kept = s.kept(x)
            self.norms.add(i, x, torch.mul(x.reshape(kept.shape), kept, out=scratch("della.kept", kept, x.dtype)))
            if self.saved is not None:
                self.saved[i].append(numpy.packbits(kept.cpu().numpy().reshape(-1)))

    def end_pass(self, pass_index: int) -> None:
        self.scales = self.norms.factors()

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        if self.saved is not None and self.saved[0]:
            parts = [self._from_saved(i, x) for i, x in enumerate(pieces)]
        else:
            parts = [s.apply(x, scratch(f"della.part{i}", x)) for i, (s, x) in enumerate(zip(self.samplers, pieces))]
        for part, scale in zip(parts, self.scales):
            if scale is not None:
                part.mul_(scale)
        sign_merge(parts, out=out, **self.merge_options)
        if self.factor != 1.0:
            out.mul_(self.factor)


def _options(density, epsilon, rescale, elect, merge, weights, elect_on, scale) -> tuple:
    return (float(density), float(epsilon), bool(rescale), float(scale["lambda"]),
            dict(elect=elect, merge=merge, weights=weights, elect_on=elect_on))


@kernel_of("della")
def della(
    inputs: list[torch.Tensor],
    ctx: TensorContext,
    *,
    density: float,
    epsilon: float,
    seed: float,
    rescale: bool,
    rescale_by: str,
    elect: str,
    merge: str,
    weights: Sequence[float],
    elect_on: str,
    **scale: float,
) -> torch.Tensor:
    """DELLA: MAGPRUNE sampling of each input, sign election (or none), merge, times ``lambda``
    (a Python keyword, so it arrives in ``scale``). Whole rows a block at a time, as the chunk form."""
    density, epsilon, rescale, factor, merge_options = _options(density, epsilon, rescale, elect, merge, weights,
                                                                elect_on, scale)
    first = inputs[0]
    out = fresh(first)
    form = _Della(ctx, first.numel(), len(inputs), row_length(first.shape), density, epsilon, seed, rescale, factor,
                  merge_options, l1=rescale and rescale_by == "l1")
    if form.passes:  # rescale_by="l1": every input's norms first, over the same blocks of rows
        _blocks(inputs, None, lambda pieces, _: form.observe(0, pieces), form.row)
        form.end_pass(0)
        form.restart()
    _blocks(inputs, out, form.apply, form.row)
    return out


@kernel_of("della_linear")
def della_linear(inputs: list[torch.Tensor], ctx: TensorContext, **options) -> torch.Tensor:
    """``della`` without sign election (mergekit's ``della_linear``)."""
    return della(inputs, ctx, elect="none", elect_on="weighted", **options)


@chunk_form_of("della")
def della_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, density: float,
                 epsilon: float, seed: float, rescale: bool, rescale_by: str, elect: str, merge: str,
                 weights: Sequence[float], elect_on: str, **scale: float) -> ChunkKernel:
    """Chunks of whole rows (``ctx.shape``; a tensor of unknown shape is one row)."""
    density, epsilon, rescale, factor, merge_options = _options(density, epsilon, rescale, elect, merge, weights,
                                                                elect_on, scale)
    m = row_length(ctx.shape) if ctx.shape is not None else numel
    return _Della(ctx, numel, n_inputs, m, density, epsilon, seed, rescale, factor, merge_options,
                  l1=rescale and rescale_by == "l1")


@chunk_form_of("della_linear")
def della_linear_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, **options
                        ) -> ChunkKernel:
    return della_chunks.__wrapped__(ctx, numel, n_inputs, dtype, elect="none", elect_on="weighted", **options)
