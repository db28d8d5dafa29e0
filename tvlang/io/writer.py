"""The streaming safetensors writer.

The layout (names, shapes, dtypes, in order) is known before the first tensor
is computed, so each shard's header is written first and tensor bytes are
appended as ``write(name, tensor)`` hands them over: no shard is ever held in
memory. Everything goes to a temporary (``.NAME.tvtmp-<pid>`` next to the
target) that ``commit()`` renames into place, so a crash, a full disk or
Ctrl-C never leaves a half-written model at the output path.

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

import errno
import json
import math
import os
import re
import shutil
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from tvlang.errors import TvlangError
from tvlang.io.base import SAFETENSORS_FROM_DTYPE, TensorInfo, TensorReader

__all__ = [
    "COPIED_DIRS", "COPIED_FILES", "INDEX_NAME", "SINGLE_NAME", "StreamingWriter", "check_distinct_outputs",
    "replaceable", "shard_name",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Files of the base model that make the output load with from_pretrained.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "chat_template.jinja",
    # sentence-transformers
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
COPIED_DIRS = ("1_Pooling", "2_Normalize")


def shard_name(index: int, count: int) -> str:
    """Hugging Face's shard naming, 1-based: ``model-00001-of-00003.safetensors``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


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


WRITEBACK_BYTES = 64 << 20  # start writing the output to disk every this many bytes


