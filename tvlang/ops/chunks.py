"""Chunk forms of kernels: the evaluator runs them inside its chunked programs.

A chunked program computes a tensor a chunk of entries at a time, from reading the
inputs to handing the result to the writer, so no whole-tensor temporary is ever
made (see tvlang/run/evaluate.py). A kernel can take part when its result, entry by
entry, is a function of the same entries of its inputs once a few per-tensor
numbers are known:

- ``dare``: the mask is drawn in blocks counted from the start of the tensor
  (:class:`tvlang.ops.dare.Dropper`), so pieces give the same mask;
- ``dare_ties``: each input's drop has its own bit generator, advanced to where the
  whole-tensor kernel's shared stream would be when it reaches that input;
- ``rescale_by="l1"`` (``dare``, ``dare_ties``, ``dare_linear``; ``della``'s in its module):
  one pass first draws the masks and sums each input's L1 norm before and after its drop
  (:class:`tvlang.ops.dare.L1Norms`, the whole-tensor kernel's block sums), then the main
  pass draws the same masks again and scales each input's kept entries;
- ``ties``, ``topk``, ``breadcrumbs``: the per-tensor magnitude thresholds are found
  first, exactly, in one pass from a window guessed from a sample of the inputs
  (:class:`tvlang.ops.threshold.WindowSelect`; a radix select's two passes more where
  the window misses), with how many entries tied at each
  threshold the top ``k`` hold: the same thresholds as the whole-tensor kernels,
  and the same tie-break (the first tied entries in flat order, counted across
  chunks by a :class:`tvlang.ops.common.TieWindow`), so the same results. With
  ``scope="model"`` the thresholds come from the earlier whole-model passes and no
  pass is needed;
- ``random_like``: one pass sums the squares of the input and of its noise
  (:class:`tvlang.ops.sums.Sums`, the whole-tensor kernel's sums), then the noise is drawn
  again from the same stream and scaled.

Beside their kernels: ``della``/``della_linear`` (tvlang/ops/della.py: chunks of whole
rows), ``slerp`` and ``model_stock`` (a pass for norms and dot products), the Gram merges,
``sce`` (a radix select of the variances, then a pass for the squares).

The protocol (tvlang/ops/registry.py): ``CHUNKED[name](ctx, numel, n_inputs, dtype,
**options)`` returns a chunk kernel, or ``None`` where the options need the whole
tensor (float64 magnitudes are compared exactly, in float64, by the whole-tensor
kernels). A chunk kernel has ``passes``, ``observe(pass_index, pieces)``,
``end_pass(pass_index)``, ``restart()`` and ``apply(pieces, out)``.

>>> from tvlang.ops.context import TensorContext
>>> x = torch.tensor([0.5, -3.0, 1.0, 2.0])
>>> k = topk_chunks(TensorContext("w"), 4, 1, torch.float32, density=0.5)
>>> for p in range(k.passes):
...     k.observe(p, [x[:3]]); k.observe(p, [x[3:]]); k.end_pass(p)
>>> out = torch.empty(4); k.restart()
>>> k.apply([x[:1]], out[:1]); k.apply([x[1:]], out[1:]); out
tensor([ 0., -3.,  0.,  2.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy
import torch

from tvlang.ops import native
from tvlang.ops.common import ChunkKernel, TieWindow, chunk_form_of, keep_count, scratch
from tvlang.ops.context import TensorContext
from tvlang.ops.dare import Dropper, L1Norms, Noise, noise_scale
from tvlang.ops.della import SAVED_BITS_LIMIT
from tvlang.ops.prune import breadcrumb_counts, breadcrumb_windows, model_threshold, trim
from tvlang.ops.sums import Sums
from tvlang.ops.threshold import WindowSelect
from tvlang.ops.ties import CHUNK as MERGE_CHUNK
from tvlang.ops.ties import merge_in_chunks, scaled, sign_merge

__all__ = ["ChunkKernel", "Elementwise", "dare_chunks", "dare_ties_chunks", "dare_linear_chunks", "ties_chunks",
           "topk_chunks", "breadcrumbs_chunks", "random_like_chunks"]


class Elementwise(ChunkKernel):
    """The chunk form of an element-wise kernel (``ELEMENTWISE``): the kernel itself, on each piece."""

    def __init__(self, kernel, ctx: TensorContext, options: dict) -> None:
        self.kernel, self.ctx, self.options = kernel, ctx, options

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        out.copy_(self.kernel(pieces, self.ctx, **self.options))


class _Thresholds(ChunkKernel):
    """Per input, the ``k``-th largest magnitude of each rank in ``ranks``: a window guessed from
    a sample, then one pass (three where a window misses: :class:`WindowSelect`). ``l1``
    (``rescale_by="l1"``, where an entry may be pruned): one pass more, once the thresholds are
    known, sums each input's L1 norm before and after its pruning (``kept``: :class:`L1Norms`,
    the whole-tensor kernels' sums), and ``factors`` then restore each input's norm."""

    def __init__(self, n_inputs: int, numel: int, ranks: list[int], device: torch.device | str = "cpu",
                 l1: bool = False) -> None:
        self.ranks = [k for k in ranks if 0 < k < numel] if numel else []
        self.numel = numel
        self.selects = [WindowSelect(numel, self.ranks) for _ in range(n_inputs)] if self.ranks else []
        # on a GPU the radix select's histograms stay on the device (the window's gathers are numpy's)
        self.sampling = bool(self.selects) and torch.device(device).type == "cpu"
        self.values: list[dict[int, float]] = [{} for _ in range(n_inputs)]
        self.splits: list[dict[int, tuple[int, int]]] = [{} for _ in range(n_inputs)]
        self.norms = L1Norms(n_inputs) if l1 else None
        self.factors: list[float | None] = [None] * n_inputs

    @property
    def select_passes(self) -> int:  # grows after pass 0 where a window missed
        return max((select.passes for select in self.selects), default=0)

    @property
    def passes(self) -> int:
        return self.select_passes + (self.norms is not None)

    def kept(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:  # pragma: no cover - with l1 only
        """Each input's next pieces as pruned (tie windows counted on), for the L1 pass."""
        raise NotImplementedError

    def sample(self, pieces: list[torch.Tensor]) -> None:
        for select, x in zip(self.selects, pieces):
            select.sample(x)

    def end_sample(self) -> None:
        for select in self.selects:
            select.end_sample()

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        if pass_index >= self.select_passes:  # the L1 pass
            for i, (x, part) in enumerate(zip(pieces, self.kept(pieces))):
                self.norms.add(i, x, part)
            return
        for select, x in zip(self.selects, pieces):
            select.update(pass_index, x)

    def end_pass(self, pass_index: int) -> None:
        if pass_index >= self.select_passes:  # the L1 pass
            self.factors = self.norms.factors()
            return
        for select in self.selects:
            select.end_pass(pass_index)
        if pass_index == self.select_passes - 1:  # every select is done
            for i, select in enumerate(self.selects):
                for k in self.ranks:
                    self.values[i][k] = select.value(k)
                    self.splits[i][k] = select.tied(k)
            if self.norms is not None:
                self.restart()  # the tie windows, counted from the start of the L1 pass

    def kth(self, i: int, k: int) -> float:
        """The k-th largest magnitude of input ``i`` (``0`` for ``k >= numel``, ``inf`` for ``k == 0``)."""
        if k <= 0:
            return math.inf
        if k >= self.numel:
            return 0.0
        return self.values[i][k]

    def split(self, i: int, k: int) -> tuple[int, int]:
        """``(need, tied)`` at the k-th largest magnitude of input ``i`` (:meth:`RadixSelect.tied`)."""
        return self.splits[i][k] if 0 < k < self.numel else (0, 0)

    def window(self, i: int, k: int) -> TieWindow | None:
        """The tie-break at the k-th largest magnitude of input ``i``, or ``None`` when every
        tied entry is kept anyway."""
        t = self.kth(i, k)
        if not 0.0 < t < math.inf:
            return None
        need, tied = self.split(i, k)
        return TieWindow(t, 0, need) if need < tied else None


