"""Low-rank task vectors: the best rank-r approximation of each 2-D tensor (docs/adapters.md).

``lowrank(d, rank)`` keeps, per 2-D tensor, the truncated SVD ``U[:, :r] S[:r] Vh[:r]``:
by Eckart-Young the closest rank-r matrix in Frobenius (and spectral) norm. It is
computed exactly, in float64, one of two ways (:func:`truncated`):

- matrices of at most ``GRAM_ELEMENTS`` entries: ``torch.linalg.svd`` (reduced);
- larger ones: the eigendecomposition of the Gram matrix of the shorter side,
  ``G = X Xᵀ`` (m x m for an m x n matrix with m <= n; ``torch.linalg.eigh``): its
  top eigenpairs are ``U[:, :r]`` and ``S[:r]²``, and ``Vh[:r] = S[:r]⁻¹ U[:, :r]ᵀ X``.
  ``G`` and ``Vh`` are formed over column blocks, so the memory is ``G`` (m² float64)
  plus r rows, not copies of ``X``; it is several times faster than a full SVD. The
  squared singular values come out with an absolute error of about 1e-16 ``S[0]²``, so
  the kept components (the largest) are as accurate as an SVD's; a component whose
  singular value is below 1e-7 ``S[0]`` is dropped (it is rounding, and its share of
  the norm below 1e-14).

A tensor of rank r or less is returned as it is. Tensors that are not matrices (1-D
norms and biases, scalars, convolution kernels) are kept as they are: a rank means
nothing for them.

>>> from tvlang.ops.context import TensorContext
>>> x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
>>> lowrank([x], TensorContext("w"), rank=1)
tensor([[3., 0.],
        [0., 0.]])
>>> truncated(x, 1).kept
0.9
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvlang.ops.common import kernel_of
from tvlang.ops.context import TensorContext

__all__ = ["GRAM_ELEMENTS", "Truncated", "lowrank", "truncated"]

# Above this many entries the top singular triplets come from the Gram matrix (see above):
# a full SVD's workspace (LAPACK gesdd: about 7 n² float64 for an n x n matrix, 186 MB at
# n = 1824) is what bounds the memory of an extraction, and eigh needs about 2 n².
GRAM_ELEMENTS = 1 << 20
BLOCK_ELEMENTS = 1 << 22  # entries of X converted to float64 at a time on the Gram path
DROP = 1e-7  # singular values below DROP * the largest are rounding: dropped on the Gram path


@dataclass
class Truncated:
    """The top singular triplets of a matrix, in float64: ``u`` (m x k), ``s`` (k), ``vh``
    (k x n), k <= rank; ``total`` is the squared Frobenius norm of the whole matrix."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total: float

    @property
    def kept(self) -> float:
        """The share of the squared Frobenius norm the kept singular values hold (1.0 for a zero
        matrix): the sum of their squares over the total."""
        return float(self.s.square().sum()) / self.total if self.total > 0 else 1.0

    def product(self) -> torch.Tensor:
        """``u diag(s) vh``: the rank-k approximation, float64."""
        return (self.u * self.s) @ self.vh


def truncated(x: torch.Tensor, rank: int) -> Truncated:
    """The top ``rank`` singular triplets of the matrix ``x`` (see the module docstring)."""
    m, n = x.shape
    if x.numel() <= GRAM_ELEMENTS:
        u, s, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
        k = min(rank, s.numel())
        return Truncated(u[:, :k], s[:k], vh[:k], float(s.square().sum()))
    if m > n:  # work on the short side: X = (Xᵀ)ᵀ
        t = truncated_gram(x.T, rank)
        return Truncated(t.vh.T, t.s, t.u.T, t.total)
    return truncated_gram(x, rank)


def _blocks(n: int, m: int) -> range:
    return range(0, n, max(1, BLOCK_ELEMENTS // max(1, m)))


def truncated_gram(x: torch.Tensor, rank: int) -> Truncated:
    """``truncated`` for a wide matrix (m <= n) through the eigendecomposition of ``X Xᵀ``."""
    m, n = x.shape
    step = _blocks(n, m).step
    gram = torch.zeros((m, m), dtype=torch.float64, device=x.device)
    for start in range(0, n, step):
        block = x[:, start:start + step].to(torch.float64)
        gram.addmm_(block, block.T)
    total = float(gram.diagonal().sum())
    values, vectors = torch.linalg.eigh(gram)  # ascending
    k = min(rank, m)
    top = values[-k:].flip(0).clamp_min(0).sqrt()
    u = vectors[:, -k:].flip(1)
    keep = top > DROP * (top[0] if k else 0)
    u, top = u[:, keep], top[keep]
    vh = torch.empty((top.numel(), n), dtype=torch.float64, device=x.device)
    for start in range(0, n, step):
        block = x[:, start:start + step].to(torch.float64)
        torch.matmul(u.T, block, out=vh[:, start:start + step])
    vh /= top[:, None]
    return Truncated(u, top, vh, total)


@kernel_of("lowrank")
def lowrank(inputs: list[torch.Tensor], ctx: TensorContext, *, rank: int) -> torch.Tensor:
    x = inputs[0]
    rank = int(rank)
    if x.dim() != 2 or rank >= min(x.shape):
        return x.clone()
    return truncated(x, rank).product().to(x.dtype)
