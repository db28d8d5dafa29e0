"""Sharded checkpoints: ``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``.

The index is ``{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}``
with shard file names relative to the index's directory. Every shard's header
is read when the index is opened, so names, shapes and dtypes are all known
before any tensor bytes are read; a shard's file is open only while it is read.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tvlang.io.base import (
    MAX_JSON_BYTES,
    MAX_TENSORS_PER_MODEL,
    TensorReader,
    io_error,
    kind_from_metadata,
    load_json,
    name_problem,
    open_regular,
    quoted,
    show,
)

if TYPE_CHECKING:
    import torch

__all__ = ["ShardedReader", "read_index", "shard_path"]

# The readers (which import torch) are imported where a shard is opened: read_index and
# shard_path serve the torch-free executor (tvlang.run.direct) too.


class ShardedReader(TensorReader):
    """The shards an index names, read as one checkpoint.

    ``names()`` lists shards in file-name order (``model-00001-of-00003`` first)
    and each shard's tensors in file order, so reading in ``names()`` order walks
    every file once, front to back. Only tensors the index lists are exposed.

    Shard files are open only while they are read: each is closed after its header
    is read, opened again by the first read of one of its tensors, and closed when
    a read moves on to another shard. So a run over 50 inputs of 17 shards holds
    about one file per input open, not 850 (more only while reads of several shards
    of one input overlap, one per read in progress).
    """

    def __init__(self, index_path: str | os.PathLike, *, label: str | None = None) -> None:
        from tvlang.io.safetensors_file import SafetensorsReader
        from tvlang.io.torch_file import TorchFileReader

        index_path = os.fspath(index_path)
        super().__init__(label if label is not None else index_path)
        weight_map = read_index(self.label, index_path)
        label_dir = os.path.dirname(self.label)
        # The model directory is the index's directory (resolved), not that of the file a
        # linked index points to: shards are named relative to where the index is found.
        real_dir = os.path.realpath(os.path.dirname(os.path.abspath(index_path)))
        self.root = real_dir
        self._shards: dict[str, TensorReader] = {}
        self._where: dict[str, TensorReader] = {}
        self._lock = threading.Lock()
        self._current: TensorReader | None = None  # the shard read last
        self._reading: dict[TensorReader, int] = {}  # reads in progress, per shard
        try:
            by_shard: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(name)
            for shard in sorted(by_shard):
                shard_label = os.path.join(label_dir, shard) if label_dir else shard
                path = shard_path(self.label, real_dir, shard)
                if shard.endswith(".safetensors"):
                    reader: TensorReader = SafetensorsReader(path, label=shard_label)
                else:
                    reader = TorchFileReader(path, label=shard_label)
                self._shards[shard] = reader
                reader.park()
                self._reading[reader] = 0
                wanted = set(by_shard[shard])
                for name in wanted - set(reader.names()):
                    raise io_error(
                        self.label,
                        f"index puts tensor {quoted(name)} in {quoted(shard)} but that shard has no such tensor",
                        tensor=name,
                    )
                for name in reader.names():  # shard file order
                    if name in wanted:
                        self._infos[name] = reader.info(name)
                        self._where[name] = reader
        except BaseException:
            self.close()
            raise
        # Every shard's metadata, the first file's winning: tvlang writes its recipe text
        # in the first shard only (tvlang.io.writer.ONCE), other keys in all of them.
        self.metadata = {}
        for shard in sorted(self._shards):
            for key, value in self._shards[shard].metadata.items():
                self.metadata.setdefault(key, value)
        self.kind = kind_from_metadata(self.metadata)
        self.paths = (os.path.realpath(index_path),) + tuple(p for r in self._shards.values() for p in r.paths)

    def read(self, name: str) -> torch.Tensor:
        with self._shard(name) as shard:
            return shard.read(name)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        with self._shard(name) as shard:
            return shard.read_range(name, start, stop)

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        with self._shard(name) as shard:
            shard.read_into(name, start, stop, out)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        with self._shard(name) as shard:
            shard.prefetch(name, start, stop)

    @contextlib.contextmanager
    def _shard(self, name: str) -> Iterator[TensorReader]:
        """The shard holding ``name``, for one read: the shard read before it is parked
        (its file closed) unless a read of it is still in progress."""
        self.info(name)
        shard = self._where[name]
        with self._lock:
            self._reading[shard] += 1
            previous, self._current = self._current, shard
            if previous is not None and previous is not shard and not self._reading[previous]:
                previous.park()
        try:
            yield shard
        finally:
            with self._lock:
                self._reading[shard] -= 1
                if shard is not self._current and not self._reading[shard]:
                    shard.park()

    def park(self) -> None:
        with self._lock:
            for shard, reads in self._reading.items():
                if not reads:
                    shard.park()

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()


def _check_count(label: str, count: int) -> None:
    if count > MAX_TENSORS_PER_MODEL:
        raise io_error(
            label,
            f"index lists {count} tensors, more than the {MAX_TENSORS_PER_MODEL} tvlang reads from one model"
            " (the largest real models hold about 150,000)",
        )


def read_index(label: str, path: str) -> dict[str, str]:
    fd, size = open_regular(label, path)
    try:
        if size > MAX_JSON_BYTES:
            raise io_error(label, f"index is {size} bytes, more than the {MAX_JSON_BYTES} allowed; not an index?")
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise io_error(label, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    index = load_json(label, text, "index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise io_error(label, "index has no 'weight_map' object (expected {\"weight_map\": {tensor: shard file}})")
    weight_map = index["weight_map"]
    _check_count(label, len(weight_map))
    for name, shard in weight_map.items():
        problem = name_problem(name)
        if problem is not None:
            raise io_error(label, f"index names a tensor {quoted(name)}, which {problem}", tensor=name)
        if not isinstance(shard, str) or not shard:
            raise io_error(label, f"index entry for tensor {quoted(name)} is not a file name", tensor=name)
        problem = name_problem(shard) or ("contains a NUL character" if "\0" in shard else None)
        if problem is not None:
            raise io_error(
                label, f"index puts tensor {quoted(name)} in {quoted(shard)}, whose name {problem}", tensor=name
            )
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise io_error(
                label,
                f"index puts tensor {quoted(name)} in {quoted(shard)}, outside the index's directory",
                tensor=name,
            )
    return weight_map


def shard_path(label: str, directory: str, shard: str) -> str:
    """The path of ``shard`` of the index ``label`` in the model ``directory`` (resolved): one
    inside it (:func:`_inside`) that exists."""
    path = _inside(label, directory, shard)
    if not os.path.exists(path):
        label_dir = os.path.dirname(label)
        shard_label = os.path.join(label_dir, shard) if label_dir else shard
        raise io_error(label, f"shard {quoted(shard)} listed in the index does not exist (looked for {show(shard_label)})")
    return path


def _inside(label: str, directory: str, shard: str) -> str:
    """The path of ``shard`` in the model ``directory`` (resolved), refusing one that
    leads outside it through a symbolic link.

    One layout is allowed to leave: the Hugging Face hub cache, where
    ``<repo>/snapshots/<revision>/<file>`` links to ``<repo>/blobs/<hash>``.
    """
    path = os.path.join(directory, shard)
    resolved = os.path.realpath(path)
    roots = [directory]
    folder = directory  # the index may sit in a subfolder of the snapshot (snapshots/<commit>/sub)
    while os.path.dirname(folder) != folder:
        parent = os.path.dirname(folder)
        if os.path.basename(parent) == "snapshots":
            roots.append(os.path.join(os.path.dirname(parent), "blobs"))
            break
        folder = parent
    for root in roots:
        if os.path.commonpath([root, resolved]) == root:
            return path
    raise io_error(
        label,
        f"shard {quoted(shard)} resolves to {show(resolved)}, outside the model directory {show(directory)}"
        " (a symbolic link leads out of it)",
    )
