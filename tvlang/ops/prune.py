"""Magnitude pruning: ``topk`` and ``breadcrumbs``.

Counts and ties follow :mod:`tvlang.ops.common`: ``k = keep_count(density, n, count)``
entries are kept, exactly, entries of equal magnitude ranked by flat index (the
earlier first). With ``scope="model"`` every entry tied at the whole-model
threshold is kept.

>>> from tvlang.ops.context import TensorContext
>>> ctx = TensorContext("w")
>>> topk([torch.tensor([0.5, -3.0, 1.0, 2.0])], ctx, density=0.5)
tensor([ 0., -3.,  0.,  2.])
>>> breadcrumbs([torch.tensor([0.5, -3.0, 1.0, 2.0])], ctx, density=0.5, gamma=0.25)
tensor([0., 0., 1., 2.])
"""

from __future__ import annotations

import math

import torch

from tvlang.errors import TvlangError
from tvlang.language.builtins import threshold_key
from tvlang.ops import ranks
from tvlang.ops.common import (
    TieWindow,
    below,
    fresh,
    keep_count,
    kernel_of,
    kth_largest_abs,
    magnitudes,
    scratch,
    settle_ties,
    tie_split,
)
from tvlang.ops.context import TensorContext
from tvlang.ops.dare import restore_l1
from tvlang.ops.native import band_f32
from tvlang.ops.ranks import breadcrumb_counts

__all__ = ["topk", "breadcrumbs", "magnitude_threshold", "model_threshold", "trim", "keep_at_least",
           "breadcrumb_counts", "breadcrumb_windows", "rescaled"]


def magnitude_threshold(
    op: str, x: torch.Tensor, density: float, ctx: TensorContext, scope: str, index: int, slot: str = "mag",
    count: str = "floor",
) -> tuple[float, torch.Tensor]:
    """``(t, |x| flattened)``: entries with ``|x| >= t`` survive pruning to ``density``.

    ``scope="model"`` reads the global threshold of input ``index`` from
    ``ctx.reduced`` (computed on float32 magnitudes, which are compared here).
    """
    if scope == "model":
        return model_threshold(op, ctx, index), magnitudes(x, slot, torch.float32)
    mag = magnitudes(x, slot)
    n = x.numel()
    k = keep_count(density, n, count)
    if k >= n:
        return 0.0, mag
    if k == 0:
        return math.inf, mag
    return kth_largest_abs(x, k, mag=mag), mag


def model_threshold(op: str, ctx: TensorContext, index: int) -> float:
    """The whole-model magnitude threshold of input ``index`` (``scope="model"``), from ``ctx.reduced``."""
    key = threshold_key(index)
    if key not in ctx.reduced:
        raise TvlangError(
            f"{op}: scope='model' needs the whole-model threshold {key!r}, which was not computed",
            tensor=ctx.name,
        )
    return float(ctx.reduced[key])


