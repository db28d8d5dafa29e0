"""Where an output may be written, checked before anything is computed.

An output is never the working directory or a directory above it, never an input
(compared by path and by inode) or a directory holding one, and never a path that
another output of the same run also writes or contains. An existing output needs
``force``, and even then is replaced only when it holds what tvlang writes there:
a safetensors file, or a model directory of weights, index, config and tokenizer
files.

>>> replaceable("/no/such/path")
'cannot inspect it: No such file or directory'
>>> is_model_file("model-00001-of-00002.safetensors"), is_model_file("thesis.tex")
(True, False)
>>> output_format("merged.pt"), output_format("tau.safetensors"), output_format("merged/")
('torch', 'safetensors', 'directory')
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence

from tvlang.errors import TvlangError
from tvlang.io.atomic import TEMPORARY_TAG
from tvlang.io.base import TensorReader
from tvlang.io.open import find_weights
from tvlang.io.safetensors_format import INDEX_NAME, SHARD_FILE, SINGLE_NAME, looks_like_safetensors
from tvlang.io.torch_file import is_torch_save_file

__all__ = [
    "COPIED_DIRS",
    "COPIED_FILES",
    "TORCH_SUFFIXES",
    "check_distinct_outputs",
    "check_output_path",
    "input_paths",
    "is_model_file",
    "output_format",
    "replaceable",
]

#: An output path ending in one of these is a PyTorch state dict file (``torch.save``).
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

#: Suffixes that name a file format tvlang reads but does not write as an output.
UNWRITTEN_SUFFIXES = {".ckpt": "a .ckpt file is a training checkpoint (PyTorch Lightning's), not a state dict;"
                               " write a state dict with -o NAME.pt, or safetensors with -o NAME.safetensors"}


def output_format(out: str | os.PathLike) -> str:
    """What an output path is written as: ``"safetensors"`` (one file), ``"torch"``
    (one ``torch.save`` state dict file) or ``"directory"`` (a model directory)."""
    path = os.fspath(out)
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(TORCH_SUFFIXES):
        return "torch"
    suffix = os.path.splitext(path)[1]
    if suffix in UNWRITTEN_SUFFIXES:
        raise TvlangError(f"{path}: cannot write this output: {UNWRITTEN_SUFFIXES[suffix]}")
    return "directory"

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


def input_paths(inputs: Iterable[object]) -> list[str]:
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
_OWN_FILES = frozenset((SINGLE_NAME, INDEX_NAME, "README.md") + COPIED_FILES)


def _is_safetensors_file(path: str) -> bool:
    """A regular file that starts like a safetensors file: an 8-byte length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return looks_like_safetensors(head, size)


def is_model_file(entry: str) -> bool:
    """A file name that tvlang writes into a model directory."""
    return entry in _OWN_FILES or bool(SHARD_FILE.fullmatch(entry))


def check_output_path(out: str, *, force: bool, inputs: Iterable[str] = (),
                      owns: Callable[[str], bool] = is_model_file, dirs: Sequence[str] = COPIED_DIRS,
                      file_format: str = "safetensors") -> None:
    """Refuse an output path that would lose data, before anything is computed.

    An empty path, the working directory or a directory above it are never
    outputs, nor is an input (resolved ``inputs``, compared by path and by inode)
    or a directory holding one. An existing path needs ``force``, and even then
    is replaced only when it holds what tvlang would have written there (see
    ``replaceable``; ``file_format`` is the format of a file output).
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
    reason = replaceable(out, owns=owns, dirs=dirs, file_format=file_format)
    if reason:
        raise TvlangError(
            f"{out}: refusing to replace it: {reason}",
            notes=("--force replaces only what tvlang could have written there; move it away or choose"
                   " another output path",),
        )


def replaceable(path: str, *, owns: Callable[[str], bool] = is_model_file,
                dirs: Sequence[str] = COPIED_DIRS, file_format: str = "safetensors") -> str | None:
    """Why ``--force`` must not replace what ``path`` holds, or None when it may.

    With ``file_format="torch"`` (a ``.pt``/``.pth``/``.bin`` output) it may replace only
    a file that ``torch.save`` wrote (a zip with ``data.pkl``), never a directory.
    Otherwise it may replace a safetensors file, or a directory holding only files that
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
    if file_format == "torch":
        if stat.S_ISREG(mode) and is_torch_save_file(path):
            return None
        if stat.S_ISDIR(mode):
            return "it is a directory, and a .pt/.pth/.bin output is one file"
        return "it is not a file that torch.save wrote" if stat.S_ISREG(mode) else "it is not a regular file"
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
        if TEMPORARY_TAG in entry:
            continue
        if os.path.isfile(full) and owns(entry):
            continue
        return f"it is a directory that holds '{entry}', which tvlang does not write"
    return None