def _whole_float64(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


# -- dare and dare_ties --------------------------------------------------------------


class _Drops(ChunkKernel):
    """Each input's DARE drop (input ``i``'s words from where the whole-tensor kernel's shared
    stream reaches it), then ``merge(parts, out)``. ``l1`` (``rescale_by="l1"``): one pass
    first draws the masks and sums each input's L1 norm before and after its drop
    (:class:`L1Norms`), keeping each entry's keep flag (a bit) when every input's flags take
    at most ``SAVED_BITS_LIMIT`` bytes; the main pass multiplies by the kept flags (past the
    limit: draws the same masks again) and scales each input's kept entries by its factor,
    as :func:`tvlang.ops.dare.restore_l1` scales the whole tensor's."""

    def __init__(self, ctx: TensorContext, numel: int, n: int, p: float, seed: float, rescale: bool, l1: bool,
                 dtype: torch.dtype, merge) -> None:
        self.args = (ctx, numel, n, p, seed, rescale and not l1, dtype)
        self.merge = merge
        self.norms = L1Norms(n) if l1 else None
        self.passes = 1 if l1 else 0
        self.factors: list[float | None] = [None] * n
        self.droppers = self._droppers()
        # with l1 the droppers' masks hold 0 and 1 only (no 1/(1-p)): a flag a bit. Not where
        # nothing is drawn (p 0 or 1: every entry kept, or zeros, as drawing again gives)
        self.saved = ([[] for _ in range(n)] if l1 and Dropper.words(p, numel)
                      and n * ((numel + 7) // 8) <= SAVED_BITS_LIMIT else None)

    def _droppers(self) -> list[Dropper]:
        ctx, numel, n, p, seed, rescale, dtype = self.args
        droppers = []
        for i in range(n):
            bits = ctx.bits(seed)
            bits.advance(i * Dropper.words(p, numel))  # where the shared stream reaches input i
            droppers.append(Dropper(p, bits, rescale, numel, ctx.device, dtype))
        return droppers

    def restart(self) -> None:
        if any(d.pos for d in self.droppers):
            self.droppers = self._droppers()

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        for i, (d, x) in enumerate(zip(self.droppers, pieces)):
            flags: list[numpy.ndarray] | None = [] if self.saved is not None else None
            self.norms.add(i, x, d.apply(x, scratch("chunks.kept", x), flags))
            if flags is not None:
                self.saved[i].append(numpy.packbits(flags[0] if len(flags) == 1 else numpy.concatenate(flags)))

    def end_pass(self, pass_index: int) -> None:
        self.factors = self.norms.factors()

    def _from_saved(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Input ``i``'s next piece times the flags its pass kept: ``x * mask`` as drawing again gives
        (the mask is 0 or 1 with l1; ``x * False`` is ``x * 0.0``, NaN for an infinity as well),
        then times its L1 factor (the compiled helper does both in one pass)."""
        flat, factor = x.reshape(-1), self.factors[i]
        packed = self.saved[i].pop(0)
        if native.flags_scale_f32(flat, packed, factor, out.view(-1)) is not None:
            return out.view(-1)
        kept = torch.from_numpy(numpy.unpackbits(packed, count=flat.numel()).view(numpy.bool_))
        part = torch.mul(flat, kept.to(x.device), out=out.view(-1))
        return part if factor is None else part.mul_(factor)

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        if self.saved is not None and self.saved[0]:
            parts = [self._from_saved(i, x, scratch(f"chunks.part{i}", x) if self.merge else out)
                     for i, x in enumerate(pieces)]
        else:
            parts = [d.apply(x, scratch(f"chunks.part{i}", x) if self.merge else out)
                     for i, (d, x) in enumerate(zip(self.droppers, pieces))]
            for part, factor in zip(parts, self.factors):
                if factor is not None:
                    part.mul_(factor)
        if self.merge:
            self.merge(parts, out)


def _l1(rescale: bool, rescale_by: str) -> bool:
    return bool(rescale) and rescale_by == "l1"


@chunk_form_of("dare")
def dare_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, p: float, seed: float,
                rescale: bool, rescale_by: str) -> ChunkKernel:
    return _Drops(ctx, numel, 1, float(p), seed, bool(rescale), _l1(rescale, rescale_by), dtype, None)


@chunk_form_of("dare_ties")
def dare_ties_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, p: float, seed: float,
                     rescale: bool, rescale_by: str, elect: str, merge: str, weights: Sequence[float],
                     elect_on: str) -> ChunkKernel:
    options = dict(elect=elect, merge=merge, weights=weights, elect_on=elect_on)
    return _Drops(ctx, numel, n_inputs, float(p), seed, bool(rescale), _l1(rescale, rescale_by), dtype,
                  lambda parts, out: merge_in_chunks(parts, out, **options))


@chunk_form_of("dare_linear")
def dare_linear_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, p: float, seed: float,
                       rescale: bool, rescale_by: str, merge: str, weights: Sequence[float]) -> ChunkKernel:
    options = dict(elect="none", merge=merge, weights=weights, elect_on="weighted")
    return _Drops(ctx, numel, n_inputs, float(p), seed, bool(rescale), _l1(rescale, rescale_by), dtype,
                  lambda parts, out: merge_in_chunks(parts, out, **options))


# -- magnitude pruning: ties, topk, breadcrumbs ------------------------------------------


class _Ties(_Thresholds):
    main_pass_cores = True  # the trims and the sign merge: about 25 torch calls a block

    def __init__(self, n, numel, k, fixed, merge_options, device, l1: bool = False) -> None:
        # rescale_by="l1" takes its pass only where an entry may be pruned (not at density 1)
        super().__init__(n, numel, [] if fixed is not None else [k], device,
                         l1=l1 and (fixed is not None or 0 < k < numel))
        self.n, self.k = n, k
        self.fixed = fixed
        self.merge_options = merge_options
        self.windows: list[TieWindow | None] = [None] * n

    def restart(self) -> None:
        if self.fixed is None:
            self.windows = [self.window(i, self.k) for i in range(self.n)]

    def _trimmed(self, flats: list[torch.Tensor], s: slice) -> list[torch.Tensor]:
        parts = []
        for i, x in enumerate(flats):
            part = trim(x[s], self.fixed[i] if self.fixed is not None else self.kth(i, self.k), slot=f"chunks.part{i}")
            if self.windows[i] is not None:
                self.windows[i].apply(x[s], part)
            parts.append(part)
        return parts

    def kept(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._trimmed([x.reshape(-1) for x in pieces], slice(None))

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        flats, flat_out = [x.reshape(-1) for x in pieces], out.view(-1)
        for start in range(0, flat_out.numel(), MERGE_CHUNK):  # the merge's temporaries in the CPU cache
            s = slice(start, start + MERGE_CHUNK)
            sign_merge(scaled(self._trimmed(flats, s), self.factors, "chunks.scaled"), out=flat_out[s],
                       **self.merge_options)


@chunk_form_of("ties")
def ties_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, density: float, elect: str,
                merge: str, weights: Sequence[float], elect_on: str, scope: str, count: str,
                rescale_by: str) -> ChunkKernel | None:
    if _whole_float64(dtype):
        return None
    fixed = [model_threshold("ties", ctx, i) for i in range(n_inputs)] if scope == "model" else None
    return _Ties(n_inputs, numel, keep_count(float(density), numel, count), fixed,
                 dict(elect=elect, merge=merge, weights=weights, elect_on=elect_on), ctx.device, rescale_by == "l1")


class _Pruned(_Thresholds):
    """A pruner of one input (``_prune(x, out)``: the next piece pruned into ``out``), then scaled
    by its L1 factor with ``rescale_by="l1"``."""

    def _prune(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def kept(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._prune(pieces[0], scratch("chunks.kept", pieces[0]))]

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        self._prune(pieces[0], out)
        if self.factors[0] is not None:
            out.mul_(self.factors[0])


class _Topk(_Pruned):
    def __init__(self, numel, k, fixed, device, l1: bool = False) -> None:
        super().__init__(1, numel, [] if fixed is not None else [k], device,
                         l1=l1 and (fixed is not None or 0 < k < numel))
        self.k, self.fixed = k, fixed
        self.tie_window: TieWindow | None = None

    def restart(self) -> None:
        if self.fixed is None:
            self.tie_window = self.window(0, self.k)

    def _prune(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        trim(x, self.fixed if self.fixed is not None else self.kth(0, self.k), slot="chunks.part0", into=out)
        if self.tie_window is not None:
            self.tie_window.apply(x, out)
        return out


@chunk_form_of("topk")
def topk_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, density: float,
                scope: str, count: str, rescale_by: str) -> ChunkKernel | None:
    if _whole_float64(dtype):
        return None
    fixed = model_threshold("topk", ctx, 0) if scope == "model" else None
    return _Topk(numel, keep_count(float(density), numel, count), fixed, ctx.device, rescale_by == "l1")


class _Breadcrumbs(_Pruned):
    def __init__(self, numel, keep, top, device, l1: bool = False) -> None:
        super().__init__(1, numel, [top + keep, top] if 0 < keep < numel else [], device, l1=l1 and 0 < keep < numel)
        self.keep, self.top = keep, top
        self.windows: list[TieWindow] = []

    def restart(self) -> None:
        if 0 < self.keep < self.numel:
            low, high = self.kth(0, self.top + self.keep), self.kth(0, self.top) if self.top > 0 else math.inf
            self.windows = breadcrumb_windows(low, high, self.split(0, self.top + self.keep),
                                              self.split(0, self.top) if self.top > 0 else (0, 0))

    def _prune(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.keep == 0:
            return out.zero_()
        if self.keep >= self.numel:
            return out.copy_(x)
        low = self.kth(0, self.top + self.keep)
        high = self.kth(0, self.top) if self.top > 0 else math.inf
        trim(x, low, high, slot="chunks.part0", into=out)
        for window in self.windows:
            window.apply(x, out)
        return out


@chunk_form_of("breadcrumbs")
def breadcrumbs_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, density: float,
                       gamma: float, count: str, rescale_by: str) -> ChunkKernel | None:
    if _whole_float64(dtype):
        return None
    keep, top = breadcrumb_counts(float(density), float(gamma), numel, count)
    return _Breadcrumbs(numel, keep, top, ctx.device, rescale_by == "l1")


# -- random_like -----------------------------------------------------------------------


class _RandomLike(ChunkKernel):
    """One pass for the norms of the input and of its noise (:class:`Sums`, the noise drawn
    once to be measured), then the same noise drawn again, scaled, piece by piece."""

    passes = 1

    def __init__(self, ctx: TensorContext, seed: float, dtype: torch.dtype) -> None:
        self.make = lambda: Noise(ctx.bits(seed), dtype, ctx.device)
        self.noise = self.make()
        self.sums = Sums(2, [(0, 0), (1, 1)])
        self.scale = 0.0

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        self.sums.add([pieces[0], self.noise.next(pieces[0].numel())])

    def end_pass(self, pass_index: int) -> None:
        self.scale = noise_scale(self.sums.totals())

    def restart(self) -> None:
        self.noise = self.make()

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        out.copy_(self.noise.next(out.numel()).mul_(self.scale))


@chunk_form_of("random_like")
def random_like_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *,
                       seed: float) -> ChunkKernel:
    return _RandomLike(ctx, seed, dtype)
