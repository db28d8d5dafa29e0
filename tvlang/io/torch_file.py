"""PyTorch state dicts: ``.bin``/``.pt`` files and in-memory ones.

Files are loaded only through ``torch.load(path, weights_only=True)``: a
pickle that needs any class outside plain tensors and containers is refused,
never run. Zip checkpoints (what ``torch.save`` writes since torch 1.6) are
mapped with ``mmap=True``, so loading costs no memory and a tensor's bytes
are paged in when it is read; older (legacy) files cannot be mapped and are
loaded into memory whole.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tvlang.io.base import TensorInfo, TensorReader, io_error, name_problem, open_regular, quoted, show
from tvlang.io.safetensors_format import looks_like_safetensors

if TYPE_CHECKING:
    import torch

# torch is imported where a function uses it, not above: is_torch_save_file (what --force may
# replace) serves the torch-free executor too (tvlang.run.direct).

__all__ = ["StateDictReader", "TorchFileReader", "is_torch_save_file", "load_state_dict_file"]

# Keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def _owned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares nothing with ``tensor``."""
    import torch

    out = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
    out.copy_(tensor.detach())
    return out


def _find_state_dict(label: str, obj: object) -> Mapping[str, torch.Tensor]:
    """The mapping of names to tensors inside what ``torch.load`` returned."""
    import torch

    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if not obj:
            return obj
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:3]
        raise io_error(
            label,
            "is not a state dict: entries " + ", ".join(_short(k) for k in bad) + " are not tensors",
            notes=("a state dict maps tensor names to tensors (model.state_dict());"
                   f" nested dicts are looked for under {', '.join(_WRAPPER_KEYS)}",),
        )
    raise io_error(label, f"is not a state dict: it holds a {type(obj).__name__}")


# What a file that is not a checkpoint should become, said once for every such message.
_CONVERT = (
    "tvlang reads .safetensors files and PyTorch state dicts saved with torch.save(model.state_dict(), path);"
    " convert other weights to safetensors (safetensors.torch.save_file) in a trusted environment"
)
_RECIPE = "a recipe is run with `tvlang run RECIPE`, and checkpoints are bound to its names with --bind NAME=PATH"

# torch.save's legacy (pre-zip) format opens with this number, pickled (little-endian long).
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_METHODS = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
_SNIFF_BYTES = 4096


def _sniff(label: str, head: bytes, size: int) -> str:
    """``"zip"``, ``"legacy"`` or ``"tar"`` for what ``torch.load`` reads; anything else
    is an error that says what the file looks like and what to do with it."""
    if size == 0:
        raise _not_torch(label, "is empty (0 bytes), not a checkpoint")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head[:32]:
        return "legacy"
    if head[257:262] == b"ustar":
        return "tar"  # torch.save's oldest format
    if looks_like_safetensors(head, size):
        raise _not_torch(label, "is a safetensors file, not a PyTorch checkpoint: give it the .safetensors extension")
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or _pickle_0(head):
        raise _not_torch(
            label,
            "is a plain Python pickle, not a checkpoint saved with torch.save; tvlang does not unpickle"
            " arbitrary objects (unpickling can run code)",
            notes=(_CONVERT,),
        )
    for magic, what in _MAGICS:
        if head.startswith(magic):
            raise _not_torch(label, f"is {what}, not a checkpoint", notes=(_CONVERT,))
    text = _as_text(head, size)
    if text is not None:
        stripped = text.lstrip()
        if stripped[:1] in ("{", "["):
            notes = [_CONVERT]
            if '"weight_map"' in text:
                notes.insert(0, "it looks like a sharded checkpoint's index: name it *.index.json or give its folder")
            raise _not_torch(label, "is JSON text, not a checkpoint", notes=tuple(notes))
        raise _not_torch(label, "is a text file, not a checkpoint", notes=(_RECIPE, _CONVERT))
    first = " ".join(f"{b:02x}" for b in head[:8])
    raise _not_torch(
        label,
        f"is binary data in no format tvlang reads (random bytes?): it starts {first}",
        notes=(_CONVERT,),
    )


def _not_torch(label: str, what: str, *, notes: tuple[str, ...] = ()) -> Exception:
    return io_error(label, f"cannot load as a PyTorch checkpoint: it {what}", notes=notes)


_MAGICS = (
    (b"\x1f\x8b", "gzip-compressed data (decompress it first)"),
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras or TensorFlow weights?)"),
    (b"\x93NUMPY", "a NumPy array (.npy)"),
)


