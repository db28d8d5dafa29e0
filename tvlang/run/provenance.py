"""Where a run's inputs came from, said so that it holds on another machine.

A Hub input is its reference pinned to the commit it resolved to
(``hf:org/name@<sha>``); a local input is its path relative to the recipe file's
directory, however it was given (from the working directory, or absolute), so a
recipe checked in beside its inputs records the same text on every machine;
with no recipe file (``-e``, API text without ``filename=``) a path is recorded
as it was given; anything else (a state dict, a module) is its label.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tvlang.io import TensorReader

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["location", "recipe_dir", "relative"]


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
