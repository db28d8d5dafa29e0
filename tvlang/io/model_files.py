"""The files of a model directory beside its weights: the base's config and tokenizer
files that an output copies (``COPIED_FILES``, ``COPIED_DIRS``), and extra files an
output writes (a model card).

Used by the streaming writer and by the Ray executor's sharded output, which put them
in the output's temporary directory before it is renamed into place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from tvlang.io.output_paths import COPIED_DIRS, COPIED_FILES

__all__ = ["copy_model_files", "model_file_names", "write_files"]


def model_file_names(copy_from: str | None) -> list[str]:
    """The files ``copy_model_files`` copies out of the directory ``copy_from``: paths relative to it
    (``/`` separators), sorted; none when it is not a directory."""
    if not copy_from or not os.path.isdir(copy_from):
        return []
    names = [name for name in COPIED_FILES if os.path.isfile(os.path.join(copy_from, name))]
    for name in COPIED_DIRS:
        top = os.path.join(copy_from, name)
        if os.path.isdir(top):
            for root, _, files in os.walk(top):
                names += [os.path.relpath(os.path.join(root, f), copy_from).replace(os.sep, "/") for f in files]
    return sorted(names)


def copy_model_files(copy_from: str | None, directory: str) -> None:
    """Copy the base model's config and tokenizer files (``COPIED_FILES``, ``COPIED_DIRS``)
    from the directory ``copy_from`` into ``directory``, so the output loads with from_pretrained."""
    if not copy_from or not os.path.isdir(copy_from):
        return
    for name in COPIED_FILES:
        source = os.path.join(copy_from, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(directory, name))
    for name in COPIED_DIRS:
        source = os.path.join(copy_from, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(directory, name))


def write_files(files: Mapping[str, bytes], directory: str) -> None:
    """Write each ``name: bytes`` of ``files`` (plain names, such as ``README.md``) into ``directory``."""
    for name, data in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"an output's extra file is a plain name, not {name!r}")
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
