"""SCE (Wan et al. 2024, FuseChat): select, calculate, erase, as mergekit 0.1.5's ``sce``.

For task vectors ``x_1..x_m`` of one tensor:

1. **Select** (``select_topk < 1``): the per-entry variance across the inputs
   (population variance, ``unbiased=False``); of the ``nz`` entries whose variance
   is not 0, the ``k`` with the largest variance are kept in every input, the
   others zeroed. ``k = keep_count(select_topk, nz)``, or mergekit's
   ``int(select_topk * nz)`` with ``count="mergekit"``; exactly ``k`` entries,
   equal variances ranked by flat index (docs/operators.md, shared rules).
2. **Calculate**: each input's weight is its mean square over the tensor (after
   selection), divided by the sum of the weights; uniform ``1/m`` when that sum is
   below 1e-6 (mergekit's rule).
3. **Erase**: the elected sign per entry is that of the sum of the inputs (0
   elects +); an input agrees where its sign is the elected one (a zero never
   does). The result is ``sum of agreeing w_i x_i / max(sum of agreeing w_i, 1e-6)``.

>>> from tvlang.ops.context import TensorContext
>>> a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 2.0, -1.0])
>>> sce([a, b], TensorContext("w"))  # weights 5/19 and 14/19
tensor([ 2.4737,  2.0000, -1.0000])
"""

from __future__ import annotations

import torch

from tvlang.ops.common import fresh, keep_count, kernel_of, kth_largest_abs, settle_ties, truncated_count
from tvlang.ops.context import TensorContext

__all__ = ["sce", "select_by_variance", "variance"]

WEIGHT_SUM_EPS = 1e-6  # mergekit's sce_weight: below this sum, uniform weights
DIVISOR_EPS = 1e-6  # mergekit's sce_merge: the divisor is clamped to at least this


_BLOCK = 1 << 20  # entries of each input at a time in :func:`variance`


def variance(tvs: torch.Tensor) -> torch.Tensor:
    """``torch.var(tvs, dim=0, unbiased=False)``, bit for bit, block by block: Welford's
    update over the inputs in float64 (as torch's CPU kernel accumulates), rounded to
    ``tvs``' dtype once. torch's reduction over a short leading dimension took about 2.5 times
    as long (a strided reduction per entry), and this one needs a few blocks of memory only."""
    m = tvs.shape[0]
    flat = tvs.reshape(m, -1)
    out = torch.empty(flat.shape[1], dtype=tvs.dtype, device=tvs.device)
    for start in range(0, flat.shape[1], _BLOCK):
        block = flat[:, start:start + _BLOCK]
        mean = torch.zeros(block.shape[1], dtype=torch.float64, device=tvs.device)
        m2 = torch.zeros_like(mean)
        for n, x in enumerate(block, 1):
            xd = x.double()
            delta = xd - mean
            mean += delta / n
            m2 += delta * (xd - mean)
        out[start:start + _BLOCK] = m2.div_(m)
    return out.view(tvs.shape[1:])


def select_by_variance(tvs: torch.Tensor, select_topk: float, count: str) -> torch.Tensor:
    """The 0/1 mask (shape of one input) of the entries ``sce`` keeps: the ``k`` largest
    variances across the inputs (``tvs`` stacked on dim 0)."""
    var = variance(tvs)
    if select_topk <= 0.0:
        return torch.zeros_like(var)
    nonzero = int(torch.count_nonzero(var))
    k = truncated_count(select_topk, nonzero) if count == "mergekit" else keep_count(select_topk, nonzero)
    if k == 0:
        return torch.zeros_like(var)
    t = kth_largest_abs(var, k)
    # var >= 0, and t > 0 since k <= the number of nonzero variances
    kept = torch.where(var >= t, var, torch.zeros_like(var))
    settle_ties(var, kept, t, k)
    return (kept != 0).to(var.dtype)


@kernel_of("sce")
def sce(inputs: list[torch.Tensor], ctx: TensorContext, *, select_topk: float, count: str) -> torch.Tensor:
    """SCE merge of the task vectors ``inputs`` (see the module docstring)."""
    m = len(inputs)
    tvs = torch.stack(inputs)
    if float(select_topk) < 1.0:
        tvs.mul_(select_by_variance(tvs, float(select_topk), count).unsqueeze(0))
    squares = [float(torch.mean(tv.double() ** 2)) if tv.numel() else 0.0 for tv in tvs]
    total = sum(squares)
    weights = [1.0 / m] * m if abs(total) < WEIGHT_SUM_EPS else [w / total for w in squares]
    elected = torch.sign(tvs.sum(0))
    elected.add_(0.5).sign_()  # 0 elects +
    merged = torch.zeros_like(tvs[0])
    divisor = torch.zeros_like(tvs[0])
    for w, tv in zip(weights, tvs):
        agree = (torch.sign(tv) == elected).to(tv.dtype)
        merged.add_(tv * agree, alpha=w)
        divisor.add_(agree, alpha=w)
    out = fresh(inputs[0])
    return torch.div(merged, divisor.clamp_(min=DIVISOR_EPS), out=out)