def _load_sync_file_range():
    """Linux's ``sync_file_range`` (start writing a range to disk, without waiting), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to disk now (best effort).

    The final fsync before the rename then waits for the last few megabytes only,
    instead of the whole output piled up in the page cache.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@dataclass
class _Shard:
    file: str  # file name inside the output (or the single output file's name)
    names: list[str]
    header: bytes  # 8-byte length + JSON, padded to 8 bytes
    data_size: int


def _build_header(infos: Sequence[TensorInfo], metadata: Mapping[str, str]) -> tuple[bytes, int]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for info in infos:
        header[info.name] = {
            "dtype": SAFETENSORS_FROM_DTYPE[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _input_paths(inputs: Iterable[object]) -> list[str]:
    """Resolved paths that the output must not touch: input files and directories."""
    paths: list[str] = []
    for item in inputs or ():
        if isinstance(item, TensorReader):
            paths.extend(item.paths)
            if item.root:
                paths.append(os.path.realpath(item.root))
        elif isinstance(item, (str, os.PathLike)):
            path = os.path.realpath(os.fspath(item))
            paths.append(path)
            if os.path.isdir(path):
                from tvlang.io.open import find_weights

                found = find_weights(path)
                if found is None:
                    continue
                path = os.path.join(path, found)
                paths.append(path)
            if path.endswith(".json") and os.path.isfile(path):
                paths.extend(_shards_of(path))
    return paths


def _shards_of(index_path: str) -> list[str]:
    """The shard files an index names (best effort: a bad index protects nothing more)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        directory = os.path.dirname(index_path)
        return sorted({os.path.realpath(os.path.join(directory, s)) for s in weight_map.values() if isinstance(s, str)})
    except (OSError, ValueError, AttributeError):
        return []


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of an existing path: the same file under another name (a hard link)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _is_within(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # different drives
        return False


def check_distinct_outputs(targets: Mapping[str, object]) -> None:
    """Refuse two outputs of one run that are the same path, or one inside the other.

    Paths are compared resolved (``K``, ``./K`` and ``out/../K`` are one path), before
    anything is computed.
    """
    seen: list[tuple[str, str]] = []
    for name, out in targets.items():
        path = os.fspath(out)
        resolved = os.path.realpath(path)
        for other, other_resolved in seen:
            if resolved == other_resolved:
                raise TvlangError(f"outputs '{other}' and '{name}' are both written to {path}",
                                  notes=("give each output its own path",))
            if _is_within(resolved, other_resolved) or _is_within(other_resolved, resolved):
                raise TvlangError(f"outputs '{other}' and '{name}' are written one inside the other ({path})",
                                  notes=("give each output its own path",))
        seen.append((name, resolved))


# What may sit in an output directory that --force replaces: what tvlang writes there.
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_OWN_FILES = frozenset((SINGLE_NAME, INDEX_NAME, "README.md") + COPIED_FILES)


def _is_safetensors_file(path: str) -> bool:
    """A regular file that starts like a safetensors file: an 8-byte length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + struct.unpack("<Q", head[:8])[0] <= size


def is_model_file(entry: str) -> bool:
    """A file name that tvlang writes into a model directory."""
    return entry in _OWN_FILES or bool(_SHARD_FILE.fullmatch(entry))


def check_output_path(out: str, *, force: bool, inputs: Iterable[str] = (),
                      owns: Callable[[str], bool] = is_model_file, dirs: Sequence[str] = COPIED_DIRS) -> None:
    """Refuse an output path that would lose data, before anything is computed.

    An empty path, the working directory or a directory above it are never
    outputs, nor is an input (resolved ``inputs``, compared by path and by inode)
    or a directory holding one. An existing path needs ``force``, and even then
    is replaced only when it holds what tvlang would have written there (see
    ``replaceable``).
    """
    if not out.strip():
        raise TvlangError("the output path is empty", notes=("give -o a file or directory name",))
    target = os.path.realpath(out)
    cwd = os.path.realpath(os.getcwd())
    if target == cwd or _is_within(cwd, target):
        what = "is" if target == cwd else "contains"
        raise TvlangError(f"{out}: refusing to write: the output {what} the working directory",
                          notes=("choose a new file or directory name for the output",))
    target_id = _identity(target)
    for path in inputs:
        same = path == target or (target_id is not None and _identity(path) == target_id)
        if same or _is_within(path, target):
            raise TvlangError(
                f"{out}: refusing to write: the output {'is' if same else 'contains'} an input ({path})",
                notes=("choose an output path that is not one of the models being read",),
            )
    if not os.path.lexists(out):
        return
    if not force:
        raise TvlangError(f"{out}: output already exists", notes=("pass --force (force=True) to replace it",))
    reason = replaceable(out, owns=owns, dirs=dirs)
    if reason:
        raise TvlangError(
            f"{out}: refusing to replace it: {reason}",
            notes=("--force replaces only what tvlang could have written there; move it away or choose"
                   " another output path",),
        )


def replaceable(path: str, *, owns: Callable[[str], bool] = is_model_file,
                dirs: Sequence[str] = COPIED_DIRS) -> str | None:
    """Why ``--force`` must not replace what ``path`` holds, or None when it may.

    It may replace a safetensors file, or a directory holding only files that
    ``owns`` accepts (by default what tvlang writes into a model directory:
    weights, shards, index, config and tokenizer files, model card), the folders
    ``dirs`` and tvlang's own temporaries; never a symlink, a device, a pipe, or
    a folder with anything else in it.
    """
    if os.path.islink(path):
        return "it is a symbolic link (to " + os.path.realpath(path) + ")"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot inspect it: {exc.strerror}"
    if stat.S_ISREG(mode):
        if _is_safetensors_file(path):
            return None
        return "it is a file that is not a safetensors file"
    if not stat.S_ISDIR(mode):
        return "it is not a regular file or a directory"
    try:
        entries = sorted(os.listdir(path))
    except OSError as exc:
        return f"cannot list it: {exc.strerror}"
    for entry in entries:
        full = os.path.join(path, entry)
        if os.path.islink(full):
            return f"it holds a symbolic link, '{entry}', that tvlang does not write"
        if entry in dirs and os.path.isdir(full):
            continue
        if ".tvtmp-" in entry:
            continue
        if os.path.isfile(full) and owns(entry):
            continue
        return f"it is a directory that holds '{entry}', which tvlang does not write"
    return None


class StreamingWriter:
    """Writes a layout of tensors, in order, to a ``.safetensors`` file or a model directory.

    - ``out`` ending in ``.safetensors``: one file, whatever its size
      (``shard_size`` applies to directories only).
    - any other ``out``: a directory with ``model.safetensors``, or, when the
      tensors total more than ``shard_size`` bytes, ``model-0000i-of-0000n.safetensors``
      shards and ``model.safetensors.index.json``; plus the config and tokenizer
      files of ``copy_from`` (a model directory or a reader with a ``root``).
    - ``metadata`` (str -> str) goes into every shard's ``__metadata__``.
    - ``inputs`` (paths or readers) are never overwritten; an existing ``out``
      needs ``force=True`` and is replaced only by ``commit()``.
    """

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
    ) -> None:
        self.out = os.fspath(out)
        self.single_file = self.out.endswith(".safetensors")
        self.metadata = dict(metadata or {})
        # transformers' from_pretrained refuses a safetensors file whose metadata lacks a format.
        self.metadata.setdefault("format", "pt")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TvlangError(f"{self.out}: metadata must map strings to strings; '{key}' is {type(value).__name__}")
        self.force = force
        check_output_path(self.out, force=force, inputs=_input_paths(inputs))
        self._target = os.path.realpath(self.out)
        self.layout = list(layout)
        self._check_layout(shard_size)
        self.copy_from = self._copy_source(copy_from)

        parent = os.path.dirname(self._target)
        if not os.path.isdir(parent):
            # Like `mkdir -p`: `-o out/merged` works in a fresh checkout.
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                where = os.path.dirname(self.out) or parent
                raise TvlangError(f"{self.out}: cannot write: cannot create directory {where}: {exc.strerror or exc}") from None
        base = os.path.basename(self._target)
        self._tmp = os.path.join(parent, f".{base}.tvtmp-{os.getpid()}")
        self._old = os.path.join(parent, f".{base}.tvtmp-old-{os.getpid()}")
        self._shards = self._plan_shards(shard_size)
        self._shard_of = {name: i for i, shard in enumerate(self._shards) for name in shard.names}
        self._next = 0  # position in layout of the next tensor expected
        self._part = 0  # bytes of it written so far by write_part
        self._file = None
        self._open_shard = -1
        self._state = "open"  # open -> committed | aborted
        try:
            _remove(self._tmp)  # a stale temporary of an earlier process with this pid
            if not self.single_file:
                os.mkdir(self._tmp)
        except OSError as exc:
            raise TvlangError(f"{self.out}: cannot create the output: {exc.strerror}") from None

    # -- set-up checks ------------------------------------------------------------

    def _check_layout(self, shard_size: int | None) -> None:
        if shard_size is not None and shard_size <= 0:
            raise TvlangError(f"{self.out}: shard size must be positive, got {shard_size}")
        seen = set()
        for info in self.layout:
            if info.name in seen:
                raise TvlangError(f"{self.out}: tensor '{info.name}' appears twice in the output", tensor=info.name)
            seen.add(info.name)
            if info.dtype not in SAFETENSORS_FROM_DTYPE:
                raise TvlangError(
                    f"{self.out}: tensor '{info.name}' has dtype {info.dtype}, which safetensors cannot store",
                    tensor=info.name,
                )
            expected = math.prod(info.shape) * torch.empty((), dtype=info.dtype).element_size()
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
            header, data_size = _build_header(group, self.metadata)
            shards.append(_Shard(file, [info.name for info in group], header, data_size))
        return shards

    @property
    def files(self) -> list[str]:
        """The weight file names the output will hold (one, or the shards)."""
        return [shard.file for shard in self._shards]

    # -- writing ------------------------------------------------------------------

    def _shard_path(self, shard: _Shard) -> str:
        return self._tmp if self.single_file else os.path.join(self._tmp, shard.file)

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
        if self._state != "open":
            raise TvlangError(f"{self.out}: the writer is already {self._state}")
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
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _start_shard(self, index: int) -> None:
        self._finish_shard()
        shard = self._shards[index]
        self._file = open(self._shard_path(shard), "wb", buffering=0)
        self._open_shard = index
        self._offset = self._flushed = 0
        self._append(memoryview(shard.header))

    def _expect(self, name: str) -> TensorInfo:
        """The layout entry of the next tensor, which must be ``name``."""
        if self._state != "open":
            raise TvlangError(f"{self.out}: the writer is already {self._state}")
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
        if shape != tuple(info.shape) or tensor.dtype != info.dtype:
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
        if piece.dtype != info.dtype:
            raise TvlangError(f"{self.out}: a piece of tensor '{name}' is {piece.dtype} but the output layout says"
                              f" {info.dtype}", tensor=name)
        nbytes = piece.numel() * piece.element_size()
        if self._part + nbytes > info.nbytes:
            raise TvlangError(f"{self.out}: the pieces of tensor '{name}' come to more than its"
                              f" {info.nbytes} bytes", tensor=name)
        self._guarded(self._write_piece, info, piece)
        self._part += nbytes
        if self._part == info.nbytes:
            self._part = 0
            self._next += 1

    def _write_piece(self, info: TensorInfo, piece: torch.Tensor) -> None:
        """Append ``piece``'s bytes, opening the tensor's shard when it is the tensor's first."""
        if self._part == 0 and self._shard_of[info.name] != self._open_shard:
            self._start_shard(self._shard_of[info.name])
        data = piece.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        self._append(memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def _append(self, data: memoryview) -> None:
        _write_all(self._file, data)
        self._offset += len(data)
        if self._offset - self._flushed >= WRITEBACK_BYTES:
            _start_writeback(self._file.fileno(), self._flushed, self._offset - self._flushed)
            self._flushed = self._offset

    # -- finishing ----------------------------------------------------------------

    def commit(self) -> None:
        """Check every tensor was written, sync, and rename the temporary into place."""
        if self._state == "committed":
            return
        self.prepare()
        self.publish()
        self.finish()

    # commit() in three steps, so that several outputs of one run appear together or not at
    # all: prepare() each (the slow part: sync), publish() each (renames), finish() each; a
    # failure while publishing withdraws the ones already published.

    def prepare(self) -> None:
        """Check every tensor was written, write the index and copied files, and sync."""
        if self._state != "open":
            raise TvlangError(f"{self.out}: the writer is already {self._state}")
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
        self._state = "prepared"

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
            _fsync_dir(self._tmp)

    def publish(self) -> None:
        """Rename the prepared temporary into place; an existing output (force) is kept aside."""
        if self._state != "prepared":
            raise TvlangError(f"{self.out}: cannot publish a writer that is {self._state}")
        self._replaced = False
        try:
            if os.path.lexists(self._target):
                if not self.force:
                    raise TvlangError(f"{self.out}: output appeared while writing; pass force=True to replace it")
                reason = replaceable(self._target)
                if reason:
                    raise TvlangError(f"{self.out}: refusing to replace it: {reason}")
                _remove(self._old)
                if self.single_file and os.path.isfile(self._target) and self._link_aside():
                    try:
                        os.replace(self._tmp, self._target)  # atomic for a file over a file
                    except BaseException:
                        _remove(self._old)
                        self._replaced = False
                        raise
                    self._state = "published"
                    return
                # Move the old output aside (a directory cannot be swapped atomically), move
                # the new one in; finish() deletes the old one, withdraw() puts it back.
                os.rename(self._target, self._old)
                self._replaced = True
                try:
                    os.rename(self._tmp, self._target)
                except BaseException:
                    os.rename(self._old, self._target)
                    self._replaced = False
                    raise
            else:
                os.rename(self._tmp, self._target)
        except OSError as exc:
            self._state = "open"
            self.abort()
            raise self._write_failed(exc) from None
        except BaseException:
            self._state = "open"
            self.abort()
            raise
        self._state = "published"

    def _link_aside(self) -> bool:
        """Keep the old output file under the aside name too (a hard link), for withdraw()."""
        try:
            os.link(self._target, self._old)
        except OSError:
            return False
        self._replaced = True
        return True

    def withdraw(self) -> None:
        """Undo publish(): the output path goes back to what it was, the new output is removed."""
        if self._state != "published":
            return
        self._state = "aborted"
        if self._replaced:
            if os.path.isdir(self._target) or not os.path.isfile(self._old):
                _remove(self._target)
            os.replace(self._old, self._target)
        else:
            _remove(self._target)
        _fsync_dir(os.path.dirname(self._target))

    def finish(self) -> None:
        """After publish(): delete the replaced output, sync the directory entry."""
        if self._state != "published":
            raise TvlangError(f"{self.out}: cannot finish a writer that is {self._state}")
        if self._replaced:
            _remove(self._old)
        _fsync_dir(os.path.dirname(self._target))
        self._state = "committed"

    def _write_index(self) -> None:
        index = {
            "metadata": {"total_size": sum(info.nbytes for info in self.layout)},
            "weight_map": {name: shard.file for shard in self._shards for name in shard.names},
        }
        data = (json.dumps(index, indent=2) + "\n").encode("utf-8")
        with open(os.path.join(self._tmp, INDEX_NAME), "wb", buffering=0) as f:
            _write_all(f, memoryview(data))
            os.fsync(f.fileno())

    def _copy_files(self) -> None:
        if not self.copy_from or not os.path.isdir(self.copy_from):
            return
        for name in COPIED_FILES:
            source = os.path.join(self.copy_from, name)
            if os.path.isfile(source):
                target = os.path.join(self._tmp, name)
                shutil.copyfile(source, target)
                with open(target, "rb") as f:
                    os.fsync(f.fileno())
        for name in COPIED_DIRS:
            source = os.path.join(self.copy_from, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(self._tmp, name))

    def abort(self) -> None:
        """Remove the temporary; the output path is left as it was."""
        if self._state not in ("open", "prepared"):
            return
        self._state = "aborted"
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        _remove(self._tmp)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without commit (an exception outside a with-block) cleans up.
        if getattr(self, "_state", None) in ("open", "prepared") and hasattr(self, "_tmp"):
            self.abort()
