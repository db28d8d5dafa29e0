"""The streaming safetensors writer.

The layout (names, shapes, dtypes, in order) is known before the first tensor
is computed, so each shard's header is written first and tensor bytes are
appended as ``write(name, tensor)`` hands them over: no shard is ever held in
memory. Everything goes to a temporary (``.NAME.tvtmp-<pid>`` next to the
target) that ``commit()`` renames into place (the transaction of
``tvlang.io.atomic``), so a crash, a full disk or Ctrl-C never leaves a
half-written model at the output path. Where an output may go is checked
first (``tvlang.io.output_paths``).

>>> import os, tempfile, torch
>>> from tvlang.io import TensorInfo, open_reader
>>> out = os.path.join(tempfile.mkdtemp(), "merged.safetensors")
>>> w = torch.arange(6.0).reshape(2, 3)
>>> layout = [TensorInfo("w", (2, 3), torch.float32, 24, "")]
>>> with StreamingWriter(out, layout, metadata={"tvlang.kind": "model"}) as writer:
...     writer.write("w", w)
>>> open_reader(out).read("w").tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvlang.errors import TvlangError
from tvlang.io.atomic import AtomicReplace, State
from tvlang.io.base import TensorInfo, TensorReader
from tvlang.io.model_files import copy_model_files, model_file_names, write_files
from tvlang.io.output_paths import check_output_path, input_paths, replaceable
from tvlang.io.safetensors_format import (
    INDEX_NAME,
    SINGLE_NAME,
    build_header,
    build_index,
    dtype_code,
    itemsize,
    shard_name,
)

if TYPE_CHECKING:
    import torch

__all__ = ["ONCE", "StreamingWriter", "copy_model_files", "model_file_names", "shard_metadata", "write_files"]


def _write_all(f, data: memoryview) -> None:
    """Write every byte of ``data`` to the raw file ``f``.

    Kept at module level so tests can replace it to simulate a full disk.
    """
    done = 0
    while done < len(data):
        count = f.write(data[done:])
        if count is None or count <= 0:  # pragma: no cover - a raw file returns a count
            raise OSError(errno.EIO, "short write")
        done += count


WRITEBACK_BYTES = 64 << 20  # sync what has been written so far every this many bytes
_KEEP_SIZE = 1  # FALLOC_FL_KEEP_SIZE: blocks reserved past the end; the file's size stays as written


def _reserve(fd: int, nbytes: int) -> None:
    """Reserve a file's ``nbytes`` on the disk before it is written (Linux ``fallocate``, its size
    kept: the file still grows as it is written); elsewhere, or where the file system refuses,
    nothing, and the writes allocate as they go.

    Writing into reserved blocks is cheaper: on the development machine (ext4) plain task
    arithmetic at 1.5 GB took 1.33 s against 1.46 s, and in a profile of ``dare`` the copies
    into the page cache fell from 16 % to 5 % of the main thread's samples
    (docs/performance.md, "Reserving the output's blocks"). Not
    ``os.posix_fallocate``: where the file system cannot reserve, glibc's emulation writes a
    byte into every block first. A refusal (a full disk included) is left to the writes to
    report, as before, so that a file system that stores less than it reserves (compression)
    is not refused an output that would fit. Only in a 64-bit process, where libc's ``off_t``
    (the offset and length) has 64 bits."""
    global _FALLOCATE
    if _FALLOCATE is None:  # looked up once (set in one step: writers on other threads may ask meanwhile)
        found = False
        if sys.platform.startswith("linux") and ctypes.sizeof(ctypes.c_void_p) == 8:  # off_t of 64 bits
            try:
                found = ctypes.CDLL(None, use_errno=True).fallocate
                found.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                found.restype = ctypes.c_int
            except (OSError, AttributeError):
                found = False
        _FALLOCATE = found
    if _FALLOCATE and nbytes > 0:
        _FALLOCATE(fd, _KEEP_SIZE, 0, nbytes)  # -1 and errno where refused: nothing reserved


_FALLOCATE = None  # libc's fallocate once looked up (False: none)


class Writeback:
    """Syncs a file being written, in a thread of its own, every ``WRITEBACK_BYTES``.

    The disk then writes the output while the rest is computed, and the fsync before
    the rename waits for the last few megabytes only instead of the whole output piled
    up in the page cache. ``fdatasync`` from a thread, not ``sync_file_range``: on the
    development machine (docs/performance.md) a 1.5 GB output produced at 580 MB/s was
    on disk 2.8 s after its first byte with ``fdatasync`` every 64 MiB, and 4.7 s with
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` every 64 MiB (5.2 s with neither).

    ``wrote(offset)`` after each write (a request is coalesced while a sync runs);
    ``close()`` stops the thread and raises the first error a sync met (an ``OSError``):
    on Linux a failed writeback is reported to one sync only, so the final fsync
    alone might not see it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._asked = 0  # offset up to which a sync was last asked for
        self._wanted = threading.Event()
        self._stop = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None

    def wrote(self, offset: int) -> None:
        if offset - self._asked < WRITEBACK_BYTES or self._error is not None:
            return
        self._asked = offset
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tvlang-writeback", daemon=True)
            self._thread.start()
        self._wanted.set()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop:
                return
            try:
                _SYNC_DATA(self.fd)
            except OSError as exc:
                self._error = exc
                return

    def close(self) -> None:
        """Stop the thread (no sync runs after this returns); raise a sync's error."""
        if self._thread is not None:
            self._stop = True
            self._wanted.set()
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error


_SYNC_DATA = getattr(os, "fdatasync", os.fsync)  # macOS and Windows have no fdatasync


@dataclass
class _Shard:
    file: str  # file name inside the output (or the single output file's name)
    names: list[str]
    header: bytes  # 8-byte length + JSON, padded to 8 bytes
    data_size: int


#: Metadata that the first shard alone holds: the recipe text can be megabytes (a
#: generated recipe), and a copy in every shard header multiplied it by the shard count.
ONCE = ("tvlang.recipe",)


def shard_metadata(metadata: Mapping[str, str], index: int) -> dict[str, str]:
    """The ``__metadata__`` of shard ``index`` (0-based) of an output with ``metadata``.

    >>> shard_metadata({"tvlang.recipe": "out = a", "tvlang.kind": "model"}, 1)
    {'tvlang.kind': 'model'}
    """
    return dict(metadata) if index == 0 else {k: v for k, v in metadata.items() if k not in ONCE}


class StreamingWriter:
    """Writes a layout of tensors, in order, to a ``.safetensors`` file or a model directory.

    - ``out`` ending in ``.safetensors``: one file, whatever its size
      (``shard_size`` applies to directories only).
    - any other ``out``: a directory with ``model.safetensors``, or, when the
      tensors total more than ``shard_size`` bytes, ``model-0000i-of-0000n.safetensors``
      shards and ``model.safetensors.index.json``; plus the config and tokenizer
      files of ``copy_from`` (a model directory or a reader with a ``root``), and
      ``files`` (name -> bytes: a model card), written last so that they win over a
      copied file of the same name.
    - ``metadata`` (str -> str) goes into every shard's ``__metadata__``, except the keys
      of ``ONCE`` (the recipe text), which only the first shard holds.
    - ``inputs`` (paths or readers) are never overwritten; an existing ``out``
      needs ``force=True`` and is replaced only by ``commit()``.
    ``FILE_FORMAT``: a one-file output's format, for ``--force`` (``StateDictWriter``: torch).
    """

    FILE_FORMAT = "safetensors"

    def __init__(
        self,
        out: str | os.PathLike,
        layout: Sequence[TensorInfo],
        *,
        shard_size: int | None = None,
        metadata: Mapping[str, str] | None = None,
        inputs: Iterable[object] = (),
        force: bool = False,
        copy_from: str | os.PathLike | TensorReader | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self.out = os.fspath(out)
        self.single_file = self.FILE_FORMAT != "safetensors" or self.out.endswith(".safetensors")
        self.metadata = dict(metadata or {})
        # transformers' from_pretrained refuses a safetensors file whose metadata lacks a format.
        self.metadata.setdefault("format", "pt")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TvlangError(f"{self.out}: metadata must map strings to strings; '{key}' is {type(value).__name__}")
        self.force = force
        check_output_path(self.out, force=force, inputs=input_paths(inputs), file_format=self.FILE_FORMAT)
        self._target = os.path.realpath(self.out)
        self.layout = list(layout)
        self._check_layout(shard_size)
        self.copy_from = self._copy_source(copy_from)
        self.extra_files = {} if self.single_file else dict(files or {})

        parent = os.path.dirname(self._target)
        if not os.path.isdir(parent):
            # Like `mkdir -p`: `-o out/merged` works in a fresh checkout.
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                where = os.path.dirname(self.out) or parent
                raise TvlangError(f"{self.out}: cannot write: cannot create directory {where}: {exc.strerror or exc}") from None
        self._shards = self._plan_shards(shard_size)
        self._shard_of = {name: i for i, shard in enumerate(self._shards) for name in shard.names}
        self._next = 0  # position in layout of the next tensor expected
        self._part = 0  # bytes of it written so far by write_part
        self._file = None
        self._open_shard = -1
        try:
            # The output is written at a temporary next to the target (see tvlang.io.atomic).
            self._replace = AtomicReplace(self._target, directory=not self.single_file)
        except OSError as exc:
            raise TvlangError(f"{self.out}: cannot create the output: {exc.strerror or exc}") from None

    # -- set-up checks ------------------------------------------------------------

    def _check_layout(self, shard_size: int | None) -> None:
        if shard_size is not None and shard_size <= 0:
            raise TvlangError(f"{self.out}: shard size must be positive, got {shard_size}")
        seen = set()
        for info in self.layout:
            if info.name in seen:
                raise TvlangError(f"{self.out}: tensor '{info.name}' appears twice in the output", tensor=info.name)
            seen.add(info.name)
            code = dtype_code(info.dtype)
            if code is None:
                raise TvlangError(
                    f"{self.out}: tensor '{info.name}' has dtype {info.dtype}, which safetensors cannot store",
                    tensor=info.name,
                )
            expected = math.prod(info.shape) * itemsize(code)
            if info.nbytes != expected:
                raise TvlangError(
                    f"{self.out}: layout entry '{info.name}' says {info.nbytes} bytes but"
                    f" {list(info.shape)} {info.dtype} is {expected} bytes",
                    tensor=info.name,
                )

    def _copy_source(self, copy_from: object) -> str | None:
        if copy_from is None or self.single_file:
            return None
        if isinstance(copy_from, TensorReader):
            return copy_from.root
        path = os.fspath(copy_from)
        return path if os.path.isdir(path) else os.path.dirname(path) or "."

    def _plan_shards(self, shard_size: int | None) -> list[_Shard]:
        groups: list[list[TensorInfo]] = [[]]
        size = 0
        for info in self.layout:
            if not self.single_file and shard_size is not None and groups[-1] and size + info.nbytes > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(info)
            size += info.nbytes
        shards = []
        for i, group in enumerate(groups, start=1):
            if self.single_file:
                file = os.path.basename(self._target)
            elif len(groups) == 1:
                file = SINGLE_NAME
            else:
                file = shard_name(i, len(groups))
            header, data_size = build_header(group, shard_metadata(self.metadata, i - 1))
            shards.append(_Shard(file, [info.name for info in group], header, data_size))
        return shards

    @property
    def files(self) -> list[str]:
        """The weight file names the output will hold (one, or the shards)."""
        return [shard.file for shard in self._shards]

    # -- writing ------------------------------------------------------------------

    @property
    def _state(self) -> State:
        return self._replace.state

    def _require_open(self) -> None:
        if self._state is not State.OPEN:
            raise TvlangError(f"{self.out}: the writer is already {self._state.value}")

    def _shard_path(self, shard: _Shard) -> str:
        tmp = self._replace.tmp
        return tmp if self.single_file else os.path.join(tmp, shard.file)

    def _write_failed(self, exc: OSError) -> TvlangError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full"
        else:
            reason = exc.strerror or str(exc)
        return TvlangError(
            f"{self.out}: write failed: {reason}; nothing was written to the output",
        )

    def _guarded(self, action, *args) -> None:
        """Run a step of writing; on any failure remove the temporary and report."""
        self._require_open()
        try:
            action(*args)
        except OSError as exc:
            self.abort()
            raise self._write_failed(exc) from None
        except BaseException:
            self.abort()
            raise

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._writeback.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _start_shard(self, index: int) -> None:
        self._finish_shard()
        shard = self._shards[index]
        self._file = open(self._shard_path(shard), "wb", buffering=0)
        _reserve(self._file.fileno(), len(shard.header) + shard.data_size)
        self._writeback = Writeback(self._file.fileno())
        self._open_shard = index
        self._offset = 0
        self._append(memoryview(shard.header))

    def _expect(self, name: str) -> TensorInfo:
        """The layout entry of the next tensor, which must be ``name``."""
        self._require_open()
        if self._next >= len(self.layout):
            raise TvlangError(f"{self.out}: tensor '{name}' is not in the output layout (all tensors written)", tensor=name)
        info = self.layout[self._next]
        if name != info.name:
            where = "is not in the output layout" if name not in self._shard_of else "comes out of order"
            raise TvlangError(f"{self.out}: tensor '{name}' {where}; expected '{info.name}' next", tensor=name)
        return info

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout; its shape and dtype must match."""
        info = self._expect(name)
        shape = tuple(int(d) for d in tensor.shape)
        if shape != tuple(info.shape) or dtype_code(tensor.dtype) != dtype_code(info.dtype):
            raise TvlangError(
                f"{self.out}: tensor '{name}' is {list(shape)} {tensor.dtype} but the output layout says"
                f" {list(info.shape)} {info.dtype}",
                tensor=name,
            )
        if self._part:
            raise TvlangError(f"{self.out}: tensor '{name}' is half written in pieces ({self._part} of"
                              f" {info.nbytes} bytes): write the rest with write_part", tensor=name)
        self._guarded(self._write_piece, info, tensor)  # a whole tensor is its only piece
        self._next += 1

    def write_part(self, name: str, piece: torch.Tensor) -> None:
        """Append the next piece of tensor ``name``: its entries in order, flattened.

        A tensor may be handed over in any number of pieces of its dtype (CPU,
        contiguous); it is complete, and the next one may start, when the pieces
        add up to its size. Nothing of a tensor need ever be whole in memory.
        """
        info = self._expect(name)
        if dtype_code(piece.dtype) != dtype_code(info.dtype):
            raise TvlangError(f"{self.out}: a piece of tensor '{name}' is {piece.dtype} but the output layout says"
                              f" {info.dtype}", tensor=name)
        nbytes = piece.nbytes
        if self._part + nbytes > info.nbytes:
            raise TvlangError(f"{self.out}: the pieces of tensor '{name}' come to more than its"
                              f" {info.nbytes} bytes", tensor=name)
        self._guarded(self._write_piece, info, piece)
        self._part += nbytes
        if self._part == info.nbytes:
            self._part = 0
            self._next += 1

    def _write_piece(self, info: TensorInfo, piece: torch.Tensor) -> None:
        """Append ``piece``'s bytes, opening the tensor's shard when it is the tensor's first.
        A piece is a torch tensor, or a contiguous numpy array (the torch-free executor's)."""
        if self._part == 0 and self._shard_of[info.name] != self._open_shard:
            self._start_shard(self._shard_of[info.name])
        if not hasattr(piece, "detach"):
            self._append(memoryview(piece.reshape(-1)).cast("B"))
            return
        import torch  # a torch tensor: torch is imported already

        data = piece.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        self._append(memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def _append(self, data: memoryview) -> None:
        _write_all(self._file, data)
        self._offset += len(data)
        self._writeback.wrote(self._offset)

    # -- finishing ----------------------------------------------------------------

    def commit(self) -> None:
        """Check every tensor was written, sync, and rename the temporary into place."""
        if self._state is State.COMMITTED:
            return
        self.prepare()
        self.publish()
        self.finish()

    # commit() in three steps, so that several outputs of one run appear together or not at
    # all: prepare() each (the slow part: sync), publish() each (renames), finish() each; a
    # failure while publishing withdraws the ones already published (see tvlang.io.atomic).

    def prepare(self) -> None:
        """Check every tensor was written, write the index and copied files, and sync."""
        self._require_open()
        if self._next < len(self.layout):
            missing = self.layout[self._next].name
            partly = f", {self._part} of its {self.layout[self._next].nbytes} bytes written" if self._part else ""
            self.abort()
            raise TvlangError(
                f"{self.out}: output incomplete: {len(self.layout) - self._next} tensors were never written"
                f" (first: '{missing}'{partly}); nothing was written to the output",
                tensor=missing,
            )
        self._guarded(self._prepare)

    def _prepare(self) -> None:
        # Shards whose tensors are all empty, or an empty layout, still get a header.
        for index in range(max(self._open_shard, 0), len(self._shards)):
            if index != self._open_shard:
                self._start_shard(index)
        self._finish_shard()
        if not self.single_file:
            if len(self._shards) > 1:
                self._write_index()
            self._copy_files()
        self._replace.prepare()

    def publish(self) -> None:
        """Rename the prepared temporary into place; an existing output (force) is kept aside."""
        if self._state is not State.PREPARED:
            raise TvlangError(f"{self.out}: cannot publish a writer that is {self._state.value}")
        try:
            if os.path.lexists(self._target):
                if not self.force:
                    raise TvlangError(f"{self.out}: output appeared while writing; pass force=True to replace it")
                reason = replaceable(self._target, file_format=self.FILE_FORMAT)
                if reason:
                    raise TvlangError(f"{self.out}: refusing to replace it: {reason}")
            self._replace.publish()
        except OSError as exc:
            self.abort()
            raise self._write_failed(exc) from None
        except BaseException:
            self.abort()
            raise

    def withdraw(self) -> None:
        """Undo publish(): the output path goes back to what it was, the new output is removed."""
        self._replace.withdraw()

    def finish(self) -> None:
        """After publish(): delete the replaced output, sync the directory entry."""
        if self._state is not State.PUBLISHED:
            raise TvlangError(f"{self.out}: cannot finish a writer that is {self._state.value}")
        self._replace.finish()

    def _write_index(self) -> None:
        weight_map = {name: shard.file for shard in self._shards for name in shard.names}
        data = build_index(weight_map, sum(info.nbytes for info in self.layout))
        with open(os.path.join(self._replace.tmp, INDEX_NAME), "wb", buffering=0) as f:
            _write_all(f, memoryview(data))

    def _copy_files(self) -> None:
        copy_model_files(self.copy_from, self._replace.tmp)
        write_files(self.extra_files, self._replace.tmp)

    def abort(self) -> None:
        """Remove the temporary; the output path is left as it was."""
        if self._state not in (State.OPEN, State.PREPARED):
            return
        if self._file is not None:
            try:
                self._writeback.close()  # before the descriptor is closed (and reused)
            except OSError:
                pass
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self._replace.abort()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without commit (an exception outside a with-block) cleans up.
        if getattr(self, "_replace", None) is not None:
            self.abort()
