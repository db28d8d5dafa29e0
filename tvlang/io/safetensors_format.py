"""The safetensors format: its dtype codes, the header read and checked, the header and
the sharded layout's index built.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
"__metadata__": {...}}``), then the data, with offsets relative to the data's
start. The header is parsed and checked here, without the ``safetensors``
package, so that every malformed file gets a message naming the file and the
tensor. A model directory holds ``model.safetensors``, or shards
``model-00001-of-00003.safetensors`` ... and ``model.safetensors.index.json``
(``{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}``).

>>> import torch
>>> from tvlang.io.base import TensorInfo
>>> raw, size = build_header([TensorInfo("w", (2,), torch.float32, 8, "")], {"format": "pt"})
>>> len(raw) % 8, size  # the data starts 8-byte aligned
(0, 8)
>>> meta, entries = parse_header("<test>", raw[8:], len(raw) + size)
>>> meta, entries == [("w", (2,), torch.float32, len(raw), len(raw) + 8)]
({'format': 'pt'}, True)
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tvlang.errors import TvlangError
from tvlang.io.base import (
    MAX_JSON_BYTES,
    MAX_TENSORS_PER_FILE,
    TensorInfo,
    io_error,
    load_json,
    name_problem,
    quoted,
    show,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "CODES",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "SHARD_FILE",
    "SINGLE_NAME",
    "build_header",
    "build_index",
    "dtype_code",
    "itemsize",
    "looks_like_safetensors",
    "parse_header",
    "read_header",
    "shard_name",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Hugging Face's shard file names (see shard_name).
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def shard_name(index: int, count: int) -> str:
    """Hugging Face's shard naming, 1-based: ``model-00001-of-00003.safetensors``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


#: Every dtype code of the format: its item size and the name of the torch dtype that holds it.
#: The last eight are types that only newer torch builds have: with torch, a file that uses
#: one this build lacks is refused as an unknown dtype.
CODES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "C64": (8, "complex64"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
}
# numpy's names of the types it has (the torch-free executor's buffers, tvlang.run.direct)
_NUMPY_CODES = {attr: code for code, (_, attr) in CODES.items() if not attr.startswith(("float8", "bfloat"))}

_torch_tables: list = []  # [(code -> torch dtype, torch dtype -> code)], filled on first use


def _tables() -> tuple[dict, dict]:
    """The codes this torch build holds, both ways. This module imports torch only here, so that
    headers can be read and built without it (the torch-free executor, tvlang.run.direct)."""
    if not _torch_tables:
        import torch

        table = {}
        for code, (_, attr) in CODES.items():
            dtype = getattr(torch, attr, None)
            if isinstance(dtype, torch.dtype):
                table[code] = dtype
        _torch_tables.append((table, {v: k for k, v in table.items()}))
    return _torch_tables[0]


def __getattr__(name: str):
    # DTYPE_FROM_SAFETENSORS (code -> torch dtype) and SAFETENSORS_FROM_DTYPE (the reverse),
    # built when first asked for (so not in __all__: a star import would import torch)
    if name == "DTYPE_FROM_SAFETENSORS":
        return _tables()[0]
    if name == "SAFETENSORS_FROM_DTYPE":
        return _tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_code(dtype: object) -> str | None:
    """The code of a torch dtype, a numpy dtype or a code itself; None where the format has none.

    >>> import numpy, torch
    >>> dtype_code(torch.bfloat16), dtype_code(numpy.dtype("float32")), dtype_code("F16"), dtype_code("f4")
    ('BF16', 'F32', 'F16', None)
    """
    if isinstance(dtype, str):
        return dtype if dtype in CODES else None
    if type(dtype).__module__ == "torch":
        return _tables()[1].get(dtype)
    return _NUMPY_CODES.get(getattr(dtype, "name", None))


def itemsize(code: str) -> int:
    """The bytes of one entry of dtype ``code``."""
    return CODES[code][0]


# The same cap the reference implementation uses: a larger header is not a safetensors file.
MAX_HEADER_BYTES = MAX_JSON_BYTES

# No dimension, and no product of the non-zero dimensions, may exceed this: torch's
# sizes and strides are int64 (a shape [0, 2**70] holds no bytes, yet no tensor has it).
MAX_DIM = 2**63 - 1


