"""Sharded checkpoints: ``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``.

The index is ``{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}``
with shard file names relative to the index's directory. Every shard's header
is read when the index is opened, so names, shapes and dtypes are all known
before any tensor bytes are read.
"""

from __future__ import annotations

import json
import os

import torch

from tvlang.io.base import TensorReader, io_error, kind_from_metadata
from tvlang.io.safetensors_file import SafetensorsReader
from tvlang.io.torch_file import TorchFileReader

__all__ = ["ShardedReader"]


class ShardedReader(TensorReader):
    """The shards an index names, read as one checkpoint.

    ``names()`` lists shards in file-name order (``model-00001-of-00003`` first)
    and each shard's tensors in file order, so reading in ``names()`` order walks
    every file once, front to back. Only tensors the index lists are exposed.
    """

    def __init__(self, index_path: str | os.PathLike, *, label: str | None = None) -> None:
        index_path = os.fspath(index_path)
        super().__init__(label if label is not None else index_path)
        weight_map = _read_index(self.label, index_path)
        label_dir = os.path.dirname(self.label)
        real_dir = os.path.dirname(os.path.realpath(index_path))
        self.root = real_dir
        self._shards: dict[str, TensorReader] = {}
        self._where: dict[str, TensorReader] = {}
        try:
            by_shard: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(name)
            for shard in sorted(by_shard):
                shard_label = os.path.join(label_dir, shard) if label_dir else shard
                shard_path = os.path.join(real_dir, shard)
                if not os.path.isfile(shard_path):
                    raise io_error(
                        self.label, f"shard '{shard}' listed in the index does not exist (looked for {shard_label})"
                    )
                if shard.endswith(".safetensors"):
                    reader: TensorReader = SafetensorsReader(shard_path, label=shard_label)
                else:
                    reader = TorchFileReader(shard_path, label=shard_label)
                self._shards[shard] = reader
                wanted = set(by_shard[shard])
                for name in wanted - set(reader.names()):
                    raise io_error(
                        self.label, f"index puts tensor '{name}' in '{shard}' but that shard has no such tensor", tensor=name
                    )
                for name in reader.names():  # shard file order
                    if name in wanted:
                        self._infos[name] = reader.info(name)
                        self._where[name] = reader
        except BaseException:
            self.close()
            raise
        first = next(iter(self._shards.values()), None)
        self.metadata = dict(first.metadata) if first is not None else {}
        self.kind = kind_from_metadata(self.metadata)
        self.paths = (os.path.realpath(index_path),) + tuple(p for r in self._shards.values() for p in r.paths)

    def read(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._where[name].read(name)

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()


def _read_index(label: str, path: str) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise io_error(label, "no such file") from None
    except OSError as exc:
        raise io_error(label, f"cannot read: {exc.strerror}") from None
    try:
        index = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise io_error(label, f"index is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise io_error(label, "index has no 'weight_map' object (expected {\"weight_map\": {tensor: shard file}})")
    weight_map = index["weight_map"]
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise io_error(label, f"index entry for tensor '{name}' is not a file name", tensor=name)
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise io_error(label, f"index puts tensor '{name}' in '{shard}', outside the index's directory", tensor=name)
    return weight_map