def trim(x: torch.Tensor, low: float, high: float = math.inf, *, slot: str,
         into: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` where ``low <= |x| < high``, 0 elsewhere: in ``into`` when given, else in a scratch
    piece, or ``x`` itself where nothing is trimmed."""
    if low == math.inf:
        return (into if into is not None else scratch(slot, x)).zero_()
    if low <= 0.0 and high == math.inf:
        return x if into is None else into.copy_(x)
    target = into if into is not None else scratch(slot, x)
    if low > 0.0 and high != math.inf and band_f32(x, below(low, x.dtype), below(high, x.dtype), target) is not None:
        return target  # one pass in the compiled helper
    out = torch.hardshrink(x, below(low, x.dtype), out=target) if low > 0.0 else target.copy_(x)
    if high != math.inf:
        out.sub_(torch.hardshrink(x, below(high, x.dtype), out=scratch(slot + ".high", x)))
    return out


def keep_at_least(x: torch.Tensor, mag: torch.Tensor, t: float, out: torch.Tensor) -> torch.Tensor:
    """Write ``x`` where ``mag >= t`` and 0 elsewhere into ``out`` (same shape as ``x``)."""
    if t == math.inf:
        return out.zero_()
    if t <= 0.0:
        return out.copy_(x)
    if x.dtype == mag.dtype:
        # |x| >= t  <=>  |x| > (the largest number below t): one fused pass
        return torch.hardshrink(x, below(t, x.dtype), out=out)
    flags = scratch("keep.flags", mag, torch.bool)
    torch.lt(mag, t, out=flags)
    out.copy_(x)
    out.view(-1).masked_fill_(flags, 0)
    return out


@kernel_of("topk")
def topk(inputs: list[torch.Tensor], ctx: TensorContext, *, density: float, scope: str, count: str,
         rescale_by: str) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest ``|x|`` (within the tensor or the model);
    ``rescale_by="l1"``: then scale them to ``x``'s L1 norm."""
    (x,) = inputs
    t, mag = magnitude_threshold("topk", x, float(density), ctx, scope, 0, count=count)
    out = keep_at_least(x, mag, t, fresh(x))
    if scope == "tensor":
        settle_ties(x, out, t, keep_count(float(density), x.numel(), count))
    return rescaled(x, out, rescale_by)


def rescaled(x: torch.Tensor, kept: torch.Tensor, rescale_by: str) -> torch.Tensor:
    """``kept`` (``x`` pruned) scaled to ``x``'s L1 norm with ``rescale_by="l1"``, as mergekit 0.1.5's
    ``rescale: true`` (:func:`tvlang.ops.dare.restore_l1`); as it is otherwise."""
    return restore_l1(x, kept) if rescale_by == "l1" else kept


def breadcrumb_windows(low: float, high: float, low_split: tuple[int, int],
                       high_split: tuple[int, int]) -> list[TieWindow]:
    """:func:`tvlang.ops.ranks.breadcrumb_windows` as :class:`TieWindow` objects."""
    return [TieWindow(*window) for window in ranks.breadcrumb_windows(low, high, low_split, high_split)]


@kernel_of("breadcrumbs")
def breadcrumbs(inputs: list[torch.Tensor], ctx: TensorContext, *, density: float, gamma: float,
                count: str, rescale_by: str) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest magnitudes, keep the next ``density`` fraction.

    With ``n`` entries, ``(keep, top)`` from :func:`breadcrumb_counts`: the entries
    ranked ``top+1 .. top+keep`` by magnitude survive (ties ranked by flat index), so
    exactly ``keep`` of them. A tensor too small for any outlier (``top == 0``) just
    keeps its ``keep`` largest entries. ``rescale_by="l1"``: then scaled to ``x``'s L1 norm.
    """
    (x,) = inputs
    n = x.numel()
    keep, top = breadcrumb_counts(float(density), float(gamma), n, count)
    out = fresh(x)
    if keep == 0:
        return out.zero_()
    if keep == n:
        return out.copy_(x)
    mag = magnitudes(x)
    low = kth_largest_abs(x, top + keep, mag=mag)
    high = kth_largest_abs(x, top, mag=mag) if top > 0 else math.inf
    if x.dtype == mag.dtype:
        torch.hardshrink(x, below(low, x.dtype), out=out)  # |x| >= low
        if high != math.inf:
            out.sub_(torch.hardshrink(x, below(high, x.dtype)))  # minus |x| >= high
    else:
        drop = scratch("crumbs.drop", mag, torch.bool)
        above = scratch("crumbs.above", mag, torch.bool)
        torch.lt(mag, low, out=drop)
        torch.ge(mag, high, out=above)
        drop.logical_or_(above)
        out.copy_(x)
        out.view(-1).masked_fill_(drop, 0)
    low_split = tie_split(mag, low, top + keep)
    high_split = tie_split(mag, high, top) if top > 0 else (0, 0)
    for window in breadcrumb_windows(low, high, low_split, high_split):
        window.apply(x, out)
    return rescaled(x, out, rescale_by)
