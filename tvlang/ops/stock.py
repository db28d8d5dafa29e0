"""Model Stock (Jang et al. 2024), per tensor, as in mergekit's ``model_stock``.

For a base ``w0`` and ``N >= 2`` fine-tuned models ``w_i``, with offsets
``d_i = w_i - w0`` flattened per tensor: ``c`` is the mean over pairs
``i < j`` of ``cos(d_i, d_j)`` (norm product clamped at 1e-6, as mergekit),
then clamped to ``[0, 1]``, and ``t = N*c / (1 + (N-1)*c)``. The result is
``t * mean(w_i) + (1 - t) * w0``. The clamp is tvlang's: with negative
``c`` mergekit's ``t`` leaves ``[0, 1]`` (and divides by zero at
``c = -1/(N-1)``); tvlang then returns the base.

With ``filter_wise=True`` each vector along the last dimension (a row of a matrix; a 1-D
tensor is one vector) gets its own ``c`` and ``t``, as mergekit's ``filter_wise: true``.

>>> from tvlang.ops.context import TensorContext
>>> base = torch.zeros(2)
>>> model_stock([base, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], TensorContext("w"))
tensor([0.8284, 0.4142])
>>> rows = [torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])]
>>> model_stock(rows, TensorContext("w"), filter_wise=True)
tensor([[0.8284, 0.4142],
        [0.0000, 0.0000]])
"""

from __future__ import annotations

import torch

from tvlang.errors import TvlangError
from tvlang.ops.coefficients import stock_factor, stock_pairs, stock_ratio
from tvlang.ops.common import ChunkKernel, chunk_form_of, fresh, kernel_of, scratch
from tvlang.ops.context import TensorContext
from tvlang.ops.sums import PIECE, Blocks, ExactSum, block_values

__all__ = ["model_stock", "model_stock_chunks", "stock_factor", "stock_ratio"]


class _OffsetSums:
    """The sums of :func:`~tvlang.ops.coefficients.stock_pairs` over the offsets of one tensor, handed over whole or in
    pieces of any length, in order: the same bits either way.

    As :class:`tvlang.ops.sums.Sums`: blocks of ``BLOCK`` consecutive entries counted from
    the tensor's first entry (a block cut by a piece's end is completed from the next), each
    block's sums by :func:`tvlang.ops.sums.block_values` (products exact for float32 offsets),
    the block sums added exactly (:class:`ExactSum`). Unlike it, the offsets are cut into
    blocks once for all pairs.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.pairs = stock_pairs(n)
        self.sums = [ExactSum() for _ in self.pairs]
        self.cut = Blocks()

    def add(self, offsets: list[torch.Tensor]) -> None:
        """Add the next entries of each offset (flat pieces of the same length)."""
        self.cut.feed(offsets, self._blocks)

    def totals(self) -> list[float]:
        """The sums (the last, short block included); the object is spent."""
        self.cut.finish(self._blocks)
        return [acc.value() for acc in self.sums]

    def _blocks(self, blocks: list[torch.Tensor]) -> None:
        """Add whole blocks: ``blocks[i]`` is offset ``i``'s, one block a row."""
        for acc, (i, j) in zip(self.sums, self.pairs):
            acc.add_all(block_values(blocks[i], None if i == j else blocks[j]))


def _offsets(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    base, *models = pieces
    return [torch.sub(m, base, out=scratch(f"stock.offset{i}", m)) for i, m in enumerate(models)]


def _combine(pieces: list[torch.Tensor], t: float, out: torch.Tensor) -> torch.Tensor:
    base, *models = pieces
    torch.mul(base, 1.0 - t, out=out)
    for m in models:
        out.add_(m, alpha=t / len(models))
    return out


def _enough(n: int, ctx: TensorContext) -> None:
    if n < 2:
        raise TvlangError("model_stock: needs a base and at least two fine-tuned models", tensor=ctx.name)


@kernel_of("model_stock")
def model_stock(inputs: list[torch.Tensor], ctx: TensorContext, *, filter_wise: bool) -> torch.Tensor:
    base, *models = inputs
    n = len(models)
    _enough(n, ctx)
    if filter_wise and base.dim() > 1:
        return _per_row(base, models)
    sums = _OffsetSums(n)
    flat = [x.reshape(-1) for x in inputs]
    for start in range(0, flat[0].numel(), PIECE):
        sums.add(_offsets([x[start:start + PIECE] for x in flat]))
    return _combine(inputs, stock_factor(sums.totals(), n), fresh(base))


class _StockChunks(ChunkKernel):
    """One pass for the offsets' norms and dot products (:class:`_OffsetSums`: the same as the
    whole tensor's), then ``(1-t)*base + t*mean(models)`` piece by piece."""

    passes = 1

    def __init__(self, n: int) -> None:
        self.n = n
        self.sums = _OffsetSums(n)
        self.t = 0.0

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        self.sums.add(_offsets(pieces))

    def end_pass(self, pass_index: int) -> None:
        self.t = stock_factor(self.sums.totals(), self.n)

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        _combine(pieces, self.t, out)


class _RowStockChunks(ChunkKernel):
    """``filter_wise``: pieces of whole rows (``row`` entries each), each row's ratio from its
    own cosines (:func:`_per_row`, as on the whole tensor); no pass first."""

    def __init__(self, row: int) -> None:
        self.row = row

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        base, *models = (x.reshape(-1, self.row) for x in pieces)
        out.view(-1, self.row).copy_(_per_row(base, models))


@chunk_form_of("model_stock")
def model_stock_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *,
                       filter_wise: bool) -> ChunkKernel | None:
    """Per tensor: a pass for the sums first. ``filter_wise`` over a matrix (``ctx.shape``):
    chunks of whole rows, no pass; over a vector (one row: the per-tensor ratio), or a tensor
    of unknown shape, on the whole tensor."""
    _enough(n_inputs - 1, ctx)
    if not filter_wise:
        return _StockChunks(n_inputs - 1)
    if ctx.shape is None:
        return None
    if len(ctx.shape) < 2:
        return _StockChunks(n_inputs - 1)
    return _RowStockChunks(ctx.shape[-1])


def _per_row(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """``filter_wise``: the ratio of each vector along the last dimension, from its own cosines."""
    n = len(models)
    offsets = [torch.sub(m, base) for m in models]
    norms = [torch.linalg.vector_norm(d, dim=-1, dtype=torch.float64) for d in offsets]
    total = torch.zeros(base.shape[:-1], dtype=torch.float64, device=base.device)
    for i in range(n):
        for j in range(i + 1, n):
            dots = torch.sum(torch.mul(offsets[i], offsets[j]), dim=-1, dtype=torch.float64)
            total += (dots / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    c = (total / (n * (n - 1) // 2)).clamp_(0.0, 1.0)
    t = (n * c / (1.0 + (n - 1) * c)).to(base.dtype).unsqueeze(-1)
    out = torch.mul(base, 1.0 - t)
    for m in models:
        out.addcmul_(m, t / n)
    return out
