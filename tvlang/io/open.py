"""``open_reader``: one entry point for every checkpoint a recipe can load."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping

from tvlang.errors import TvlangError
from tvlang.io.base import TensorReader, check_regular, io_error, kind_from_metadata, open_regular
from tvlang.io.safetensors_format import peek_metadata

# The readers (which import torch) are imported where a reader is opened: find_weights and
# choose_weights serve the output checks of the torch-free executor (tvlang.run.direct) too.

__all__ = ["WEIGHT_FILES", "choose_weights", "find_weights", "open_reader", "peek_kind"]

# What a model directory is searched for, in the order transformers' from_pretrained uses.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def open_reader(obj: object, *, label: str | None = None) -> TensorReader:
    """A reader for a path (file or directory), a state dict, or an ``nn.Module``.

    Paths: a ``.safetensors`` file; an index ``*.index.json``; a ``.bin``/``.pt``
    state dict; or a model directory holding one of ``WEIGHT_FILES``.

    >>> import torch
    >>> r = open_reader(torch.nn.Linear(2, 1, bias=False))
    >>> r.label, r.names(), r.info("weight").shape
    ('<module Linear>', ['weight'], (1, 2))
    """
    from tvlang.io.torch_file import StateDictReader

    if isinstance(obj, TensorReader):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        return _open_path(path, label if label is not None else path)
    try:
        import torch.nn
    except ImportError:  # pragma: no cover
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(obj, torch.nn.Module):
        return StateDictReader(obj.state_dict(), label=label or f"<module {type(obj).__name__}>")
    if isinstance(obj, Mapping):
        return StateDictReader(obj, label=label or "<state dict>")
    raise io_error(label or "<input>", f"cannot read weights from a {type(obj).__name__}"
                   " (expected a path, a state dict or a torch.nn.Module)")


def find_weights(directory: str) -> str | None:
    """The weights file of a model directory, or None."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return None
    return choose_weights([e for e in entries if os.path.isfile(os.path.join(directory, e))])


def choose_weights(names: list[str]) -> str | None:
    """Which of a model folder's file ``names`` holds its weights, or None.

    ``WEIGHT_FILES`` in order, else a single ``*.safetensors.index.json``, else a
    single ``*.safetensors`` (e.g. a renamed export). The one rule for a local
    directory and a Hub folder (``tvlang.io.hub``), whose names come from a listing.

    >>> choose_weights(["config.json", "pytorch_model.bin", "model.safetensors"])
    'model.safetensors'
    >>> choose_weights(["merged.safetensors", "README.md"]), choose_weights(["a.safetensors", "b.safetensors"])
    ('merged.safetensors', None)
    """
    present = set(names)
    for name in WEIGHT_FILES:
        if name in present:
            return name
    entries = sorted(present)
    indexes = [e for e in entries if e.endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        return indexes[0]
    singles = [e for e in entries if e.endswith(".safetensors") and not e.startswith(".")]
    if len(singles) == 1:
        return singles[0]
    return None


def _near_names(path: str) -> tuple[str, ...]:
    """A note naming the entries of the path's directory that look like it (a typo).

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, "ft.safetensors"), "w").close()
    >>> [note.replace(d, "D") for note in _near_names(os.path.join(d, "ft.safetenosrs"))]
    ["note: did you mean 'D/ft.safetensors'?"]
    """
    folder, name = os.path.split(path)
    try:
        entries = [e for e in os.listdir(folder or ".") if not e.startswith(".")]
    except OSError:
        return ()
    close = difflib.get_close_matches(name, entries, n=1, cutoff=0.75)
    if not close:
        return ()
    shown = " or ".join(repr(os.path.join(folder, c) if folder else c) for c in close)
    return (f"note: did you mean {shown}?",)


def _open_path(path: str, label: str) -> TensorReader:
    from tvlang.io.safetensors_file import SafetensorsReader
    from tvlang.io.sharded import ShardedReader
    from tvlang.io.torch_file import TorchFileReader

    if not os.path.exists(path):
        raise io_error(label, "no such file or directory", notes=_near_names(path))
    if os.path.isdir(path):
        found = find_weights(path)
        if found is None:
            try:
                entries = os.listdir(path)
            except OSError as exc:
                raise io_error(label, f"cannot list the directory: {exc.strerror}") from None
            several = sorted(e for e in entries if e.endswith(".safetensors") and not e.startswith("."))
            notes = ["looked for " + ", ".join(WEIGHT_FILES) + ", or a single *.safetensors file"]
            if len(several) > 1:
                notes.append("found several: " + ", ".join(several[:5]) + "; name the file to load")
            raise io_error(label, "directory holds no model weights", notes=tuple(notes))
        reader = _open_path(os.path.join(path, found), os.path.join(label, found))
        reader.label = label
        reader.root = os.path.realpath(path)
        return reader
    # Devices, pipes and sockets are refused before anything opens them: /dev/zero never
    # ends, and opening a named pipe blocks until something writes to it.
    check_regular(label, path)
    if path.endswith(".json"):
        return ShardedReader(path, label=label)
    if path.endswith(".safetensors"):
        return SafetensorsReader(path, label=label)
    if path.endswith(_TORCH_SUFFIXES):
        return TorchFileReader(path, label=label)
    # Unknown extension: sniff. A zip is a torch checkpoint; an 8-byte length then '{' is safetensors.
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise io_error(label, f"cannot read: {exc.strerror}") from None
    if head[8:9] == b"{":
        return SafetensorsReader(path, label=label)
    return TorchFileReader(path, label=label)


def peek_kind(path: str) -> str:
    """"delta" when the file at ``path`` says it is a tvlang task vector, else "model".

    Reads the header only. A path that cannot be opened counts as a model here:
    the evaluator reports it, with its reason, if the plan needs it.
    """
    if os.path.isdir(path):  # a model directory of one safetensors file: that file's header
        found = find_weights(path)
        if found is not None and found.endswith(".safetensors"):
            path = os.path.join(path, found)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        metadata = _peek_metadata(path)
        if metadata is not None:  # the common case, without parsing every tensor's entry
            return "delta" if kind_from_metadata(metadata) == "delta" else "model"
    try:
        reader = open_reader(path, label=path)
    except TvlangError:
        return "model"
    try:
        return "delta" if reader.kind == "delta" else "model"
    finally:
        reader.close()


def _peek_metadata(path: str) -> dict[str, str] | None:
    try:
        fd, size = open_regular(path, path)
    except TvlangError:
        return None
    try:
        return peek_metadata(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)
