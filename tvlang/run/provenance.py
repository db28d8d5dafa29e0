"""Where a run's inputs came from, said so that it holds on another machine.

A Hub input is its reference pinned to the commit it resolved to
(``hf:org/name@<sha>``); a local input is its path relative to the recipe file's
directory, however it was given (from the working directory, or absolute), so a
recipe checked in beside its inputs records the same text on every machine;
with no recipe file (``-e``, API text without ``filename=``) a path is recorded
as it was given; anything else (a state dict, a module) is its label. ``describe_inputs``
adds what a lockfile and a model card say about each: the revision asked for,
the commit, the files read.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tvlang.io import TensorReader

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["describe_input", "input_files", "location", "recipe_dir", "relative"]


def recipe_dir(plan: Plan) -> str | None:
    """The directory local inputs are recorded relative to: the recipe file's; None without a file."""
    filename = plan.filename
    if filename and os.path.isfile(filename):
        return os.path.dirname(os.path.abspath(filename))
    return None


def relative(path: str, base: str | None) -> str:
    """``path`` relative to ``base``, with ``/`` separators (the same text on every system); as given without one."""
    if base is None:
        return path
    return os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")


def location(reader: TensorReader, base: str | None) -> str:
    """What the metadata calls an input: a pinned Hub reference, a path relative to ``base``, or a label."""
    if reader.hub is not None:
        return reader.hub.pinned
    if reader.paths and os.path.exists(reader.label):
        return relative(reader.label, base)
    return reader.label


def input_files(reader: TensorReader, base: str | None) -> dict[str, str]:
    """``{name: local path}`` of every file a reader reads: repository paths for a Hub input,
    paths relative to ``base`` for a local one (none for in-memory state)."""
    source = reader.hub
    if source is not None:
        return {path: source.local(path) for path in source.files}
    return {relative(path, base): path for path in reader.paths}


def describe_input(reader: TensorReader, base: str | None) -> dict[str, Any]:
    """One input as the lockfile and the model card record it (files without hashes)."""
    source = reader.hub
    if source is not None:
        return {"ref": source.reference.text, "repo": source.reference.repo_id, "revision": source.revision,
                "commit": source.commit, "pinned": source.pinned}
    if reader.paths and os.path.exists(reader.label):
        return {"path": relative(reader.label, base)}
    return {"label": reader.label}
