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

The chunk form (:class:`FusionPasses`) takes pieces of whole rows: a sample of rows across the
tensor guesses a window of importances for each quartile, a pass takes each row's KL (the same
per-row sums as the whole tensor's) and gathers the importances inside the windows (an exact
select of ``max(I, 0)``: :class:`tvlang.ops.threshold.WindowSelect`; a radix select's two passes
more where a window misses, and over ``-I`` of the negative importances, where a row's KL rounds
below 0, for a quartile that falls among them), then each piece is fused: the same results as
the whole kernel, two reads of the inputs in the common case, memory a float per row and the
windows' entries.

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

from tvlang.ops import native
from tvlang.ops.common import ChunkKernel, chunk_form_of, fresh, kernel_of, scratch
from tvlang.ops.context import TensorContext
from tvlang.ops.threshold import RadixSelect, WindowSelect

__all__ = ["arcee_fusion", "arcee_fusion_chunks", "importance", "row_kl", "fence", "FusionPasses"]

SOFTMAX_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per row along the last dimension, the KL divergence of the softmaxes (size 1 there)."""
    p = F.softmax(model, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base|`` times the KL divergence of the rows' softmax (see the module docstring)."""
    return (model - base).abs() * row_kl(model, base)


def quartile_ranks(n: int) -> list[int]:
    """The ascending indices of the three quartiles of ``n`` entries (a float32 product, as mergekit)."""
    return (torch.tensor(QUANTILES) * (n - 1)).long().tolist()


