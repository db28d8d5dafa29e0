"""Outputs as PyTorch state dict files: ``-o merged.pt`` (or ``.pth``, ``.bin``).

A ``torch.save`` file is one pickle over a zip archive, written in one call: it
cannot be appended to tensor by tensor as a safetensors file is. So the
``StateDictWriter`` keeps the whole output in memory (each tensor copied once, on
the CPU, in the output dtype) and saves it at ``prepare()``, under the temporary
name of ``tvlang.io.atomic``, renamed into place by ``publish()``: a crash, a full
disk or Ctrl-C leaves no file at the target. Everything else is the
``StreamingWriter``'s: the layout (names in order, shapes, dtypes) checked as
tensors arrive, the output-path rules (an input is never replaced; ``--force``
replaces only a file that ``torch.save`` wrote, never a directory).

The file is a plain ``dict`` of tensors: ``torch.load(path, weights_only=True)``
reads it, and ``model.load_state_dict`` takes it. It holds no metadata (a state
dict has no place for it): no recipe, and no mark that a task vector is one.

>>> import os, tempfile, torch
>>> from tvlang.io import TensorInfo
>>> out = os.path.join(tempfile.mkdtemp(), "merged.pt")
>>> layout = [TensorInfo("w", (2,), torch.float32, 8, "")]
>>> with open_writer(out, layout) as writer:
...     writer.write("w", torch.tensor([1.0, 2.0]))
>>> torch.load(out, weights_only=True)
{'w': tensor([1., 2.])}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from tvlang.io.base import TensorInfo
from tvlang.io.output_paths import output_format
from tvlang.io.writer import StreamingWriter, _Shard

__all__ = ["StateDictWriter", "open_writer"]


class StateDictWriter(StreamingWriter):
    """Writes a layout of tensors, in order, as one ``torch.save`` state dict file.

    The whole output is held in memory until it is saved; ``metadata``, ``copy_from``
    and ``files`` are accepted for the ``StreamingWriter``'s signature and not written.
    """

    FILE_FORMAT = "torch"

    def __init__(self, out: str | os.PathLike, layout: Sequence[TensorInfo], **options: Any) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        super().__init__(out, layout, **options)

    def _plan_shards(self, shard_size: int | None) -> list[_Shard]:
        # One file and no header: the whole layout goes into the one dict.
        return [_Shard(os.path.basename(self._target), [info.name for info in self.layout], b"", 0)]

    def _write_piece(self, info: TensorInfo, piece: torch.Tensor) -> None:
        """Copy ``piece`` into the output's tensor ``info.name`` (made when its first piece arrives).

        A copy: the caller recycles its buffers once the write returns.
        """
        if self._part == 0:
            self._tensors[info.name] = torch.empty(tuple(info.shape), dtype=info.dtype)
        flat = self._tensors[info.name].view(-1)
        start = self._part // max(flat.element_size(), 1)
        flat[start:start + piece.numel()].copy_(piece.detach().reshape(-1))

    def _prepare(self) -> None:
        ordered: dict[str, torch.Tensor] = {}
        for info in self.layout:  # in layout order; a tensor of no entries may have had no piece
            tensor = self._tensors.get(info.name)
            ordered[info.name] = tensor if tensor is not None else torch.empty(tuple(info.shape), dtype=info.dtype)
        with open(self._replace.tmp, "wb") as f:
            torch.save(ordered, f)
        self._tensors.clear()  # the file holds them now
        self._replace.prepare()

    def abort(self) -> None:
        self._tensors.clear()
        super().abort()


def open_writer(out: str | os.PathLike, layout: Sequence[TensorInfo], **options: Any) -> StreamingWriter:
    """The writer for an output path: a ``StateDictWriter`` for ``.pt``/``.pth``/``.bin``, else a
    ``StreamingWriter`` (a ``.safetensors`` file or a model directory); see ``output_format``."""
    cls = StateDictWriter if output_format(out) == "torch" else StreamingWriter
    return cls(out, layout, **options)
