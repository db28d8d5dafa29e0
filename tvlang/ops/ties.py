"""TIES-Merging and its relatives: ``ties``, ``dare_ties``, ``dare_linear`` (``della``: tvlang/ops/della.py).

All three sparsify each input, elect a sign per entry and merge the entries
that agree with it (:func:`sign_merge`). See docs/operators.md for how the
options map onto the TIES paper's code, PEFT and mergekit.

>>> from tvlang.ops.context import TensorContext
>>> a = torch.tensor([1.0, -2.0, 3.0, 0.5])
>>> b = torch.tensor([-4.0, -1.0, 1.0, 0.0])
>>> ties([a, b], TensorContext("w"), density=1.0)
tensor([-4.0000, -1.5000,  2.0000,  0.5000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tvlang.ops.common import (
    TieWindow,
    count_at_least,
    count_equal,
    fresh,
    keep_count,
    kernel_of,
    kth_largest_abs,
    magnitudes,
    scratch,
    settle_ties,
)
from tvlang.ops.context import TensorContext
from tvlang.ops.dare import L1Norms, drop_random, restore_l1
from tvlang.ops.native import sign_merge_f32
from tvlang.ops.prune import keep_at_least, magnitude_threshold, trim

__all__ = ["ties", "dare_ties", "dare_linear", "sign_merge", "merge_in_chunks", "scaled", "CHUNK"]

# Elements per chunk of the trim-elect-merge passes (the whole kernels', and the chunk forms'
# within each piece): a few chunk-sized temporaries stay in the CPU cache, and the Python cost
# per chunk (about 20 torch calls) stays small (three inputs on this 2-core machine: 6.3 ms per
# 2^20 entries, against 9.7 ms for 2^20 at once and 9.5 ms for chunks of 2^16).
CHUNK = 1 << 18


def sign_merge(
    parts: list[torch.Tensor],
    *,
    elect: str,
    merge: str,
    weights: Sequence[float],
    elect_on: str,
    out: torch.Tensor,
) -> torch.Tensor:
    """Elect a sign per entry and merge the agreeing entries of ``parts`` into ``out``.

    With weights ``w_i`` (all 1 when there are none) the merged values are
    ``v_i = w_i * p_i``. The election looks at ``v_i`` (``elect_on="weighted"``)
    or ``p_i`` (``"unweighted"``): ``"total"`` takes the sign of their sum,
    ``"frequency"`` the sign of the sum of their signs; a sum of exactly 0
    elects +. Input ``i`` agrees at an entry when its election value has the
    elected sign (a zero never agrees). Then ``"sum"``: sum of agreeing
    ``v_i``; ``"mean"``: that over the number of agreeing inputs (at least
    1); ``"weighted_mean"``: over the sum of agreeing ``w_i`` (1 where that is
    0). ``elect="none"`` skips the election: the sum of all ``v_i``, divided by
    the number of inputs (``"mean"``) or the sum of the weights
    (``"weighted_mean"``, unless it is 0).
    """
    n = len(parts)
    w = [float(wi) for wi in weights] if weights else [1.0] * n
    if elect != "none" and all(wi == 1.0 for wi in w) and sign_merge_f32(parts, elect, merge, out) is not None:
        return out  # the compiled helper: the same values in one pass (tvlang/ops/native.py)
    if elect == "none":
        out.zero_()
        for wi, p in zip(w, parts):
            out.add_(p, alpha=wi)
        if merge == "mean":
            out.div_(n)
        elif merge == "weighted_mean" and abs(sum(w)) > 1e-8:
            out.div_(sum(w))
        return out
    like = parts[0]
    # sign(election value of input i) = s_i * sign(p_i)
    if elect_on == "weighted":
        s = [1.0 if wi > 0 else (-1.0 if wi < 0 else 0.0) for wi in w]
    else:
        s = [1.0] * n
    tally = scratch("ties.tally", like)
    tmp = scratch("ties.tmp", like)
    voters = [(si, wi, p) for si, wi, p in zip(s, w, parts) if si != 0.0]
    # (a zero weight makes zero election values: they neither vote nor agree)
    # The sums below start from 0 (0 + v == v but for the sign of a zero): where the first
    # term's factor is 1 they start from it instead, a pass or two fewer, and exactly the same
    # values (tally's zeros elect + whatever their sign; total's first term gets + 0.0).
    if elect == "total":
        # Each weighted term is rounded before it is added, as mergekit does (w_i * p_i, then
        # the sum): add_(p, alpha=w) is a fused multiply-add, and where the weighted terms
        # cancel exactly (0.3*d1 == -0.6*d2 in bfloat16) its tally is the first product's
        # rounding error, which elects a sign, where the rounded terms sum to 0 and elect +.
        alphas = [wi if elect_on == "weighted" else 1.0 for _, wi, _ in voters]
        started = False
        pending = None  # a first term that is an input itself: added to the second in one pass
        for alpha, (_, _, p) in zip(alphas, voters):
            if not started and pending is None:
                if alpha == 1.0:
                    pending = p
                else:
                    torch.mul(p, alpha, out=tally)
                    started = True
                continue
            term = p if alpha == 1.0 else torch.mul(p, alpha, out=tmp)
            if pending is not None:
                torch.add(pending, term, out=tally)
                pending = None
                started = True
            else:
                tally.add_(term)
        if pending is not None:
            tally.copy_(pending)
        elif not started:
            tally.zero_()
    else:
        tally.zero_()
        for si, _, p in voters:
            torch.sign(p, out=tmp)
            tally.add_(tmp, alpha=si)
    elected = scratch("ties.sign", like)
    torch.sign(tally, out=elected)
    elected.add_(0.5).sign_()  # -1 -> -1, 0 -> +1, +1 -> +1
    total = tally  # sum of |p_i| * w_i * s_i over agreeing inputs
    divisor = scratch("ties.divisor", like) if merge != "sum" else None
    first = True
    for si, wi, p in voters:
        count = 1.0 if merge == "mean" else wi
        if first and si == 1.0 and wi == 1.0:  # total = 0 + |p|, divisor = 0 + sign(|p|)
            torch.mul(p, elected, out=total).clamp_(min=0).add_(0.0)
            if divisor is not None:
                torch.sign(total, out=divisor)
            first = False
            continue
        if first:
            total.zero_()
            if divisor is not None:
                divisor.zero_()
            first = False
        torch.mul(p, elected, out=tmp)
        if si < 0:
            tmp.neg_()
        tmp.clamp_(min=0)  # |p_i| where input i agrees, else 0
        total.add_(tmp, alpha=wi * si)
        if divisor is not None:
            tmp.sign_()
            divisor.add_(tmp, alpha=count)
    if first:  # no voter
        total.zero_()
        if divisor is not None:
            divisor.zero_()
    torch.mul(total, elected, out=out)
    if merge == "mean":
        out.div_(divisor.clamp_(min=1.0))
    elif merge == "weighted_mean":
        out.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return out


@kernel_of("ties")
def ties(
    inputs: list[torch.Tensor],
    ctx: TensorContext,
    *,
    density: float,
    elect: str,
    merge: str,
    weights: Sequence[float],
    elect_on: str,
    scope: str,
    count: str,
    rescale_by: str,
) -> torch.Tensor:
    """TIES: keep the ``density`` fraction of largest ``|x|`` of each input, elect, disjoint merge.
    ``rescale_by="l1"``: each input's kept entries are scaled to its L1 norm before the election."""
    density = float(density)
    out = fresh(inputs[0])
    thresholds: list = []
    windows: list[TieWindow | None] = []
    for i, x in enumerate(inputs):
        n = x.numel()
        k = keep_count(density, n, count)
        window = None
        if scope == "tensor" and k >= n:
            thresholds.append(0.0)
            windows.append(None)
            continue
        if scope == "tensor" and x.dtype == torch.float32 and x.device.type == "cpu":
            # the magnitudes are not needed after the threshold: let the selection reorder them
            mag = magnitudes(x)
            t = math.inf if k == 0 else kth_largest_abs(x, k, mag=mag, reorder=True)
            if 0.0 < t < math.inf:
                kept = count_at_least(mag, t)
                if kept > k:  # ties at the threshold: only the first ones in flat order
                    window = TieWindow(t, 0, k - (kept - count_equal(mag, t)))
            thresholds.append(t)
            windows.append(window)
            continue
        t, mag = magnitude_threshold("ties", x, density, ctx, scope, i, count=count)
        if t > 0.0 and x.dtype != mag.dtype:  # trim now, while the magnitudes are at hand
            part = keep_at_least(x, mag, t, scratch(f"ties.part{i}", x))
            t = settle_ties(x, part, t, k) if scope == "tensor" else part
        elif scope == "tensor" and 0.0 < t < math.inf:
            kept = count_at_least(mag, t)
            if kept > k:
                window = TieWindow(t, 0, k - (kept - count_equal(mag, t)))
        thresholds.append(t)
        windows.append(window)
    # trim and merge chunk by chunk: every pass after the thresholds works in the CPU cache
    flats = [x.reshape(-1) for x in inputs]
    flat_out = out.view(-1)

    def trimmed(s: slice, tie_windows: list[TieWindow | None]) -> list[torch.Tensor]:
        parts = []
        for i, (x, t) in enumerate(zip(flats, thresholds)):
            if isinstance(t, torch.Tensor):  # trimmed already (magnitudes in another dtype)
                parts.append(t.view(-1)[s])
            else:
                part = trim(x[s], t, slot=f"ties.chunk{i}")
                if tie_windows[i] is not None:
                    tie_windows[i].apply(x[s], part)
                parts.append(part)
        return parts

    factors: list[float | None] = [None] * len(inputs)
    if rescale_by == "l1":  # each input's L1 norm before and after its trim, over the same chunks
        norms = L1Norms(len(inputs))
        fresh_windows = [None if w is None else TieWindow(w.value, w.start, w.stop) for w in windows]
        for start in range(0, max(flat_out.numel(), 1), CHUNK):
            s = slice(start, start + CHUNK)
            for i, part in enumerate(trimmed(s, fresh_windows)):
                norms.add(i, flats[i][s], part)
        factors = norms.factors()
    for start in range(0, max(flat_out.numel(), 1), CHUNK):
        s = slice(start, start + CHUNK)
        parts = scaled(trimmed(s, windows), factors, "ties.scaled")
        sign_merge(parts, elect=elect, merge=merge, weights=weights, elect_on=elect_on, out=flat_out[s])
    return out


