"""The reader interface shared by every checkpoint format, and the dtype table.

A reader knows every tensor's name, shape and dtype up front (from a header or
an index) and reads a tensor's bytes only when asked, so a whole model never
sits in memory.

>>> import torch
>>> from tvlang.io import open_reader
>>> r = open_reader({"w": torch.ones(2, 3)}, label="<state dict 'pre'>")
>>> r.names()
['w']
>>> r.info("w")
TensorInfo(name='w', shape=(2, 3), dtype=torch.float32, nbytes=24, file="<state dict 'pre'>")
>>> r.read("w").sum().item()
6.0
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import threading
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvlang.errors import TvlangError

if TYPE_CHECKING:  # the reader interface names torch's types; this module runs without torch
    import torch

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
    "MAX_TENSORS_PER_FILE",
    "MAX_TENSORS_PER_MODEL",
    "TensorInfo",
    "TensorReader",
    "check_regular",
    "file_identity",
    "io_error",
    "kind_from_metadata",
    "load_json",
    "name_problem",
    "open_regular",
    "quoted",
    "read_at",
    "show",
]


def show(text: str) -> str:
    r"""``text`` safe to print: control characters, lone surrogates and other
    unprintable characters are escaped as ``repr`` would (``\x1b``, ``\ud800``).

    A name read from a file must never reach a terminal raw (an escape sequence would
    be obeyed) or crash the print (a lone surrogate cannot be encoded).

    >>> print(show("model.layers.0.weight"), show("a\x1b[31m"), show("b\ud800"), show("c\u00e9"))
    model.layers.0.weight a\x1b[31m b\ud800 cé
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r\t":
        return repr(ch)[1:-1]
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def quoted(name: str) -> str:
    """A tensor (or shard) name in single quotes, escaped for printing (see :func:`show`)."""
    return f"'{show(name)}'"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a tensor or file name, or None when it can.

    Refused: lone surrogates (not Unicode text: the safetensors library refuses them,
    and they cannot be printed or written) and control characters (a terminal would
    obey them; no model names a tensor with them). Other characters are allowed.
    """
    if name.isprintable():  # the common case, checked in C
        return None
    for ch in name:
        category = unicodedata.category(ch)
        if category == "Cs":
            return f"contains a lone surrogate ({_escape(ch)}), which is not Unicode text"
        if category == "Cc":
            return f"contains a control character ({_escape(ch)})"
    return None


def io_error(label: str, message: str, *, tensor: str | None = None, notes: tuple[str, ...] = ()) -> TvlangError:
    """A data error about a checkpoint: the message starts with the file's label.

    ``filename`` is left for the recipe (the evaluator fills it in with
    ``with_context``), so the checkpoint is named in the message itself. The label
    is escaped (see :func:`show`); names inside ``message`` are escaped by the caller.
    """
    return TvlangError(f"{show(label)}: {message}", tensor=tensor, notes=notes)


# -- JSON with limits ------------------------------------------------------------------

# A JSON text (a safetensors header, an index) larger than this is refused. It is the
# cap the safetensors library puts on headers; real indexes are far smaller.
MAX_JSON_BYTES = 100_000_000
# Deepest nesting of arrays and objects allowed. Headers and indexes need 3 levels;
# the safetensors library (serde_json) stops at 128.
MAX_JSON_DEPTH = 64
# Longest number allowed, in characters. The largest offset or dimension anyone can
# use has 20 digits; Python refuses to convert integers of more than 4300.
MAX_NUMBER_CHARS = 100
# Most tensors one safetensors file, and one sharded model (its index), may hold. Real
# checkpoints hold a few thousand per file and at most about 150,000 in all (the largest
# mixture-of-experts models with quantization scales); a header of millions of one-entry
# tensors only costs time and memory (a 100 MB header of 1.7 million entries took a
# minute and 2 GB to check). A larger model is read as shards under an index.
MAX_TENSORS_PER_FILE = 1 << 18
MAX_TENSORS_PER_MODEL = 1 << 20


class _JSONLimit(Exception):
    """Raised from inside ``json.loads`` hooks; turned into a TvlangError by load_json."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JSONLimit(f"has the key {quoted(key)} twice in one object")
            seen.add(key)
    return obj


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _JSONLimit(f"has a number of {len(text)} digits (at most {MAX_NUMBER_CHARS} are allowed)")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _JSONLimit(f"has a number of {len(text)} characters (at most {MAX_NUMBER_CHARS} are allowed)")
    return float(text)


_BRACKETS_AND_QUOTES = bytes.maketrans(b"[]{}", b"()()")
_NOT_BRACKETS_OR_QUOTES = bytes(b for b in range(256) if b not in b'[]{}"')
_STRING = re.compile(rb'"[^"]*"')
_DIGITS = bytes.maketrans(b"123456789", b"000000000")


def _too_deep(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in the JSON text ``raw`` nest more than ``limit`` deep.

    Works on the brackets outside strings only, at C speed: escaped backslashes and
    quotes are dropped, then everything but brackets and quotes, then strings. Each
    pass then deletes the innermost pairs, so a header (3 levels) costs three passes
    over a few bytes per tensor; a run of ``limit + 1`` openers answers at once.
    Mismatched brackets are left for the JSON parser to report.
    """
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = raw.translate(_BRACKETS_AND_QUOTES, _NOT_BRACKETS_OR_QUOTES)
    # '""' is an empty string or two strings with nothing between them: drop it either way.
    skeleton = skeleton.replace(b'""', b"")
    brackets = _STRING.sub(b"", skeleton) if b'"' in skeleton else skeleton
    deep = b"(" * (limit + 1)
    for _ in range(limit):  # after pass k, only what nests more than k deep is left
        if not brackets:
            return False
        if deep in brackets:
            return True
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            return False  # unbalanced: not JSON, which json.loads reports
        brackets = shorter
    return bool(brackets)


def _long_number(raw: bytes) -> bool:
    """Whether ``raw`` may hold a number longer than ``MAX_NUMBER_CHARS`` (a long run of
    digits, perhaps inside a string: then the exact check runs while parsing)."""
    return b"0" * (MAX_NUMBER_CHARS - 1) in raw.translate(_DIGITS)


def load_json(label: str, raw: bytes, what: str, *, offset: int = 0, hint: str = "") -> object:
    """Parse ``raw`` (UTF-8 JSON) with limits; every failure is an error naming ``label``.

    ``what`` names the text in messages (``"header"``, ``"index"``); ``offset`` is where
    ``raw`` starts in its file (for the position of a bad byte); ``hint`` ends the
    message when the text is not UTF-8 JSON at all. Refused, besides invalid JSON: text
    over ``MAX_JSON_BYTES``, nesting deeper than ``MAX_JSON_DEPTH``, numbers longer than
    ``MAX_NUMBER_CHARS``, and a key that appears twice in one object (Python's json
    would keep the last one silently).
    """
    if len(raw) > MAX_JSON_BYTES:
        raise io_error(label, f"{what} is {len(raw)} bytes, more than the {MAX_JSON_BYTES} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise io_error(label, f"{what} is not UTF-8 text (bad byte at {offset + exc.start}){hint}") from None
    if _too_deep(raw, MAX_JSON_DEPTH):
        raise io_error(label, f"{what} JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    numbers = {"parse_int": _bounded_int, "parse_float": _bounded_float} if _long_number(raw) else {}
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, **numbers)
    except _JSONLimit as exc:
        raise io_error(label, f"{what} {exc}") from None
    except json.JSONDecodeError as exc:
        raise io_error(label, f"{what} is not valid JSON ({exc.msg} at {what} byte {exc.pos}){hint}") from None
    except RecursionError:  # pragma: no cover - _too_deep stops these first
        raise io_error(label, f"{what} JSON is nested too deeply") from None


# -- regular files only ------------------------------------------------------------------


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def _not_regular(label: str, mode: int) -> TvlangError:
    return io_error(label, f"not a regular file ({_kind_of(mode)}); checkpoints are read only from regular files")


def check_regular(label: str, path: str) -> os.stat_result:
    """``os.stat(path)`` (following links), refusing anything but a regular file.

    A device never ends (``/dev/zero``), a named pipe blocks until someone writes;
    neither is opened.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise io_error(label, "no such file") from None
    except OSError as exc:
        raise io_error(label, f"cannot open: {exc.strerror}") from None
    except ValueError:  # a NUL in the path
        raise io_error(label, "cannot open: the path contains a NUL character") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(label, st.st_mode)
    return st


def open_regular(label: str, path: str) -> tuple[int, int]:
    """Open ``path`` for reading if it is a regular file: ``(fd, size)``.

    Checked with ``os.stat`` before opening, and again with ``fstat`` on what was
    opened (non-blocking, so a pipe swapped in meanwhile cannot hang the open).
    """
    check_regular(label, path)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise io_error(label, "no such file") from None
    except OSError as exc:
        raise io_error(label, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(label, st.st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What must not change between closing a file and opening it again: which file it
    is, its size and its last write (a file deleted and written anew may get the same inode)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_at(fd: int, view: memoryview, offset: int, lock: threading.Lock | None = None) -> int:
    """Read the bytes at ``offset`` of the open file ``fd`` into ``view``: how many were read,
    fewer than ``len(view)`` only where the file ends first (an ``OSError`` as the system
    raises it). ``lock`` guards the file position where there is no ``preadv``."""
    done = 0
    while done < len(view):
        count = _pread_into(fd, view[done:], offset + done, lock)
        if count == 0:
            break
        done += count
    return done


if hasattr(os, "preadv"):

    def _pread_into(fd: int, view: memoryview, offset: int, lock: threading.Lock | None) -> int:
        # preadv reads straight into the caller's memory and keeps no file position,
        # so several threads may read one file at once.
        return os.preadv(fd, [view], offset)

else:  # pragma: no cover - platforms without preadv (Windows)

    def _pread_into(fd: int, view: memoryview, offset: int, lock: threading.Lock | None) -> int:
        with lock if lock is not None else contextlib.nullcontext():
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, len(view))
        view[: len(data)] = data
        return len(data)


def kind_from_metadata(metadata: dict[str, str]) -> str | None:
    """``"delta"`` (or ``"model"``) when tvlang wrote the file and said so; else None."""
    value = metadata.get("tvlang.kind")
    return value if value in ("delta", "model") else None


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor; ``file`` is the file that holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    file: str

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, file: str) -> "TensorInfo":
        """The info of an in-memory tensor."""
        shape = tuple(int(d) for d in tensor.shape)
        return cls(name, shape, tensor.dtype, tensor.numel() * tensor.element_size(), file)


class TensorReader:
    """One checkpoint, read tensor by tensor. Subclasses fill in the tables.

    ``read(name)`` returns a CPU tensor that the caller owns: fresh memory (or a
    copy-on-write map of the file), never a view of a tensor the reader keeps or
    of a state dict the user passed in, so the caller may change it in place.
    """

    label: str
    metadata: dict[str, str]
    kind: str | None
    root: str | None
    # Resolved paths of the files this reader reads (empty for in-memory state).
    paths: tuple[str, ...]
    # Where an hf: reference resolved to (a tvlang.io.hub.HubSource); None for anything else.
    hub: object | None

    def __init__(self, label: str) -> None:
        self.label = label
        self.metadata = {}
        self.kind = None
        self.root = None
        self.paths = ()
        self.hub = None
        self._infos: dict[str, TensorInfo] = {}

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise io_error(self.label, f"has no tensor named '{name}'", tensor=name) from None

    def infos(self) -> list[TensorInfo]:
        """Every tensor's info, in file order."""
        return list(self._infos.values())

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    # Ranged reads: a flat range of a tensor's elements (row-major), for callers that
    # stream a tensor in chunks. Readers override them to read only those bytes; the
    # defaults below read the whole tensor.

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``name`` flattened: a 1-D CPU tensor the caller owns."""
        self.check_range(name, start, stop)
        return self.read(name).reshape(-1)[start:stop]

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """``out[:] = flat[start:stop]``, converted to ``out``'s dtype; ``out`` is 1-D, ``stop - start`` long."""
        self.check_range(name, start, stop, out)
        out.copy_(self.read_range(name, start, stop))

    def prefetch(self, name: str, start: int, stop: int) -> None:
        """A hint that elements ``start:stop`` of ``name`` will be read soon (the default ignores it)."""

    def check_range(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> TensorInfo:
        """The info of ``name``, after checking that ``start:stop`` is a range of its elements
        (and that ``out``, if given, is a 1-D tensor of that many)."""
        info = self.info(name)
        numel = math.prod(info.shape)
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"range [{start}, {stop}) is not inside tensor '{name}' of {numel} elements")
        if out is not None and (out.dim() != 1 or out.numel() != stop - start):
            raise ValueError(f"out has shape {list(out.shape)}, expected [{stop - start}] for tensor '{name}'")
        return info

    def park(self) -> None:
        """Close what a later read can open again (files), while no read is in progress."""

    def close(self) -> None:
        pass

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label!r}: {len(self._infos)} tensors>"
