"""Task vector similarity in one streaming pass (a Gram matrix).

After Zhang et al., "Efficient Model Editing with Task Vector Bases": the
cosine similarity matrix of N task vectors is computed from their Gram
matrix ``G[i, j] = <tau_i, tau_j>``, which is a sum over tensors, so one pass
over all inputs, tensor by tensor, is enough. Big tensors are cut into chunks
so that the N x chunk matrix of deltas stays under ``chunk_bytes``: memory is
the N x N matrix plus one chunk per input, whatever the model size.

>>> import torch
>>> pre = {"w": torch.zeros(3), "step": torch.tensor([7])}
>>> a = {"w": torch.tensor([1.0, 0.0, 0.0]), "step": torch.tensor([7])}
>>> b = {"w": torch.tensor([1.0, 1.0, 0.0]), "step": torch.tensor([7])}
>>> sim = similarity({"a": a, "b": b}, base=pre)
>>> round(float(sim.cosine[0, 1]), 4), sim.tensors      # integer tensors are skipped
(0.7071, ['w'])
>>> print(sim.format_table())
        a       b
a   1.000   0.707
b   0.707   1.000
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from tvlang.bases.gram_ray import ray_gram
from tvlang.bases.gram_stream import GramInputs, open_inputs, partial_gram, plan_gram
from tvlang.errors import TvlangError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Similarity",
    "format_matrix",
    "similarity",
]

DEFAULT_CHUNK_BYTES = 64 * 2**20


# -- similarity ------------------------------------------------------------------

@dataclass
class Similarity:
    """The Gram matrix of N task vectors and what follows from it.

    ``cosine[i, j] = gram[i, j] / (norms[i] * norms[j])``; a zero task vector has
    cosine 0 with everything, itself included (it has no direction).
    """

    names: list[str]
    gram: np.ndarray                 # float64, N x N
    tensors: list[str] = field(default_factory=list)   # tensor names that were summed
    elements: int = 0                # parameters per task vector that were summed

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.gram), 0.0, None))

    @property
    def cosine(self) -> np.ndarray:
        norms = self.norms
        outer = np.outer(norms, norms)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(outer > 0, self.gram / np.where(outer > 0, outer, 1.0), 0.0)
        cos = np.clip(cos, -1.0, 1.0)
        np.fill_diagonal(cos, np.where(norms > 0, 1.0, 0.0))
        return cos

    def to_dict(self) -> dict:
        """``{"names", "cosine", "norms"}``: what ``tvlang similarity --json`` prints."""
        return {
            "names": list(self.names),
            "cosine": [[float(x) for x in row] for row in self.cosine],
            "norms": [float(x) for x in self.norms],
        }

    def format_table(self, order: Sequence[int] | None = None) -> str:
        return format_matrix(self.cosine, self.names, self.names, order=order)


def format_matrix(values: np.ndarray, rows: Sequence[str], cols: Sequence[str],
                  order: Sequence[int] | None = None) -> str:
    """An aligned text table, 3 decimals, names as row and column labels."""
    rows_idx = list(order) if order is not None else list(range(len(rows)))
    cols_idx = list(order) if order is not None and len(cols) == len(rows) else list(range(len(cols)))
    label_width = max((len(rows[i]) for i in rows_idx), default=0)
    widths = [max(len(cols[j]), 6) for j in cols_idx]
    lines = [" " * label_width + "".join(f"  {cols[j]:>{w}}" for j, w in zip(cols_idx, widths))]
    for i in rows_idx:
        cells = "".join(f"  {values[i, j]:>{w}.3f}" for j, w in zip(cols_idx, widths))
        lines.append(f"{rows[i]:<{label_width}}{cells}")
    return "\n".join(lines)


def similarity(
    inputs: Mapping[str, object] | Sequence[tuple[str, object]],
    base: object | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    deltas: Iterable[str] = (),
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    dtype: torch.dtype | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    task_timeout: float | None = None,
) -> Similarity:
    """Gram matrix of the task vectors ``inputs`` in one pass, tensor by tensor.

    ``inputs`` maps a name to a fine-tuned Model (task vector ``ft - base``) or
    a Delta (a file whose metadata says ``tvlang.kind = delta``, or a name
    listed in ``deltas``). Without ``base`` every input must be a Delta.
    ``include``/``exclude`` are globs over tensor names; non-float tensors are
    skipped.

    Each tensor is cut into chunks; the N x chunk matrix of deltas of one chunk
    is formed in ``dtype`` (default float32, float64 when an input tensor is
    float64), read ahead by a worker thread while the previous chunk's product
    is computed; the two chunk buffers together stay under ``chunk_bytes``.
    Products are taken over column blocks of ``PRODUCT_COLUMNS`` and summed in
    float64, so float32 rounding never accumulates over more than that many terms;
    each tensor's matrix is added exactly (``tvlang.bases.gram_stream``), so the
    result does not depend on how the tensors are split among tasks.

    ``executor="ray"`` sums ranges of tensors as Ray tasks (``address``, or a local
    Ray instance of ``workers`` CPUs; ``task_timeout`` seconds per task) and adds
    their parts on the driver: the same matrix (docs/distributed.md).
    """
    items = list(inputs.items()) if isinstance(inputs, Mapping) else list(inputs)
    if not items:
        raise TvlangError("similarity needs at least one task vector")
    names = [name for name, _ in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TvlangError(f"task vector name {dupes[0]!r} is given twice")
    if dtype is not None:
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
        if dtype not in (torch.float32, torch.float64):
            raise TvlangError(f"similarity compute dtype must be float32 or float64, not {dtype}")
    if executor not in ("local", "ray"):
        raise TvlangError(f"unknown executor '{executor}'; the executors are local, ray")
    if executor == "local" and (address is not None or workers is not None or task_timeout is not None):
        raise TvlangError("address=, workers= and task_timeout= are options of executor='ray'")

    given = GramInputs(tuple(items), base, frozenset(deltas))
    opened = open_inputs(given)
    try:
        plan = plan_gram(opened, include, exclude, dtype, chunk_bytes)
        if executor == "local":
            index = {t: i for i, (t, _) in enumerate(plan.tensors)}

            def on_tensor(name: str) -> None:
                if progress is not None:
                    progress(name, index[name], len(plan.tensors))

            gram = partial_gram(opened, plan, [t for t, _ in plan.tensors], on_tensor).value()
    finally:
        opened.close()
    if executor == "ray":  # the inputs were checked here; the tasks open them again where they run
        gram = ray_gram(given, plan, address=address, workers=workers, task_timeout=task_timeout,
                        progress=progress)
    bad = [names[i] for i in range(len(names)) if not np.isfinite(gram[i, i])]
    if bad:
        raise TvlangError(f"task vector '{bad[0]}' has NaN or infinite entries (or overflows float32);"
                          " its similarity is undefined")
    return Similarity(names=names, gram=gram, tensors=[t for t, _ in plan.tensors],
                      elements=sum(numel for _, numel in plan.tensors))