def _dropped(inputs: list[torch.Tensor], ctx: TensorContext, p: float, seed: float, rescale: bool,
             rescale_by: str) -> list[torch.Tensor]:
    """DARE of each input (one generator, inputs drawn in order) into scratch parts."""
    bits = ctx.bits(seed)
    l1 = bool(rescale) and rescale_by == "l1"
    parts = []
    for i, x in enumerate(inputs):
        part = drop_random(x, float(p), bits, bool(rescale) and not l1, scratch(f"ties.part{i}", x))
        parts.append(restore_l1(x, part) if l1 else part)
    return parts


@kernel_of("dare_ties")
def dare_ties(
    inputs: list[torch.Tensor],
    ctx: TensorContext,
    *,
    p: float,
    seed: float,
    rescale: bool,
    rescale_by: str,
    elect: str,
    merge: str,
    weights: Sequence[float],
    elect_on: str,
) -> torch.Tensor:
    """DARE on each input (one generator, inputs drawn in order), then TIES election and merge."""
    parts = _dropped(inputs, ctx, p, seed, rescale, rescale_by)
    return merge_in_chunks(parts, fresh(inputs[0]), elect=elect, merge=merge, weights=weights, elect_on=elect_on)


@kernel_of("dare_linear")
def dare_linear(
    inputs: list[torch.Tensor],
    ctx: TensorContext,
    *,
    p: float,
    seed: float,
    rescale: bool,
    rescale_by: str,
    merge: str,
    weights: Sequence[float],
) -> torch.Tensor:
    """DARE on each input (drawn as in ``dare_ties``), then their weighted sum (mergekit's
    ``dare_linear``): ``merge="sum"``, or divided by the number of inputs or the weights' sum."""
    parts = _dropped(inputs, ctx, p, seed, rescale, rescale_by)
    return merge_in_chunks(parts, fresh(inputs[0]), elect="none", merge=merge, weights=weights,
                          elect_on="weighted")


def scaled(parts: list[torch.Tensor], factors: list[float | None], slot: str) -> list[torch.Tensor]:
    """``parts`` times each one's factor (``None``: as it is), into scratch pieces (``slot`` and the
    part's index): a part may be an input, never changed in place."""
    return [part if factor is None else torch.mul(part, factor, out=scratch(f"{slot}{i}", part))
            for i, (part, factor) in enumerate(zip(parts, factors))]


def merge_in_chunks(parts: list[torch.Tensor], out: torch.Tensor, **options) -> torch.Tensor:
    """:func:`sign_merge` chunk by chunk (element-wise, so the same result, in the CPU cache)."""
    flats = [p.reshape(-1) for p in parts]
    flat_out = out.view(-1)
    for start in range(0, max(flat_out.numel(), 1), CHUNK):
        s = slice(start, start + CHUNK)
        sign_merge([f[s] for f in flats], out=flat_out[s], **options)
    return out
