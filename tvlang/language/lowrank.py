"""Rows of the low-rank family: LoRA adapters as sources, low-rank task vectors.

(Empty until the family lands; registered by :mod:`tvlang.language.builtins`.)
"""

from __future__ import annotations

from tvlang.language.rows import Builtin

__all__ = ["LOWRANK"]

LOWRANK: tuple[Builtin, ...] = ()
