"""An output that tasks write shard by shard and the driver commits: the Ray executor's writer.

:func:`plan_shards` lays an output's tensors out in files exactly as the streaming writer
(:class:`tvlang.io.StreamingWriter`) would; :class:`ShardedOutput` checks the output path,
opens the output's atomic replace, gives each shard file its path in the temporary, and,
once every task has written its shard, checks them, writes the index and the copied model
files, and commits: the same rules and the same transaction as a local run, with other
processes writing the weight files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tvlang.errors import TvlangError
from tvlang.io import (
    INDEX_NAME,
    SINGLE_NAME,
    TensorInfo,
    check_output_path,
    open_reader,
    replaceable,
    shard_name,
)
from tvlang.io.atomic import AtomicReplace, remove
from tvlang.io.model_files import copy_model_files, write_files
from tvlang.io.output_paths import input_paths
from tvlang.io.safetensors_format import build_index
from tvlang.io.writer import shard_metadata

__all__ = ["Shard", "ShardedOutput", "plan_shards"]


# -- shard boundaries ----------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    file: str
    layout: list[TensorInfo]


def plan_shards(layout: list[TensorInfo], shard_size: int | None, *, single_file: str | None = None) -> list[Shard]:
    """The files of an output, as ``StreamingWriter`` lays them out: a new shard when the next tensor
    would take the current one past ``shard_size`` bytes. ``single_file``: the one file's name.

    >>> import torch
    >>> infos = [TensorInfo(n, (4,), torch.float32, 16, "") for n in "abc"]
    >>> [(s.file, [i.name for i in s.layout]) for s in plan_shards(infos, 32)]
    [('model-00001-of-00002.safetensors', ['a', 'b']), ('model-00002-of-00002.safetensors', ['c'])]
    """
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for info in layout:
        if single_file is None and shard_size is not None and groups[-1] and size + info.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(info)
        size += info.nbytes
    if single_file is not None:
        return [Shard(single_file, groups[0])]
    if len(groups) == 1:
        return [Shard(SINGLE_NAME, groups[0])]
    return [Shard(shard_name(i, len(groups)), group) for i, group in enumerate(groups, start=1)]


# -- one output, written by tasks and committed by the driver ----------------------------------


class ShardedOutput:
    """An output whose shard files tasks write into its temporary; the driver finishes and commits it.

    The checks and the commit are the ``StreamingWriter``'s (the same output-path
    rules, the same atomic-replace transaction); what differs is who writes the
    weight files.
    """

    def __init__(self, name: str, path: Any, layout: list[TensorInfo], *, shard_size: int | None,
                 metadata: dict[str, str], inputs: list[Any], force: bool, copy_from: str | None,
                 files: dict[str, bytes] | None = None) -> None:
        self.name = name
        self.out = os.fspath(path)
        self.single_file = self.out.endswith(".safetensors")
        self.metadata = metadata
        self.force = force
        if shard_size is not None and shard_size <= 0:
            raise TvlangError(f"{self.out}: shard size must be positive, got {shard_size}")
        check_output_path(self.out, force=force, inputs=input_paths(inputs))
        self.target = os.path.realpath(self.out)
        self.layout = layout
        self.shards = plan_shards(layout, shard_size,
                                  single_file=os.path.basename(self.target) if self.single_file else None)
        self.copy_from = None if self.single_file else copy_from
        self.files = {} if self.single_file else dict(files or {})  # a model card: written with the index
        parent = os.path.dirname(self.target)
        try:
            os.makedirs(parent, exist_ok=True)
            self.replace = AtomicReplace(self.target, directory=not self.single_file)
        except OSError as exc:
            raise TvlangError(f"{self.out}: cannot create the output: {exc.strerror or exc}") from None
        # Tasks write into a directory: the output's temporary, or (a single file) one beside it.
        self.staging = self.replace.tmp if not self.single_file else self.replace.tmp + "-shard"
        if self.single_file:
            os.mkdir(self.staging)

    def shard_path(self, shard: Shard) -> str:
        return os.path.join(self.staging, shard.file)

    def shard_metadata(self, shard: Shard) -> dict[str, str]:
        """The metadata a shard's header holds (the recipe text only in the first one)."""
        return shard_metadata(self.metadata, self.shards.index(shard))

    def check(self) -> None:
        """Every shard is there, holds the planned tensors and metadata, and is as long as its header says."""
        for shard in self.shards:
            path = self.shard_path(shard)
            planned = self.shard_metadata(shard)
            where = f"output '{self.name}': shard {shard.file}"
            if not os.path.isfile(path):
                raise TvlangError(f"{where} is missing after its task reported it written ({path})",
                                  notes=("every worker must write to the same shared storage as the driver",))
            with open_reader(path) as reader:  # reading the header checks the size against it
                got = [(i.name, tuple(i.shape), i.dtype) for i in reader.infos()]
                metadata = reader.metadata
            wanted = [(i.name, tuple(i.shape), i.dtype) for i in shard.layout]
            if got != wanted or any(metadata.get(k) != v for k, v in planned.items()):
                raise TvlangError(f"{where} does not hold the planned tensors and metadata ({path})")

    def prepare(self) -> None:
        """Drop what killed tasks left, write the index and copied files, and sync."""
        try:
            self._prepare()
        except OSError as exc:
            self.abort()
            raise TvlangError(f"{self.out}: write failed: {exc.strerror or exc}; nothing was written to the output") \
                from None

    def _prepare(self) -> None:
        wanted = {shard.file for shard in self.shards}
        for entry in os.listdir(self.staging):
            if entry not in wanted:  # a temporary of a task that died and was retried
                remove(os.path.join(self.staging, entry))
        if self.single_file:
            os.replace(self.shard_path(self.shards[0]), self.replace.tmp)
            remove(self.staging)
        else:
            if len(self.shards) > 1:
                weight_map = {info.name: shard.file for shard in self.shards for info in shard.layout}
                with open(os.path.join(self.staging, INDEX_NAME), "wb") as f:
                    f.write(build_index(weight_map, sum(info.nbytes for info in self.layout)))
            copy_model_files(self.copy_from, self.staging)
            write_files(self.files, self.staging)
        self.replace.prepare()

    def publish(self) -> None:
        if os.path.lexists(self.target):
            if not self.force:
                self.abort()
                raise TvlangError(f"{self.out}: output appeared while writing; pass force=True to replace it")
            reason = replaceable(self.target)
            if reason:
                self.abort()
                raise TvlangError(f"{self.out}: refusing to replace it: {reason}")
        try:
            self.replace.publish()
        except OSError as exc:
            raise TvlangError(f"{self.out}: write failed: {exc.strerror or exc}; nothing was written to the output") \
                from None

    def withdraw(self) -> None:
        self.replace.withdraw()

    def finish(self) -> None:
        self.replace.finish()

    def abort(self) -> None:
        """Remove the temporary and what tasks wrote; the output path is left as it was."""
        self.replace.abort()
        remove(self.staging)
