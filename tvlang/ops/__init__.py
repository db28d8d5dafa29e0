"""Tensor kernels and whole-model reducers; the rows live in :mod:`tvlang.ops.registry`.

Importing this package registers the operator rows in ``tvlang.language.builtins.BUILTINS``
(without importing torch).
"""

from tvlang.ops import registry  # noqa: F401  (registers the rows)

__all__ = ["registry"]