def fence_of(q1: torch.Tensor, q2: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    return q2 + 1.5 * (q3 - q1)


def fence(scores: torch.Tensor) -> torch.Tensor:
    """``Q2 + 1.5*(Q3 - Q1)`` of ``scores`` (a 0-d tensor of their dtype), exact order statistics."""
    flat = scores.reshape(-1)
    at = quartile_ranks(flat.numel())
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        values = numpy.partition(flat.numpy(), at)[at]
        q1, q2, q3 = (torch.tensor(v, dtype=flat.dtype) for v in values)
    else:
        ordered = torch.sort(flat).values
        q1, q2, q3 = ordered[at[0]], ordered[at[1]], ordered[at[2]]
    return fence_of(q1, q2, q3)


@kernel_of("arcee_fusion")
def arcee_fusion(inputs: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """The base, with the model's entries where their importance reaches the fence."""
    base, model = inputs
    if base.numel() == 0:
        return fresh(base).copy_(base)
    scores = importance(model, base)
    out = fresh(base)
    return _fuse(base, model, scores, fence(scores), out)


def _fuse(base: torch.Tensor, model: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor,
          out: torch.Tensor) -> torch.Tensor:
    """``base + (model - base) * [scores >= threshold]`` into ``out``."""
    mask = (scores >= threshold).to(base.dtype)
    torch.sub(model, base, out=out)
    return out.mul_(mask).add_(base)


class FusionPasses(ChunkKernel):
    """``arcee_fusion`` over pieces of whole rows of ``m`` entries (see the module docstring).

    The quartile at ascending index ``r`` is the ``(n - r)``-th largest of ``max(I, 0)`` where at
    most ``r`` importances are negative, else the ``(r + 1)``-th largest of the negated negative
    ones, negated (NaN ranks above every number, as in the whole kernel's sort). The first is a
    :class:`tvlang.ops.threshold.WindowSelect`: on the CPU, a sample of whole rows spread over the
    tensor (``sample``) gives each quartile a window of importances, and pass 0, which also keeps
    each row's KL, gathers the importances inside the windows; where a quartile falls outside its
    window, two passes more (a radix select). The second is a :class:`RadixSelect` fed in pass 0,
    finished in pass 1 where a quartile falls among the negative importances (rows whose KL rounds
    below 0). So one pass before the fusion in the common case, where 0.3's chunk form took two.
    """

    def __init__(self, numel: int, m: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.numel, self.row, self.dtype = numel, max(m, 1), dtype
        self.ranks = quartile_ranks(numel)
        self.kls: list[torch.Tensor] = []
        self.kl: torch.Tensor | None = None
        self.at = 0  # rows handed over so far in this pass
        self.negative = 0
        self.upper = WindowSelect(numel, sorted({numel - r for r in self.ranks}))  # max(I, 0)
        self.lower = RadixSelect()  # -I of the I < 0
        self.lower_wanted = False
        self.sampling = torch.device(device).type == "cpu"  # the window's gathers are numpy's
        self.threshold: torch.Tensor | None = None

    @property
    def passes(self) -> int:  # 1, or more where a window missed or a quartile is negative
        return max(self.upper.passes, 2 if self.lower_wanted else 1)

    def _rows(self, base: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The piece as rows of ``model`` and ``base``, and their KL (computed in pass 0, kept)."""
        rows = base.numel() // self.row
        m, b = model.reshape(rows, self.row), base.reshape(rows, self.row)
        if self.kl is None:  # pass 0: these rows' KL, kept for the later passes
            kl = row_kl(m, b)
            self.kls.append(kl)
        else:
            kl = self.kl[self.at:self.at + rows]
        self.at += rows
        return m, b, kl

    def _scores(self, m: torch.Tensor, b: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        out = scratch("fusion.scores", m)
        if native.fusion_f32(b, m, kl, None, out) is not None:  # the same values in one C pass
            return out
        return torch.mul(torch.sub(m, b, out=out).abs_(), kl, out=out)

    def sample(self, pieces: list[torch.Tensor]) -> None:
        base, model = pieces
        rows = base.numel() // self.row
        m, b = model.reshape(rows, self.row), base.reshape(rows, self.row)
        self.upper.sample(self._scores(m, b, row_kl(m, b)).reshape(-1).clamp(min=0))

    def end_sample(self) -> None:
        self.upper.end_sample()

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        scores = self._scores(*self._rows(*pieces)).reshape(-1)
        self.upper.update(pass_index, scores.clamp(min=0))
        if pass_index == 0 or (pass_index == 1 and self.lower_wanted):  # the radix select's two passes
            below = scores < 0
            negative = int(torch.count_nonzero(below))
            if pass_index == 0:
                self.negative += negative
            if negative:
                self.lower.update(pass_index, scores[below].neg())

    def end_pass(self, pass_index: int) -> None:
        self.at = 0
        if pass_index == 0:
            self.kl = torch.cat(self.kls) if self.kls else torch.empty(0, 1, dtype=self.dtype)
            self.kls = []
            for r in self.ranks:
                if r < self.negative:
                    self.lower.want(r + 1)
                    self.lower_wanted = True
        self.upper.end_pass(pass_index)
        if pass_index + 1 < self.passes:
            return
        q = [self.upper.value(self.numel - r) if r >= self.negative else -self.lower.value(r + 1)
             for r in self.ranks]
        self.threshold = fence_of(*(torch.tensor(v, dtype=self.dtype) for v in q))

    def restart(self) -> None:
        self.at = 0

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        base, model = pieces
        m, b, kl = self._rows(base, model)
        if native.fusion_f32(b, m, kl, float(self.threshold), out.view(m.shape)) is not None:
            return  # the importances, the mask and the fusion in one C pass: _fuse's values
        scores = torch.mul(torch.sub(m, b).abs_(), kl).reshape(base.shape)
        _fuse(base, model, scores, self.threshold.to(base.device), out)


@chunk_form_of("arcee_fusion")
def arcee_fusion_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype) -> ChunkKernel | None:
    """Pieces of whole rows (``ctx.shape``'s last dimension; a tensor of unknown shape is one
    row). float64 runs whole (the radix select orders float32 bit patterns)."""
    if dtype == torch.float64 or numel == 0:
        return None
    m = (ctx.shape[-1] if len(ctx.shape) else 1) if ctx.shape is not None else numel
    return FusionPasses(numel, m, dtype, ctx.device)