def _as_text(head: bytes, size: int) -> str | None:
    """``head`` as text if it is printable UTF-8 (a cut character at its end allowed)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(head) < size and exc.start >= len(head) - 3 and exc.reason == "unexpected end of data":
            text = head[: exc.start].decode("utf-8", errors="replace")
        else:
            return None
    text = text.removeprefix("\ufeff")
    if not text or not all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text):
        return None
    return text


def _pickle_0(head: bytes) -> bool:
    """Whether ``head`` is a whole pickle of protocol 0 or 1 (text-like, no header).

    Only parsed, with ``pickletools``: nothing is built or run."""
    if not head[:1] or head[:1] not in b"(]}cdlLIFSVN\x88":
        return False
    try:
        ops = list(pickletools.genops(io.BytesIO(head)))
    except Exception:  # noqa: BLE001 - not a (whole) pickle
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _check_zip(label: str, f: io.BufferedReader, size: int) -> None:
    """Refuse a zip that torch.save could not have written before anything is inflated.

    torch.save stores entries uncompressed; a compressed entry can inflate to far more
    than the file (a zip bomb). Only the central directory is read here.
    """
    try:
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types for a damaged archive
        raise io_error(label, f"is a damaged zip archive ({show(str(exc))[:200]}); not a PyTorch checkpoint?") from None
    if not any(i.filename == "data.pkl" or i.filename.endswith("/data.pkl") for i in infos):
        held = ", ".join(quoted(i.filename) for i in infos[:3]) + (", ..." if len(infos) > 3 else "")
        raise io_error(
            label,
            f"is a zip archive but not a PyTorch checkpoint: it has no data.pkl (it holds {held or 'nothing'})",
            notes=(_CONVERT,),
        )
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            method = _ZIP_METHODS.get(info.compress_type, f"method {info.compress_type}")
            raise io_error(
                label,
                f"refusing to load: zip entry {quoted(info.filename)} is compressed ({method}, {info.file_size} bytes"
                f" inflated); torch.save never compresses, and a compressed entry may be a zip bomb",
                notes=("load it in a trusted environment and save it again (torch.save or safetensors)",),
            )
        if info.file_size > size:
            raise io_error(
                label,
                f"refusing to load: zip entry {quoted(info.filename)} declares {info.file_size} bytes,"
                f" more than the whole file ({size} bytes)",
            )
        if info.file_size != info.compress_size:
            raise io_error(
                label,
                f"refusing to load: zip entry {quoted(info.filename)} declares {info.file_size} bytes"
                f" but stores {info.compress_size}",
            )
        total += info.file_size
    if total > size:
        raise io_error(
            label,
            f"refusing to load: its zip entries declare {total} bytes in all, more than the whole file ({size} bytes)",
        )


def _torch_reason(exc: BaseException) -> str:
    """Why torch.load failed, in a line of tvlang's own: torch's advice (retry with
    ``weights_only=False``, allowlist globals) is never repeated, and nothing is printed raw."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([^\s]+)", text)
    if found:
        return f"the pickle needs {quoted(found.group(1))}, which is not a tensor or a plain container"
    found = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\.?\s*Please use|\n|$)", text)
    if found and found.group(1).strip():
        return show(found.group(1).strip())[:200]
    if "weights_only" in text or "Weights only" in text:
        return "the pickle holds more than tensors and plain containers"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return show(first)[:300]


