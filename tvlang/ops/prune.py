"""Magnitude pruning: ``topk`` and ``breadcrumbs``.

Counts and ties follow :mod:`tvlang.ops.common`: ``k = keep_count(density, n)``
and every entry tied with the k-th largest magnitude is kept.

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
from tvlang.ops.common import below, fresh, keep_count, kernel_of, kth_largest_abs, magnitudes, scratch
from tvlang.ops.context import TensorContext

__all__ = ["topk", "breadcrumbs", "magnitude_threshold", "model_threshold", "trim", "keep_at_least"]


def magnitude_threshold(
    op: str, x: torch.Tensor, density: float, ctx: TensorContext, scope: str, index: int, slot: str = "mag",
) -> tuple[float, torch.Tensor]:
    """``(t, |x| flattened)``: entries with ``|x| >= t`` survive pruning to ``density``.

    ``scope="model"`` reads the global threshold of input ``index`` from
    ``ctx.reduced`` (computed on float32 magnitudes, which are compared here).
    """
    if scope == "model":
        return model_threshold(op, ctx, index), magnitudes(x, slot, torch.float32)
    mag = magnitudes(x, slot)
    n = x.numel()
    k = keep_count(density, n)
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


def trim(x: torch.Tensor, low: float, high: float = math.inf, *, slot: str) -> torch.Tensor:
    """``x`` where ``low <= |x| < high``, 0 elsewhere (a scratch piece, or ``x`` itself)."""
    if low == math.inf:
        return scratch(slot, x).zero_()
    if low <= 0.0 and high == math.inf:
        return x
    out = torch.hardshrink(x, below(low, x.dtype), out=scratch(slot, x)) if low > 0.0 else scratch(slot, x).copy_(x)
    if high != math.inf:
        out.sub_(torch.hardshrink(x, below(high, x.dtype)))
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
def topk(inputs: list[torch.Tensor], ctx: TensorContext, *, density: float, scope: str) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest ``|x|`` (within the tensor or the model)."""
    (x,) = inputs
    t, mag = magnitude_threshold("topk", x, float(density), ctx, scope, 0)
    return keep_at_least(x, mag, t, fresh(x))


@kernel_of("breadcrumbs")
def breadcrumbs(inputs: list[torch.Tensor], ctx: TensorContext, *, density: float, gamma: float) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest magnitudes, keep the next ``density`` fraction.

    With ``n`` entries, ``keep = keep_count(density, n)`` and
    ``top = keep_count(gamma, n)``, reduced to ``n - keep`` when both do not
    fit. Entries ranked ``top+1 .. top+keep`` by magnitude survive. A tensor
    too small for any outlier (``top == 0``) just keeps its ``keep`` largest
    entries (mergekit wipes such tensors). Ties: entries tied with the
    ``top``-th largest are dropped with it, entries tied with the
    ``(top+keep)``-th largest are kept.
    """
    (x,) = inputs
    n = x.numel()
    keep = keep_count(float(density), n)
    top = keep_count(float(gamma), n)
    if keep + top > n:
        top = n - keep
    out = fresh(x)
    if keep == 0:
        return out.zero_()
    mag = magnitudes(x)
    low = kth_largest_abs(x, top + keep, mag=mag)
    high = kth_largest_abs(x, top, mag=mag) if top > 0 else math.inf
    if x.dtype == mag.dtype:
        torch.hardshrink(x, below(low, x.dtype), out=out)  # |x| >= low
        if high != math.inf:
            out.sub_(torch.hardshrink(x, below(high, x.dtype)))  # minus |x| >= high
        return out
    drop = scratch("crumbs.drop", mag, torch.bool)
    above = scratch("crumbs.above", mag, torch.bool)
    torch.lt(mag, low, out=drop)
    torch.ge(mag, high, out=above)
    drop.logical_or_(above)
    out.copy_(x)
    out.view(-1).masked_fill_(drop, 0)
    return out
