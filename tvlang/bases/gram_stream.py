"""The Gram matrix's streaming core: inputs opened, tensors planned, partial sums over any range.

``similarity`` (``tvlang.bases.gram``) sums the Gram matrix of N task vectors over
every tensor in one process; the Ray executor (``tvlang.bases.gram_ray``) sums it
over ranges of tensors, one task each, and adds the parts on the driver. Both go
through :func:`partial_gram`, and the result does not depend on how the tensors
are split: each tensor's Gram matrix is computed alone (its chunks, of a width
fixed by the whole job's :class:`GramPlan`, summed in float64 in order), and the
tensors' matrices are added exactly (``tvlang.ops.sums.ExactMatrix``, rounded
once), so any split and any order of adding the parts give the same bits.
"""

from __future__ import annotations

import fnmatch
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from tvlang.errors import TvlangError
from tvlang.io import TensorReader, open_reader
from tvlang.ops.sums import ExactMatrix
from tvlang.run.adapters import adapter_reader

__all__ = ["PRODUCT_COLUMNS", "GramInputs", "GramPlan", "OpenInputs", "open_inputs", "partial_gram", "plan_gram"]

# float32 products are summed over at most this many columns before going to float64
PRODUCT_COLUMNS = 32768


@dataclass(frozen=True)
class GramInputs:
    """The task vectors as given (name, path or state dict), the base, and the names forced to be Deltas."""

    items: tuple[tuple[str, object], ...]
    base: object | None
    deltas: frozenset[str]


@dataclass(frozen=True)
class GramPlan:
    """What every part of one job shares: the tensors (name, numel), the compute dtype, the chunk width."""

    tensors: tuple[tuple[str, int], ...]
    dtype: str  # "float32" or "float64"
    chunk: int  # columns per chunk: fixed for the job, so a tensor's sum does not depend on its neighbours


@dataclass
class OpenInputs:
    names: list[str]
    readers: list[TensorReader]
    base_reader: TensorReader | None
    is_delta: list[bool]

    @property
    def reference(self) -> TensorReader:
        return self.base_reader if self.base_reader is not None else self.readers[0]

    @property
    def subtract_from(self) -> TensorReader | None:
        """The base, read only when some input is a model (task vector = model - base)."""
        return self.base_reader if not all(self.is_delta) else None

    def close(self) -> None:
        for reader in self.readers + ([self.base_reader] if self.base_reader is not None else []):
            reader.close()


def open_inputs(inputs: GramInputs) -> OpenInputs:
    """Open every input (and the base); a model without a base is an error naming it."""
    names = [name for name, _ in inputs.items]
    opened = OpenInputs(names, [], None, [])
    try:
        if inputs.base is not None:
            opened.base_reader = open_reader(inputs.base, label=_label(inputs.base, "base"))
        for name, obj in inputs.items:
            # A LoRA adapter (lora:DIR) is read over the base's names (or the first input's).
            first = opened.base_reader if opened.base_reader is not None else (opened.readers or [None])[0]
            adapter = adapter_reader(obj, first)
            opened.readers.append(adapter if adapter is not None else open_reader(obj, label=_label(obj, name)))
        opened.is_delta = [r.kind == "delta" or n in inputs.deltas for n, r in zip(names, opened.readers)]
        if opened.base_reader is None:
            models = [n for n, d in zip(names, opened.is_delta) if not d]
            if models:
                raise TvlangError(
                    f"'{models[0]}' is a model, not a task vector, and no base was given",
                    notes=("pass the pretrained model with --base PRE (task vector = model - PRE),"
                           " or give task vector (Delta) files only",),
                )
    except BaseException:
        opened.close()
        raise
    return opened


def plan_gram(opened: OpenInputs, include: Sequence[str], exclude: Sequence[str], dtype: torch.dtype | None,
              chunk_bytes: int) -> GramPlan:
    """The tensors to sum (checked in every input), the compute dtype, and the chunk width."""
    tensors = _plan_tensors(opened.reference, opened.readers, opened.names, include, exclude)
    if not tensors:
        what = ""
        if include or exclude:
            what = f" matching the filters (include={list(include)}, exclude={list(exclude)})"
        raise TvlangError(f"no floating-point tensors{what} in {opened.reference.label}")
    if dtype is None:
        sources = opened.readers + [opened.reference]
        wide = any(r.info(t).dtype == torch.float64 for r in sources for t, _ in tensors)
        dtype = torch.float64 if wide else torch.float32
    rows = len(opened.readers) + (1 if opened.subtract_from is not None else 0)
    chunk = max(1, chunk_bytes // (2 * rows * dtype.itemsize))  # two chunk buffers under chunk_bytes
    chunk = min(chunk, max(numel for _, numel in tensors))
    if chunk > PRODUCT_COLUMNS:
        chunk -= chunk % PRODUCT_COLUMNS
    return GramPlan(tuple(tensors), str(dtype).removeprefix("torch."), chunk)


def partial_gram(opened: OpenInputs, plan: GramPlan, names: Sequence[str],
                 on_tensor: Callable[[str], None] | None = None) -> ExactMatrix:
    """The exact sum of the Gram matrices of the tensors ``names`` (a part of ``plan.tensors``).

    Each tensor is cut into chunks of ``plan.chunk`` columns; the N x chunk matrix of
    deltas of one chunk is formed in ``plan.dtype``, read ahead by a worker thread while
    the previous chunk's product is computed. Products are taken over column blocks of
    ``PRODUCT_COLUMNS`` and summed in float64, so float32 rounding never accumulates over
    more than that many terms; ``on_tensor(name)`` is called as each tensor starts.
    """
    readers, base_reader = opened.readers, opened.subtract_from
    is_delta = opened.is_delta
    n = len(readers)
    numel = dict(plan.tensors)
    dtype = getattr(torch, plan.dtype)
    chunk = plan.chunk
    rows_per_block = n + (1 if base_reader is not None else 0)
    # Two buffers: the worker fills one while the main thread multiplies the other.
    widest = min(chunk, max((numel[t] for t in names), default=1))
    blocks = [torch.empty((rows_per_block, widest), dtype=dtype) for _ in range(2)]
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

    work = [(t, s, min(numel[t], s + chunk)) for t in names for s in range(0, numel[t], chunk)]
    total = ExactMatrix(n)
    if not work:
        return total
    gram = np.zeros((n, n), dtype=np.float64)  # the current tensor's
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvlang-read") as ex:
        pending = ex.submit(fill, blocks[0], *work[0], work[1] if len(work) > 1 else None)
        for j, item in enumerate(work):
            rows = pending.result()
            if j + 1 < len(work):
                following = work[j + 2] if j + 2 < len(work) else None
                pending = ex.submit(fill, blocks[(j + 1) % 2], *work[j + 1], following)
            if item[1] == 0 and on_tensor is not None:
                on_tensor(item[0])
            mat = rows.numpy()
            for c in range(0, mat.shape[1], PRODUCT_COLUMNS):
                part = mat[:, c:c + PRODUCT_COLUMNS]
                gram += part @ part.T  # numpy turns A @ A.T into one SYRK call
            if j + 1 == len(work) or work[j + 1][0] != item[0]:  # the tensor's last chunk
                total.add(gram)
                gram[:] = 0.0
    return total


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


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in exclude)


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