def parse_header(
    label: str, raw: bytes, file_size: int, *, codes: bool = False
) -> tuple[dict[str, str], list[tuple[str, tuple[int, ...], torch.dtype | str, int, int]]]:
    """Check a header and return ``(metadata, entries)``.

    ``raw`` is the JSON text; ``file_size`` the size of the whole file. Each
    entry is ``(name, shape, dtype, begin, end)`` with absolute byte offsets in
    the file, sorted by ``begin`` (file order). ``dtype`` is a torch dtype, or with
    ``codes=True`` the format's code (``"F32"``), checked against ``CODES`` without torch.

    The rules are the safetensors library's: besides well-formed entries, the data
    offsets, sorted, must tile the data exactly: the first tensor starts at 0, each
    next one where the previous one ends, and the last one ends at the end of the file.
    Tvlang also refuses a key that appears twice, names with control characters, and
    JSON nested or numbers longer than the limits of :func:`load_json`.
    """
    data_start = 8 + len(raw)
    # Every entry has a "data_offsets" key: counting them is a bound found before parsing.
    _check_count(label, raw.count(b'"data_offsets"'))
    header = load_json(label, raw, "header", offset=8, hint="; not a safetensors file?")
    if not isinstance(header, dict):
        raise io_error(label, f"header is a JSON {type(header).__name__}, not an object; not a safetensors file?")
    _check_count(label, len(header) - ("__metadata__" in header))

    metadata: dict[str, str] = {}
    raw_meta = header.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise io_error(label, "header '__metadata__' is not a JSON object")
        for key, value in raw_meta.items():
            if not isinstance(value, str):
                raise io_error(label, f"header '__metadata__' value of {quoted(key)} is not a string")
            for text in (key, value):
                if not text.isprintable() and _has_surrogate(text):
                    raise io_error(
                        label,
                        f"header '__metadata__' entry {quoted(key)} contains a lone surrogate (not Unicode text)",
                    )
            metadata[key] = value

    entries = []
    torch_dtypes = None if codes else _tables()[0]
    itemsizes = {code: CODES[code][0] for code in (CODES if torch_dtypes is None else torch_dtypes)}
    for name, entry in header.items():
        # The checks run once per tensor per header: the common case takes the cheap path.
        if not name.isprintable():
            problem = name_problem(name)
            if problem is not None:
                raise io_error(label, f"tensor name {quoted(name)} {problem}", tensor=name)
        if type(entry) is not dict:
            raise io_error(label, f"tensor {quoted(name)} has a malformed header entry (not an object)", tensor=name)
        try:
            code = entry["dtype"]
            shape = entry["shape"]
            offsets = entry["data_offsets"]
        except KeyError:
            missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
            lacks = ", ".join(missing)
            raise io_error(label, f"tensor {quoted(name)} header entry lacks {lacks}", tensor=name) from None
        if type(code) is not str or code not in itemsizes:
            known = ", ".join(itemsizes)
            shown = repr(show(code)) if isinstance(code, str) else _short(code)
            raise io_error(label, f"tensor {quoted(name)} has unknown dtype {shown} (known: {known})", tensor=name)
        if type(shape) is not list or (shape and (not {type(d) for d in shape} <= {int} or min(shape) < 0)):
            raise io_error(label, f"tensor {quoted(name)} has a malformed shape {_short(shape)}", tensor=name)
        numel = math.prod(shape)
        if numel > MAX_DIM or (not numel and math.prod(filter(None, shape)) > MAX_DIM):
            raise io_error(
                label,
                f"tensor {quoted(name)} has shape {_short(shape)}, too large for any tensor (at most 2**63-1 elements)",
                tensor=name,
            )
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise io_error(label, f"tensor {quoted(name)} has malformed data offsets {_short(offsets)}", tensor=name)
        begin, end = offsets
        expected = numel * itemsizes[code]
        if end - begin != expected:
            raise io_error(
                label,
                f"header lies about tensor {quoted(name)}: shape {shape} of {code} needs {expected} bytes"
                f" but its data offsets [{begin}, {end}] span {end - begin}",
                tensor=name,
            )
        dtype = code if torch_dtypes is None else torch_dtypes[code]
        entries.append((name, tuple(shape), dtype, data_start + begin, data_start + end))

    entries.sort(key=lambda e: (e[3], e[4]))
    for name, _, _, begin, end in entries:
        if end > file_size:
            raise io_error(
                label,
                f"file is truncated: tensor {quoted(name)} ends at byte {end} but the file has {file_size} bytes",
                tensor=name,
            )
    # Sorted by offset, tensors must follow each other with neither gaps nor overlaps.
    position = prev_begin = data_start
    previous = None
    for name, _, _, begin, end in entries:
        if begin < position:
            if begin == end:
                what = f"empty tensor {quoted(name)} at byte {begin - data_start} lies inside tensor {quoted(previous)}"
            else:
                what = f"tensors {quoted(previous)} and {quoted(name)} overlap"
            raise io_error(
                label,
                f"header lies about offsets: {what} (bytes [{prev_begin - data_start}, {position - data_start})"
                f" and [{begin - data_start}, {end - data_start}))",
                tensor=name,
            )
        if begin > position:
            after = f"after tensor {quoted(previous)}" if previous is not None else "at the start of the data"
            raise io_error(
                label,
                f"header leaves a gap: data bytes [{position - data_start}, {begin - data_start}) {after}"
                f" belong to no tensor (tensor {quoted(name)} starts at {begin - data_start})",
                tensor=name,
            )
        if end > begin or previous is None:
            previous, prev_begin = name, begin
        position = end
    if position != file_size:
        last = f"the last tensor, {quoted(previous)}," if previous is not None else "the header (no tensors)"
        raise io_error(
            label,
            f"file has {file_size - position} bytes after the data: {last} ends at byte {position}"
            f" but the file has {file_size} bytes (the safetensors library refuses such files)",
        )
    return metadata, entries


