"""Low-rank task vectors: the best rank-r approximation of each 2-D tensor (docs/adapters.md).

``lowrank(d, rank)`` keeps, per 2-D tensor, the truncated SVD ``U[:, :r] S[:r] Vh[:r]``:
by Eckart-Young the closest rank-r matrix in Frobenius (and spectral) norm. The SVD is
exact (``torch.linalg.svd``, reduced), computed in float64 for inputs of at most
``FLOAT64_ELEMENTS`` entries and in the compute dtype above; a tensor of rank r or less
is returned as it is. Tensors that are not matrices (1-D norms and biases, scalars,
convolution kernels) are kept as they are: a rank means nothing for them.

>>> from tvlang.ops.context import TensorContext
>>> x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
>>> lowrank([x], TensorContext("w"), rank=1)
tensor([[3., 0.],
        [0., 0.]])
>>> kept_energy(torch.tensor([3.0, 1.0]), 1)
0.9
"""

from __future__ import annotations

import torch

from tvlang.ops.common import kernel_of
from tvlang.ops.context import TensorContext

__all__ = ["FLOAT64_ELEMENTS", "factors", "kept_energy", "lowrank", "svd"]

# Matrices up to this many entries are decomposed in float64 (a 4096 x 4096 one costs
# 128 MiB more there); larger ones in the compute dtype.
FLOAT64_ELEMENTS = 1 << 24


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduced SVD of a matrix, in float64 when it is small enough (``FLOAT64_ELEMENTS``)."""
    work = x.to(torch.float64) if x.numel() <= FLOAT64_ELEMENTS else x
    return torch.linalg.svd(work, full_matrices=False)


def factors(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, A, S)``: ``B @ A`` is the best rank-``rank`` approximation of the matrix ``x``
    (``B = U[:, :r] * S[:r]``, ``A = Vh[:r]``; ``r = min(rank, *x.shape)``) and ``S`` all of
    its singular values, in the SVD's dtype."""
    u, s, vh = svd(x)
    r = min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r], s


def kept_energy(singular_values: torch.Tensor, rank: int) -> float:
    """The share of the squared Frobenius norm that the first ``rank`` singular values keep
    (1.0 for a zero matrix)."""
    squares = singular_values.to(torch.float64).square()
    total = float(squares.sum())
    return float(squares[:rank].sum()) / total if total > 0 else 1.0


@kernel_of("lowrank")
def lowrank(inputs: list[torch.Tensor], ctx: TensorContext, *, rank: int) -> torch.Tensor:
    x = inputs[0]
    rank = int(rank)
    if x.dim() != 2 or rank >= min(x.shape):
        return x.clone()
    b, a, _ = factors(x, rank)
    return (b @ a).to(x.dtype)
