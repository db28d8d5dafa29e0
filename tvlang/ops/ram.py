"""RAM and RAM+ (Reinforced Agent Merging, arXiv:2601.13572), as mergekit 0.1.5's
``ram`` and ``ramplus_tl``.

An input *contributes* at an entry when ``|x| > epsilon``. With ``c`` the number
of inputs contributing at an entry:

- ``ram``: the mean of the contributing inputs' values there (0 where ``c = 0``):
  an entry only one input changes keeps that change, undiluted.
- ``ramplus_tl``: as ``ram``, but where input ``i`` is the only contributor
  (``c = 1``) its value is multiplied by ``lambda_i = 1 + r * clamp(rho_i, 0,
  alpha)``, with ``rho_i = shared_i / max(unique_i, epsilon)``: over the tensor,
  ``shared_i`` counts the entries where input ``i`` contributes with others and
  ``unique_i`` those where it contributes alone ("tensor-local": per tensor, not
  per model).

>>> from tvlang.ops.context import TensorContext
>>> a, b = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])
>>> ram([a, b], TensorContext("w"))
tensor([2., 2., 0.])
>>> ramplus_tl([a, b], TensorContext("w"), r=0.5)  # a: 1 shared, 1 unique -> 1 + 0.5*0.2
tensor([2.0000, 2.2000, 0.0000])
"""

from __future__ import annotations

import torch

from tvlang.ops.common import fresh, kernel_of
from tvlang.ops.context import TensorContext

__all__ = ["ram", "ramplus_tl"]


def _contributions(inputs: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per input the 0/1 mask ``|x| > epsilon``, and their count per entry."""
    masks = [(x.abs() > epsilon).to(x.dtype) for x in inputs]
    counts = torch.zeros_like(inputs[0])
    for mask in masks:
        counts.add_(mask)
    return masks, counts


@kernel_of("ram")
def ram(inputs: list[torch.Tensor], ctx: TensorContext, *, epsilon: float) -> torch.Tensor:
    """Per entry, the mean of the inputs with ``|x| > epsilon`` (0 where there is none)."""
    masks, counts = _contributions(inputs, float(epsilon))
    out = fresh(inputs[0]).zero_()
    for x, mask in zip(inputs, masks):
        out.addcmul_(x, mask)
    return out.div_(counts.clamp_(min=1.0))


@kernel_of("ramplus_tl")
def ramplus_tl(inputs: list[torch.Tensor], ctx: TensorContext, *, r: float, alpha: float,
               epsilon: float) -> torch.Tensor:
    """RAM with each input's unique entries boosted by ``1 + r*clamp(shared/unique, 0, alpha)``."""
    eps = float(epsilon)
    masks, counts = _contributions(inputs, eps)
    unique = (counts == 1).to(counts.dtype)
    overlap = (counts > 1).to(counts.dtype)
    share = overlap / counts.clamp(min=1.0)  # 1/c where shared, 0 elsewhere
    out = fresh(inputs[0]).zero_()
    for x, mask in zip(inputs, masks):
        shared_i = float(torch.sum(mask * overlap, dtype=torch.float64))
        unique_i = float(torch.sum(mask * unique, dtype=torch.float64))
        rho = shared_i / max(unique_i, eps)
        boost = 1.0 + float(r) * min(max(rho, 0.0), float(alpha))
        out.add_(x * mask * (unique * boost + share))
    return out
