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

import fnmatch
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from tvlang.errors import TvlangError
from tvlang.io import TensorReader, open_reader
from tvlang.run.adapters import adapter_reader

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


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in exclude)


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
    float64, so float32 rounding never accumulates over more than that many terms.
    """
    items = list(inputs.items()) if isinstance(inputs, Mapping) else list(inputs)
    if not items:
        raise TvlangError("similarity needs at least one task vector")
    names = [name for name, _ in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TvlangError(f"task vector name {dupes[0]!r} is given twice")
    forced_deltas = set(deltas)
    if dtype is not None:
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
        if dtype not in (torch.float32, torch.float64):
            raise TvlangError(f"similarity compute dtype must be float32 or float64, not {dtype}")

    readers = []
    base_reader = None
    try:
        if base is not None:
            base_reader = open_reader(base, label=_label(base, "base"))
        for name, obj in items:
            # A LoRA adapter (lora:DIR) is read over the base's names (or the first input's).
            adapter = adapter_reader(obj, base_reader if base_reader is not None else (readers or [None])[0])
            readers.append(adapter if adapter is not None else open_reader(obj, label=_label(obj, name)))
        is_delta = [r.kind == "delta" or n in forced_deltas for n, r in zip(names, readers)]
        if base_reader is None:
            models = [n for n, d in zip(names, is_delta) if not d]
            if models:
                raise TvlangError(
                    f"'{models[0]}' is a model, not a task vector, and no base was given",
                    notes=("pass the pretrained model with --base PRE (task vector = model - PRE),"
                           " or give task vector (Delta) files only",),
                )
        reference = base_reader if base_reader is not None else readers[0]
        tensors = _plan_tensors(reference, readers, names, include, exclude)
        if not tensors:
            what = ""
            if include or exclude:
                what = f" matching the filters (include={list(include)}, exclude={list(exclude)})"
            raise TvlangError(f"no floating-point tensors{what} in {reference.label}")
        if dtype is None:
            wide = any(r.info(t).dtype == torch.float64 for r in readers + [reference] for t, _ in tensors)
            dtype = torch.float64 if wide else torch.float32
        # The base is read only when some input is a model (task vector = model - base).
        subtract_from = base_reader if not all(is_delta) else None
        gram = _stream_gram(tensors, subtract_from, readers, is_delta, dtype, chunk_bytes, progress)
        bad = [names[i] for i in range(len(names)) if not np.isfinite(gram[i, i])]
        if bad:
            raise TvlangError(f"task vector '{bad[0]}' has NaN or infinite entries (or overflows float32);"
                              " its similarity is undefined")
        return Similarity(names=names, gram=gram, tensors=[t for t, _ in tensors],
                          elements=sum(numel for _, numel in tensors))
    finally:
        for r in readers + ([base_reader] if base_reader is not None else []):
            r.close()


# float32 products are summed over at most this many columns before going to float64
PRODUCT_COLUMNS = 32768


def _stream_gram(tensors, base_reader, readers, is_delta, dtype, chunk_bytes, progress) -> np.ndarray:
    n = len(readers)
    rows_per_block = n + (1 if base_reader is not None else 0)
    chunk = max(1, chunk_bytes // (2 * rows_per_block * dtype.itemsize))
    chunk = min(chunk, max(numel for _, numel in tensors))
    if chunk > PRODUCT_COLUMNS:
        chunk -= chunk % PRODUCT_COLUMNS
    # Two buffers: the worker fills one while the main thread multiplies the other.
    blocks = [torch.empty((rows_per_block, chunk), dtype=dtype) for _ in range(2)]
    sources = readers + ([base_reader] if base_reader is not None else [])  # a block's rows, in order
    staging = _Staging()

    def fill(block: torch.Tensor, tname: str, start: int, stop: int, following=None) -> torch.Tensor:
        if following is not None:
            for reader in sources:  # the kernel starts reading the next chunk of every file
                reader.prefetch(*following)
        width = stop - start
        if base_reader is not None:
            staging.read(base_reader, tname, start, stop, block[n, :width])
            base_np = block[n, :width].numpy()
        for i, reader in enumerate(readers):
            staging.read(reader, tname, start, stop, block[i, :width])
            if not is_delta[i]:
                # numpy, not torch: torch's intra-op threads would fight the BLAS threads
                row = block[i, :width].numpy()
                np.subtract(row, base_np, out=row)
        return block[:n, :width]

    work = [(t, s, min(numel, s + chunk)) for t, numel in tensors for s in range(0, numel, chunk)]
    gram = np.zeros((n, n), dtype=np.float64)
    announced = -1
    tensor_index = {t: i for i, (t, _) in enumerate(tensors)}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvlang-read") as ex:
        pending = ex.submit(fill, blocks[0], *work[0], work[1] if len(work) > 1 else None)
        for j, item in enumerate(work):
            rows = pending.result()
            if j + 1 < len(work):
                following = work[j + 2] if j + 2 < len(work) else None
                pending = ex.submit(fill, blocks[(j + 1) % 2], *work[j + 1], following)
            if progress is not None and tensor_index[item[0]] != announced:
                announced = tensor_index[item[0]]
                progress(item[0], announced, len(tensors))
            mat = rows.numpy()
            for c in range(0, mat.shape[1], PRODUCT_COLUMNS):
                part = mat[:, c:c + PRODUCT_COLUMNS]
                gram += part @ part.T  # numpy turns A @ A.T into one SYRK call
    return (gram + gram.T) / 2


class _Staging:
    """Reads a chunk of a tensor into a row of a block, in the block's dtype.

    A tensor stored in that dtype is read straight into the row; one stored in
    another (bfloat16, float16) is read into one reusable buffer, then converted.
    """

    def __init__(self) -> None:
        self._buffer = bytearray(0)

    def read(self, reader: TensorReader, name: str, start: int, stop: int, row: torch.Tensor) -> None:
        stored = reader.info(name).dtype
        if stored == row.dtype:
            reader.read_into(name, start, stop, row)
            return
        nbytes = (stop - start) * stored.itemsize
        if len(self._buffer) < nbytes:
            self._buffer = bytearray(nbytes)
        staged = torch.frombuffer(self._buffer, dtype=stored, count=stop - start)
        reader.read_into(name, start, stop, staged)
        row.copy_(staged)


def _label(obj: object, name: str) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    return f"<state dict '{name}'>"


def _plan_tensors(reference, readers, names, include, exclude) -> list[tuple[str, int]]:
    """The (name, numel) of the float tensors to sum, in the reference's file order; checks every input."""
    selected: list[tuple[str, int]] = []
    for tname in reference.names():
        info = reference.info(tname)
        if not info.dtype.is_floating_point or not _selected(tname, include, exclude):
            continue
        selected.append((tname, int(np.prod(info.shape, dtype=np.int64)) if info.shape else 1))
    wanted = {t for t, _ in selected}
    for name, reader in zip(names, readers):
        have = set(reader.names())
        for tname, _ in selected:
            if tname not in have:
                raise TvlangError(
                    f"tensor '{tname}' is in {reference.label} but missing from {reader.label} ('{name}')",
                    tensor=tname,
                )
            info = reader.info(tname)
            ref_shape = tuple(reference.info(tname).shape)
            if tuple(info.shape) != ref_shape:
                raise TvlangError(
                    f"tensor '{tname}' has shape {list(info.shape)} in {reader.label} ('{name}')"
                    f" but {list(ref_shape)} in {reference.label}",
                    tensor=tname,
                )
            if not info.dtype.is_floating_point:
                raise TvlangError(
                    f"tensor '{tname}' is {info.dtype} in {reader.label} ('{name}')"
                    f" but floating point in {reference.label}",
                    tensor=tname,
                )
        if reader is reference:
            continue
        for tname in have - wanted:
            info = reader.info(tname)
            if info.dtype.is_floating_point and _selected(tname, include, exclude) and tname not in reference.names():
                raise TvlangError(
                    f"tensor '{tname}' is in {reader.label} ('{name}') but not in {reference.label}",
                    tensor=tname,
                )
    return selected