def load_state_dict_file(path: str, label: str) -> Mapping[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` (and ``mmap`` for zip files), after checks.

    Only a regular file is opened. Its first bytes must be a torch.save format (zip or
    legacy); anything else is refused with what it looks like. A zip is checked entry
    by entry (:func:`_check_zip`) before torch reads it. torch then reads the very file
    that was checked (``/proc/self/fd``, where there is one).
    """
    import torch

    if os.path.isdir(path):
        raise io_error(label, "is a directory, not a PyTorch checkpoint")
    fd, size = open_regular(label, path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            try:
                head = f.read(_SNIFF_BYTES)
            except OSError as exc:
                raise io_error(label, f"cannot read: {exc.strerror}") from None
            kind = _sniff(label, head, size)
            if kind == "zip":
                f.seek(0)
                _check_zip(label, f, size)
        same_file = f"/proc/self/fd/{fd}"
        source = same_file if os.path.exists(same_file) else path
        try:
            with warnings.catch_warnings():
                # torch's warnings (old pickle protocols, TypedStorage) are not for the user.
                warnings.simplefilter("ignore")
                obj = torch.load(source, map_location="cpu", weights_only=True, mmap=kind == "zip")
        except Exception as exc:  # noqa: BLE001 - torch raises many types; all mean "cannot load safely"
            text = str(exc)
            unsafe = ("weights_only", "Weights only", "Unsupported global")
            if any(word in text for word in unsafe) or type(exc).__name__ == "UnpicklingError":
                raise io_error(
                    label,
                    "refusing to load: the pickle needs more than plain tensors"
                    " (torch.load(weights_only=True) failed; tvlang never runs code from a checkpoint)",
                    notes=(_torch_reason(exc), "convert it to safetensors in a trusted environment"),
                ) from None
            raise io_error(label, f"cannot load as a PyTorch checkpoint: {_torch_reason(exc)}") from None
    finally:
        os.close(fd)
    state = _find_state_dict(label, obj)
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise io_error(label, f"is not a state dict: key {_short(bad[0])} is not a string")
    return state


def _short(value: object) -> str:
    text = show(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot be read as a dense array of numbers, or None."""
    import torch

    if tensor.is_nested:
        return "is a nested tensor (tensors of different shapes); tvlang reads dense tensors only"
    if tensor.layout != torch.strided:
        layout = str(tensor.layout).removeprefix("torch.")
        return f"is sparse ({layout}); tvlang reads dense tensors only: save tensor.to_dense() instead"
    if tensor.is_meta:
        return "is on the meta device: it has a shape but no data (saved before its weights were loaded?)"
    if tensor.is_quantized:
        dtype = str(tensor.dtype).removeprefix("torch.")
        return f"is quantized ({dtype}); tvlang reads plain dtypes only: save tensor.dequantize()"
    return None


class StateDictReader(TensorReader):
    """Tensors already in memory: a ``Mapping[str, Tensor]``.

    ``read`` returns the caller's tensor itself (detached, on its own device; a contiguous copy
    of one that is not contiguous): a source bound to memory is *borrowed*
    (``tvlang.run.bindings``), and the executor never changes a borrowed tensor in place nor
    hands one back as a result (``tvlang.run.whole``, ``tvlang.run.session``). Copying every
    input first took more than half of an in-memory task arithmetic's time on the CPU, and on
    a GPU took each input to the host and back (docs/performance.md, "In-memory inputs read in
    place"). ``read_range`` copies.

    >>> import torch
    >>> r = StateDictReader({"b": torch.zeros(2), "a": torch.ones(1, dtype=torch.int64)}, label="<sd>")
    >>> r.names(), r.info("a").dtype
    (['b', 'a'], torch.int64)
    """

    def __init__(self, state: Mapping[str, torch.Tensor], *, label: str = "<state dict>", file: str | None = None) -> None:
        import torch

        super().__init__(label)
        for name, tensor in state.items():
            if not isinstance(name, str):
                raise io_error(label, f"key {_short(name)} is not a string")
            problem = name_problem(name)
            if problem is not None:
                raise io_error(label, f"tensor name {quoted(name)} {problem}", tensor=name)
            if not isinstance(tensor, torch.Tensor):
                raise io_error(label, f"entry {quoted(name)} is a {type(tensor).__name__}, not a tensor", tensor=name)
            problem = _tensor_problem(tensor)
            if problem is not None:
                raise io_error(label, f"tensor {quoted(name)} {problem}", tensor=name)
            self._infos[name] = TensorInfo.of(name, tensor, file if file is not None else label)
        self._state = state
        self._kept_flat: tuple[str, torch.Tensor] | None = None

    def read(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._state[name].detach().contiguous()

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        self.check_range(name, start, stop)
        return _owned_copy(self._flat(name)[start:stop])

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        self.check_range(name, start, stop, out)
        out.copy_(self._flat(name)[start:stop])

    def _flat(self, name: str) -> torch.Tensor:
        """Tensor ``name`` flattened: a view when it is contiguous (a file's tensors are);
        else one contiguous copy, kept for the ranges that follow (one tensor at a time)."""
        tensor = self._state[name].detach()
        if tensor.is_contiguous():
            return tensor.reshape(-1)
        kept = self._kept_flat
        if kept is None or kept[0] != name:
            kept = self._kept_flat = (name, tensor.reshape(-1))
        return kept[1]

    def close(self) -> None:
        self._state = {}
        self._kept_flat = None


class TorchFileReader(StateDictReader):
    """A ``.bin``/``.pt`` file written by ``torch.save(state_dict, path)``. Its source is not
    borrowed (the tensors are the reader's), so ``read`` returns a copy the caller may change."""

    def __init__(self, path: str | os.PathLike, *, label: str | None = None) -> None:
        path = os.fspath(path)
        label = label if label is not None else path
        super().__init__(load_state_dict_file(path, label), label=label)
        resolved = os.path.realpath(path)
        self.paths = (resolved,)
        parent = os.path.dirname(resolved)
        self.root = parent if os.path.isfile(os.path.join(parent, "config.json")) else None

    def read(self, name: str) -> torch.Tensor:
        self.info(name)
        return _owned_copy(self._state[name])


def is_torch_save_file(path: str) -> bool:
    """Whether ``path`` is a zip file as ``torch.save`` writes it (an entry ``*/data.pkl``),
    read from its central directory only: what ``--force`` may replace with a ``.pt`` output."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