def _check_count(label: str, count: int) -> None:
    if count > MAX_TENSORS_PER_FILE:
        raise io_error(
            label,
            f"header holds {count} tensors, more than the {MAX_TENSORS_PER_FILE} tvlang reads from one file"
            " (real checkpoints hold a few thousand per file); split it into shards under an index",
        )


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _short(value: object) -> str:
    """A malformed value for a message: escaped and at most 80 characters."""
    text = show(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def read_header(label: str, fd: int, file_size: int, *, codes: bool = False) -> tuple[dict[str, str], list]:
    """Read and check the header of the open file ``fd`` (``codes``: as :func:`parse_header`)."""
    return parse_header(label, header_bytes(label, fd, file_size), file_size, codes=codes)


def header_bytes(label: str, fd: int, file_size: int) -> bytes:
    """The JSON text of the header of the open file ``fd``, its length checked against the file."""
    if file_size < 8:
        raise io_error(label, f"not a safetensors file: it has {file_size} bytes, fewer than the 8-byte header length")
    (length,) = struct.unpack("<Q", _pread_exact(fd, 8, 0))
    if length > MAX_HEADER_BYTES:
        raise io_error(label, f"not a safetensors file: header length {length} is absurd (more than {MAX_HEADER_BYTES} bytes)")
    if 8 + length > file_size:
        raise io_error(label, f"file is truncated: the header says it is {length} bytes but the file has {file_size} bytes")
    return _pread_exact(fd, length, 8)


_METADATA_KEY = re.compile(rb'"__metadata__"\s*:\s*')


def peek_metadata(fd: int, file_size: int) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file without parsing its tensors' entries,
    or ``None`` when that cannot be told cheaply (the caller then reads the whole header).

    For the kind peek that types a recipe's free names before a run: a header with
    1.4 million entries takes seconds to parse and check, its metadata a millisecond.
    Nothing here is trusted beyond that: the run parses and checks the whole header.

    >>> import json, os, struct, tempfile
    >>> header = json.dumps({"__metadata__": {"tvlang.kind": "delta"},
    ...                      "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(struct.pack("<Q", len(header)) + header + bytes(4))
    >>> fd = os.open(path, os.O_RDONLY)
    >>> peek_metadata(fd, os.fstat(fd).st_size)
    {'tvlang.kind': 'delta'}
    >>> os.close(fd)
    """
    try:
        raw = header_bytes("", fd, file_size)
    except TvlangError:
        return None
    found = [m for m in _METADATA_KEY.finditer(raw) if m.start() == 0 or raw[m.start() - 1:m.start()] != b"\\"]
    if not found:
        return {} if raw[:1] == b"{" else None  # no metadata at all
    if len(found) > 1:
        return None  # a tensor name that spells the key: let the full parse decide
    try:
        value, _ = json.JSONDecoder().raw_decode(raw[found[0].end():].decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # the full parse says what is wrong
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return None
    return value


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes that starts with ``head`` (at least 9 bytes of it)
    starts like a safetensors file: an 8-byte length that fits the file, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size


def build_header(infos: Sequence[TensorInfo], metadata: Mapping[str, str]) -> tuple[bytes, int]:
    """The header of a file holding ``infos`` in order: ``(length + JSON, data size)``; an info's
    dtype is a torch dtype or a code (:func:`dtype_code`)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for info in infos:
        header[info.name] = {
            "dtype": dtype_code(info.dtype),
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def build_index(weight_map: Mapping[str, str], total_size: int) -> bytes:
    """The text of ``model.safetensors.index.json``: tensor -> shard file, and the data size."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    return (json.dumps(index, indent=2) + "\n").encode("utf-8")
