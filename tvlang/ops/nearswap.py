"""``nearswap``: per entry, take the other model's value where the two are close, keep the
base's where they are far apart, as mergekit 0.1.5's ``nearswap`` (docs/operators.md).

With ``d = |a - b|`` per entry, the weight of ``b`` is ``clamp(t / max(d, 1e-6), 0, 1)``:
entries that differ by at most ``t`` become ``b``'s, the others move toward ``b`` by ``t / d``.

>>> from tvlang.ops.context import TensorContext
>>> nearswap([torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.05, 0.2, -1.0])], TensorContext("w"), t=0.1)
tensor([ 0.0500,  0.1000, -0.1000])
"""

from __future__ import annotations

import torch

from tvlang.ops import native
from tvlang.ops.common import fresh, kernel_of
from tvlang.ops.context import TensorContext

__all__ = ["nearswap"]

_FLOOR = 1e-6  # mergekit's floor on |a - b|


@kernel_of("nearswap")
def nearswap(inputs: list[torch.Tensor], ctx: TensorContext, *, t: float) -> torch.Tensor:
    a, b = inputs
    weight = fresh(a)
    if native.nearswap_f32(a, b, float(t), weight) is not None:
        return weight  # the merge itself, computed in one pass by the compiled helper
    torch.sub(a, b, out=weight).abs_().clamp_(min=_FLOOR)
    weight.reciprocal_().mul_(float(t)).clamp_(0.0, 1.0)  # t / d as torch computes it: t * (1/d)
    out = torch.mul(weight, b)  # weight * b + (1 - weight) * a, in mergekit's order
    weight.neg_().add_(1.0).mul_(a)
    return out.add_(weight)
