"""Rows of the geometric merges beyond slerp: several-model spherical and Riemannian means,
and interpolations by similarity.

(Empty until the family lands; registered by :mod:`tvlang.language.builtins`.)
"""

from __future__ import annotations

from tvlang.language.rows import Builtin

__all__ = ["GEOMETRY"]

GEOMETRY: tuple[Builtin, ...] = ()
