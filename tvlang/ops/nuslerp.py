"""``nuslerp``: spherical interpolation of two tensors as mergekit 0.1.5's ``nuslerp`` computes
it: of the flattened tensors, or of each vector along the last dimension (a row of a
matrix), or along the first (``row_wise``, a column) (docs/operators.md).

>>> from tvlang.ops.context import TensorContext
>>> a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
>>> nuslerp([a, b], TensorContext("w"), t=0.5, flatten=False)
tensor([[0.7071, 0.7071],
        [1.5000, 1.5000]])
"""

from __future__ import annotations

import torch

from tvlang.ops.coefficients import COLINEAR, NORM_FLOOR, nuslerp_coefficients
from tvlang.ops.common import ChunkKernel, chunk_form_of, fresh, kernel_of
from tvlang.ops.context import TensorContext
from tvlang.ops.gram import GramChunks, combine, gram

__all__ = ["nuslerp", "nuslerp_chunks", "nuslerp_coefficients"]




@kernel_of("nuslerp")
def nuslerp(inputs: list[torch.Tensor], ctx: TensorContext, *, t: float, flatten: bool,
            row_wise: bool) -> torch.Tensor:
    v0, v1 = inputs
    t = float(t)
    if flatten or v0.dim() <= 1:  # one vector: a 1-D tensor is its own row and column
        return combine(inputs, nuslerp_coefficients(gram(inputs), t))
    if not row_wise:
        return _rows(v0, v1, t, fresh(inputs[0]))
    v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    norm0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True, dtype=torch.float64).clamp_(min=NORM_FLOOR)
    norm1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True, dtype=torch.float64).clamp_(min=NORM_FLOOR)
    dots = torch.sum(torch.mul(v0, v1), dim=-1, keepdim=True, dtype=torch.float64)
    cos = (dots / (norm0 * norm1)).clamp_(-1.0, 1.0)
    colinear = (1.0 - cos.square()) <= COLINEAR
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin_theta = torch.where(colinear, 1.0, torch.sin(theta))
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta).to(v0.dtype)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta).to(v0.dtype)
    out = fresh(inputs[0])
    view = out.transpose(0, -1)
    torch.mul(v0, c0, out=view)
    view.addcmul_(v1, c1)
    return out


_ROW_BLOCK = 1 << 18  # entries of each input per block of rows (2 MiB in float64)


def _rows(v0: torch.Tensor, v1: torch.Tensor, t: float, out: torch.Tensor) -> torch.Tensor:
    """Each vector along the last dimension, a block of rows at a time (in cache): the two
    rows' squares and dot in float64 (exact products) from one batched matrix product, then
    ``c0*v0 + c1*v1`` per row."""
    width = v0.shape[-1]
    a, b, o = v0.reshape(-1, width), v1.reshape(-1, width), out.view(-1, width)
    step = max(1, _ROW_BLOCK // max(width, 1))
    wide = torch.empty((min(step, a.shape[0]), 2, width), dtype=torch.float64, device=a.device)
    for first in range(0, a.shape[0], step):
        last = min(a.shape[0], first + step)
        pair = wide[:last - first]
        pair[:, 0].copy_(a[first:last])
        pair[:, 1].copy_(b[first:last])
        g = torch.bmm(pair, pair.transpose(1, 2))
        norm0 = g[:, 0, 0].sqrt().clamp_(min=NORM_FLOOR)
        norm1 = g[:, 1, 1].sqrt().clamp_(min=NORM_FLOOR)
        cos = (g[:, 0, 1] / (norm0 * norm1)).clamp_(-1.0, 1.0)
        colinear = (1.0 - cos.square()) <= COLINEAR
        theta = torch.acos(torch.where(colinear, 0.0, cos))
        sin_theta = torch.where(colinear, 1.0, torch.sin(theta))
        c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta).to(a.dtype).unsqueeze(1)
        c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta).to(a.dtype).unsqueeze(1)
        torch.mul(a[first:last], c0, out=o[first:last])
        o[first:last].addcmul_(b[first:last], c1)
    return out


class _RowChunks(ChunkKernel):
    """Per row (``flatten=False``, not ``row_wise``): pieces of whole rows (``row`` entries
    each), each row interpolated on its own as on the whole tensor (:func:`_rows`); no pass."""

    def __init__(self, row: int, t: float) -> None:
        self.row = row
        self.t = t

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        _rows(pieces[0].reshape(-1, self.row), pieces[1].reshape(-1, self.row), self.t, out.view(-1, self.row))


@chunk_form_of("nuslerp")
def nuslerp_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, t: float, flatten: bool,
                   row_wise: bool) -> GramChunks | _RowChunks | None:
    """Flattened: a Gram pass, then the combination. Per row of a tensor of known shape
    (``ctx.shape``, two dimensions or more): chunks of whole rows, no pass. Per column, or an
    unknown shape: on the whole tensor."""
    if flatten or (ctx.shape is not None and len(ctx.shape) <= 1):
        return GramChunks(2, lambda g: nuslerp_coefficients(g, float(t)))
    if row_wise or ctx.shape is None:
        return None
    return _RowChunks(ctx.shape[-1], float(t))
