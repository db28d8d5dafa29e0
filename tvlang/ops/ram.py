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
  per model). In chunks: one pass counts ``shared_i`` and ``unique_i`` (whole numbers,
  the same whatever the cuts), then each chunk is merged as the whole tensor is.

>>> from tvlang.ops.context import TensorContext
>>> a, b = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])
>>> ram([a, b], TensorContext("w"))
tensor([2., 2., 0.])
>>> ramplus_tl([a, b], TensorContext("w"), r=0.5)  # a: 1 shared, 1 unique -> 1 + 0.5*0.2
tensor([2.0000, 2.2000, 0.0000])
"""

from __future__ import annotations

import torch

from tvlang.ops import native
from tvlang.ops.common import ChunkKernel, chunk_form_of, fresh, kernel_of
from tvlang.ops.context import TensorContext

__all__ = ["ram", "ramplus_tl", "ramplus_tl_chunks", "RamPlusCounts"]


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
    out = fresh(inputs[0])
    if native.ram_f32(inputs, float(epsilon), out) is not None:
        return out
    masks, counts = _contributions(inputs, float(epsilon))
    out.zero_()
    for x, mask in zip(inputs, masks):
        out.addcmul_(x, mask)
    return out.div_(counts.clamp_(min=1.0))


@kernel_of("ramplus_tl")
def ramplus_tl(inputs: list[torch.Tensor], ctx: TensorContext, *, r: float, alpha: float,
               epsilon: float) -> torch.Tensor:
    """RAM with each input's unique entries boosted by ``1 + r*clamp(shared/unique, 0, alpha)``."""
    counter = RamPlusCounts(len(inputs), float(r), float(alpha), float(epsilon))
    counter.observe(0, inputs)
    counter.end_pass(0)
    out = fresh(inputs[0])
    counter.apply(inputs, out)
    return out


def _ratio(shared: int, floor: float) -> float:
    """``shared / floor``; 0 where the floor is 0 (``epsilon=0`` and the input contributes
    alone nowhere: its factor multiplies no entry, and must not be inf, whose product with
    the zeros of the other entries would be NaN)."""
    return shared / floor if floor > 0 else 0.0


class RamPlusCounts(ChunkKernel):
    """``ramplus_tl`` in pieces (its chunk form, and the whole kernel with the whole tensor
    as one piece): a pass counts, per input, the entries where it contributes with others
    (``shared``) and alone (``unique``): whole numbers, so pieces in any cuts give the same
    counts and the same boosts; then each piece is merged entry by entry."""

    passes = 1

    def __init__(self, n: int, r: float, alpha: float, epsilon: float) -> None:
        self.r, self.alpha, self.eps = r, alpha, epsilon
        self.shared, self.unique = [0] * n, [0] * n
        self.boosts: list[float] = []

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        counted = native.ramplus_count_f32(pieces, self.eps)
        if counted is not None:
            for i, (shared, unique) in enumerate(zip(*counted)):
                self.shared[i] += shared
                self.unique[i] += unique
            return
        masks, counts = _contributions(pieces, self.eps)
        unique, overlap = counts == 1, counts > 1
        for i, mask in enumerate(masks):
            contributes = mask.bool()
            self.shared[i] += int(torch.count_nonzero(contributes & overlap))
            self.unique[i] += int(torch.count_nonzero(contributes & unique))

    def end_pass(self, pass_index: int) -> None:
        self.boosts = [1.0 + self.r * min(max(_ratio(shared, max(unique, self.eps)), 0.0), self.alpha)
                       for shared, unique in zip(self.shared, self.unique)]

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        if native.ramplus_apply_f32(pieces, self.eps, self.boosts, out) is not None:
            return
        masks, counts = _contributions(pieces, self.eps)
        unique = (counts == 1).to(counts.dtype)
        overlap = (counts > 1).to(counts.dtype)
        share = overlap / counts.clamp(min=1.0)  # 1/c where shared, 0 elsewhere
        out.zero_()
        for x, mask, boost in zip(pieces, masks, self.boosts):
            out.add_(x * mask * (unique * boost + share))


@chunk_form_of("ramplus_tl")
def ramplus_tl_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, r: float,
                      alpha: float, epsilon: float) -> RamPlusCounts:
    return RamPlusCounts(n_inputs, float(r), float(alpha), float(epsilon))
