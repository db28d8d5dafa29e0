"""Arcee Fusion, as mergekit 0.1.5's ``arcee_fusion``: per tensor, take the fine-tuned
model's entries whose change matters most, the base's elsewhere.

With ``b`` the base tensor and ``m`` the model's:

- importance ``I = |m - b| * KL``, where ``KL`` is, per row along the last dimension,
  ``sum(p * log(p / q))`` with ``p = softmax(m) + 1e-8`` and ``q = softmax(b) + 1e-8``
  (a vector is one row);
- threshold ``T = Q2 + 1.5 * (Q3 - Q1)`` (an upper-outlier fence), where ``Qj`` is the
  entry of ``I`` sorted ascending at index ``floor(q_j * (n - 1))``, ``q = 0.25, 0.5,
  0.75`` (the index computed in float32, as mergekit does);
- result ``b + (m - b) * [I >= T]``.

Difference: above 1,000,000 entries mergekit takes its quartiles from 1,000,000 entries
drawn at random (with replacement, from torch's global generator); tvlang takes them from
every entry (exact, deterministic), so on large tensors the fence, and the entries taken,
can differ slightly.

>>> from tvlang.ops.context import TensorContext
>>> base = torch.zeros(2, 4)
>>> model = torch.tensor([[0.1, 0.1, 0.1, 3.0], [0.0, 0.2, 0.0, 0.0]])
>>> arcee_fusion([base, model], TensorContext("w"))
tensor([[0., 0., 0., 3.],
        [0., 0., 0., 0.]])
"""

from __future__ import annotations

import numpy
import torch
import torch.nn.functional as F

from tvlang.ops.common import fresh, kernel_of
from tvlang.ops.context import TensorContext

__all__ = ["arcee_fusion", "importance", "fence"]

SOFTMAX_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base|`` times the KL divergence of the rows' softmax (see the module docstring)."""
    p = F.softmax(model, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * kl


def fence(scores: torch.Tensor) -> torch.Tensor:
    """``Q2 + 1.5*(Q3 - Q1)`` of ``scores`` (a 0-d tensor of their dtype), exact order statistics."""
    flat = scores.reshape(-1)
    n = flat.numel()
    at = (torch.tensor(QUANTILES) * (n - 1)).long().tolist()  # float32 product, as mergekit
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        values = numpy.partition(flat.numpy(), at)[at]
        q1, q2, q3 = (torch.tensor(v, dtype=flat.dtype) for v in values)
    else:
        ordered = torch.sort(flat).values
        q1, q2, q3 = ordered[at[0]], ordered[at[1]], ordered[at[2]]
    return q2 + 1.5 * (q3 - q1)


@kernel_of("arcee_fusion")
def arcee_fusion(inputs: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """The base, with the model's entries where their importance reaches the fence."""
    base, model = inputs
    if base.numel() == 0:
        return fresh(base).copy_(base)
    scores = importance(model, base)
    mask = (scores >= fence(scores)).to(base.dtype)
    out = fresh(base)
    torch.sub(model, base, out=out)
    return out.mul_(mask).add_(base)
