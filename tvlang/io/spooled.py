"""A safetensors file whose tensors are known one by one, before its layout is.

The streaming writer needs every tensor's name and shape first (the header comes
first in the file). Some outputs learn which tensors they hold only as they make
them: an adapter extracted from a task vector leaves out the modules whose delta
is zero, and knows that only once each delta is computed. ``SpooledSafetensors``
appends each tensor's bytes to a scratch file as it comes (nothing is kept in
memory), and ``finish`` writes the safetensors file through ``StreamingWriter``,
copying the bytes back a block at a time. The scratch file is removed either way.

>>> import os, tempfile, torch
>>> from tvlang.io import open_reader
>>> folder = tempfile.mkdtemp()
>>> spool = SpooledSafetensors(os.path.join(folder, "scratch"))
>>> spool.add("b", torch.ones(2, 3)); spool.add("a", torch.arange(4.0))
>>> spool.finish(os.path.join(folder, "out.safetensors"), {"format": "pt"})
>>> reader = open_reader(os.path.join(folder, "out.safetensors"))
>>> reader.names(), reader.read("a").tolist(), sorted(os.listdir(folder))
(['b', 'a'], [0.0, 1.0, 2.0, 3.0], ['out.safetensors'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from tvlang.io.base import TensorInfo
from tvlang.io.writer import StreamingWriter

__all__ = ["SpooledSafetensors"]

COPY_BYTES = 4 << 20  # bytes copied from the scratch file to the output at a time


class SpooledSafetensors:
    """Tensors added in output order, spooled to ``scratch`` until ``finish`` writes them."""

    def __init__(self, scratch: str | os.PathLike) -> None:
        self.scratch = os.fspath(scratch)
        self.file = open(self.scratch, "w+b")
        self.entries: list[tuple[TensorInfo, int]] = []  # (info, offset in the scratch file)
        self.size = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (CPU; its bytes go to the scratch file now)."""
        tensor = tensor.detach().to("cpu").contiguous()
        info = TensorInfo.of(name, tensor, "")
        if info.nbytes:
            data = memoryview(tensor.view(torch.uint8).reshape(-1).numpy())
            self.file.seek(self.size)
            self.file.write(data)
        self.entries.append((info, self.size))
        self.size += info.nbytes

    def finish(self, out: str | os.PathLike, metadata: Mapping[str, str]) -> None:
        """Write the tensors added, in order, as the safetensors file ``out`` (replaced if there)."""
        try:
            self.file.flush()
            layout = [info for info, _ in self.entries]
            buffer = torch.empty(min(COPY_BYTES, max(self.size, 1)), dtype=torch.uint8)
            with StreamingWriter(out, layout, shard_size=None, metadata=metadata, force=True) as writer:
                for info, offset in self.entries:
                    if not info.nbytes:
                        writer.write(info.name, torch.empty(info.shape, dtype=info.dtype))
                        continue
                    step = COPY_BYTES - COPY_BYTES % info.dtype.itemsize
                    for start in range(0, info.nbytes, step):
                        count = min(step, info.nbytes - start)
                        self.file.seek(offset + start)
                        piece = buffer[:count]
                        if self.file.readinto(memoryview(piece.numpy())) != count:
                            raise OSError(f"{self.scratch}: the scratch file is shorter than written")
                        writer.write_part(info.name, piece.view(info.dtype))
        finally:
            self.close()

    def close(self) -> None:
        """Remove the scratch file (done by ``finish``; call it when giving up)."""
        if not self.file.closed:
            self.file.close()
        try:
            os.remove(self.scratch)
        except FileNotFoundError:
            pass
