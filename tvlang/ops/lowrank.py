"""Low-rank task vectors: the best rank-r approximation of each 2-D tensor (docs/adapters.md).

``lowrank(d, rank)`` keeps, per 2-D tensor, the truncated SVD ``U[:, :r] S[:r] Vh[:r]``:
by Eckart-Young the closest rank-r matrix in Frobenius (and spectral) norm. It is
computed exactly, in float64, one of two ways (:func:`truncated`):

- matrices of at most ``GRAM_ELEMENTS`` entries: ``torch.linalg.svd`` (reduced);
- larger ones: the eigendecomposition of the Gram matrix of the shorter side
  (``torch.linalg.eigh``). For a tall (or square) m x n matrix, ``G = XᵀX`` (n x n),
  summed over row blocks (:class:`RowGram`): its top eigenpairs are ``V[:, :r]`` and
  ``S[:r]²``, and ``U[:, :r] = X V[:, :r] S[:r]⁻¹``, again a row block at a time, so the
  rows of ``X`` can come twice in pieces and ``X`` is never whole (``extract-lora``
  streams a large matrix so). For a wide one, ``G = X Xᵀ`` (m x m) over column blocks,
  and ``Vh[:r] = S[:r]⁻¹ U[:, :r]ᵀ X``. Either way the memory is ``G`` (float64) plus r
  rows or columns, not copies of ``X``, and it is several times faster than a full SVD.
  The squared singular values come out with an absolute error of about 1e-16 ``S[0]²``,
  so the kept components (the largest) are as accurate as an SVD's; a component whose
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

__all__ = ["GRAM_ELEMENTS", "RowGram", "Truncated", "adapter", "lowrank", "truncated"]

# Above this many entries the top singular triplets come from the Gram matrix (see above):
# a full SVD's workspace (LAPACK gesdd: about 7 n² float64 for an n x n matrix, 186 MB at
# n = 1824) is what bounds the memory of an extraction, and eigh needs about 2 n².
GRAM_ELEMENTS = 1 << 20
BLOCK_ELEMENTS = 1 << 20  # entries of X converted to float64 at a time on the Gram path (8 MB)
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
    if m < n:
        return truncated_gram(x, rank)
    gram = RowGram(n, x.device)
    gram.add(x)
    v, s = gram.decompose(rank)
    return Truncated(gram.left(x), s, v.T, gram.total)


def _blocks(n: int, m: int) -> range:
    return range(0, n, max(1, BLOCK_ELEMENTS // max(1, m)))


def _top(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``rank`` eigenvectors of the Gram matrix ``gram`` and the square roots of their
    eigenvalues (the singular values), largest first, those below ``DROP`` times the largest left out."""
    values, vectors = torch.linalg.eigh(gram)  # ascending
    k = min(rank, gram.shape[0])
    top = values[-k:].flip(0).clamp_min(0).sqrt()
    vectors = vectors[:, -k:].flip(1)
    keep = top > DROP * (top[0] if k else 0)
    return vectors[:, keep], top[keep]


def truncated_gram(x: torch.Tensor, rank: int) -> Truncated:
    """``truncated`` for a wide matrix (m <= n) through the eigendecomposition of ``X Xᵀ``."""
    m, n = x.shape
    step = _blocks(n, m).step
    gram = torch.zeros((m, m), dtype=torch.float64, device=x.device)
    for start in range(0, n, step):
        block = x[:, start:start + step].to(torch.float64)
        gram.addmm_(block, block.T)
    total = float(gram.diagonal().sum())
    u, top = _top(gram, rank)
    vh = torch.empty((top.numel(), n), dtype=torch.float64, device=x.device)
    for start in range(0, n, step):
        block = x[:, start:start + step].to(torch.float64)
        torch.matmul(u.T, block, out=vh[:, start:start + step])
    vh /= top[:, None]
    return Truncated(u, top, vh, total)


class RowGram:
    """The top singular triplets of a tall matrix (m >= n) whose rows come in blocks, twice.

    First ``add`` every block of rows (any number of rows each, in any order): they are
    summed into ``G = XᵀX`` (n x n, float64). ``decompose(rank)`` gives ``V[:, :k]``
    and ``S[:k]``. Then ``left`` of each block of rows gives those rows of
    ``U[:, :k] = X V S⁻¹``. Nothing of ``X`` is kept between calls.

    >>> x = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> gram = RowGram(2)
    >>> gram.add(x[:2]); gram.add(x[2:])
    >>> v, s = gram.decompose(1)
    >>> s.tolist(), gram.total
    ([3.0], 10.0)
    >>> (gram.left(x) * s) @ v.T
    tensor([[3., 0.],
            [0., 0.],
            [0., 0.]], dtype=torch.float64)
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.v: torch.Tensor | None = None
        self.s: torch.Tensor | None = None

    def _row_blocks(self, rows: torch.Tensor):
        step = max(1, BLOCK_ELEMENTS // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            yield rows[start:start + step].to(torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        """Count a block of rows (b x n) into the Gram matrix."""
        for block in self._row_blocks(rows):
            self.gram.addmm_(block.T, block)

    @property
    def total(self) -> float:
        """The squared Frobenius norm of the rows counted (the Gram matrix's trace)."""
        return float(self.gram.diagonal().sum())

    def decompose(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``V[:, :k]`` (n x k) and ``S[:k]``, k <= rank (components below ``DROP`` left out)."""
        self.v, self.s = _top(self.gram, rank)
        return self.v, self.s

    def left(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows of ``U[:, :k]`` (b x k, float64) for a block of rows of ``X`` (after ``decompose``)."""
        assert self.v is not None and self.s is not None, "decompose() first"
        u = torch.empty((rows.shape[0], self.s.numel()), dtype=torch.float64, device=rows.device)
        start = 0
        for block in self._row_blocks(rows):
            torch.matmul(block, self.v, out=u[start:start + block.shape[0]])
            start += block.shape[0]
        return u.div_(self.s)


@kernel_of("lowrank")
def lowrank(inputs: list[torch.Tensor], ctx: TensorContext, *, rank: int) -> torch.Tensor:
    x = inputs[0]
    rank = int(rank)
    if x.dim() != 2 or rank >= min(x.shape):
        return x.clone()
    return truncated(x, rank).product().to(x.dtype)


@kernel_of("adapter")
def adapter(inputs: list[torch.Tensor], ctx: TensorContext, *, rank: int, other: str,
            fan_in_fan_out: bool) -> torch.Tensor:
    """``adapter(d, rank)``'s value: ``d`` itself. The call is an output form: how ``tvlang run``
    writes the output (a PEFT adapter of that rank, ``tvlang.run.extract``), not arithmetic."""
    return inputs[0].clone()
