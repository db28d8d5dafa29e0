"""The operator tables the evaluator reads: views derived from the rows.

Every row of :data:`tvlang.language.builtins.BUILTINS` names its kernel and chunk form as
``"module:attr"``; the views below resolve those names on first use and follow the rows
as they are registered (a test's or a plugin's operator shows up in every view). No table
here is written by hand, and this module imports no torch. (A row's whole-model
``reductions`` and a ``reduce`` built-in's Reducer are read from the row by the planner.)

- ``KERNELS[name]`` is the kernel of a tensor built-in:
  ``kernel(inputs: list[Tensor], ctx: TensorContext, **options) -> Tensor``.
  ``inputs`` are the vector arguments in argument order (for a variadic built-in: the
  fixed vector parameters, then the variadic ones); ``options`` are all the other
  arguments by name, defaults filled in (scalars as floats, strings, bools, lists of
  floats as tuples or lists).
- ``CHUNKED[name](ctx, numel, n_inputs, dtype, **options)`` is the chunk form of a kernel
  the evaluator may run chunk by chunk inside its chunked programs (the result is the
  same as one call on the whole tensor): a chunk kernel, or ``None`` when these options
  need the whole tensor. A chunk kernel has ``passes`` (int),
  ``observe(pass_index, pieces)`` and ``end_pass(pass_index)`` (passes over consecutive
  pieces of its flattened inputs, in order, before any result: a per-tensor threshold),
  ``restart()`` (called before each pass in which it makes results) and
  ``apply(pieces, out_piece)`` (the results, pieces in order).
- ``ELEMENTWISE``: kernels whose result at an entry depends on that entry of the inputs
  and on the tensor's name only: the kernel itself is called on each piece.
- ``MULTIPASS``: chunk forms that ask for passes over their whole input before the first
  result with most options (``ties`` at density 1 asks for none; ``dare`` asks with
  ``rescale_by="l1"`` only and is not listed): what the evaluator reads is each chunk
  kernel's ``passes``, with the options given.

>>> "ties" in CHUNKED, "ties" in MULTIPASS, "select" in ELEMENTWISE, "lowrank" in CHUNKED
(True, True, True, False)
>>> KERNELS["ties"].__name__, sorted(MULTIPASS)[:6]
('ties', ['arcee_fusion', 'breadcrumbs', 'karcher', 'model_stock', 'multislerp', 'nuslerp'])
>>> sorted(MULTIPASS)[6:]
['ramplus_tl', 'random_like', 'sce', 'slerp', 'ties', 'topk']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Set
from typing import Any

from tvlang.language.builtins import BUILTINS, Builtin, resolve

__all__ = ["KERNELS", "CHUNKED", "ELEMENTWISE", "MULTIPASS"]


class _Rows:
    """The rows that ``has(row)`` picks, by name, as they are now in ``BUILTINS``."""

    def __init__(self, has: Callable[[Builtin], bool]) -> None:
        self._has = has

    def _row(self, name: object) -> Builtin | None:
        row = BUILTINS.get(name) if isinstance(name, str) else None
        return row if row is not None and self._has(row) else None

    def __contains__(self, name: object) -> bool:
        return self._row(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, row in BUILTINS.items() if self._has(row)])

    def __len__(self) -> int:
        return sum(1 for row in BUILTINS.values() if self._has(row))


class _Names(_Rows, Set):
    """A set of row names (``name in ELEMENTWISE``)."""

    def __repr__(self) -> str:
        return f"{{{', '.join(map(repr, self))}}}"


class _Resolved(_Rows, Mapping):
    """A read-only mapping of row name -> the object its reference ``field`` names."""

    def __init__(self, has: Callable[[Builtin], bool], field: str) -> None:
        super().__init__(has)
        self._field = field

    def __getitem__(self, name: str) -> Any:
        row = self._row(name)
        if row is None:
            raise KeyError(name)
        return resolve(getattr(row, self._field))


KERNELS: Mapping[str, Callable[..., Any]] = _Resolved(lambda row: row.stage == "tensor", "kernel")
CHUNKED: Mapping[str, Callable[..., Any]] = _Resolved(lambda row: row.chunk_form is not None, "chunk_form")
ELEMENTWISE: Set[str] = _Names(lambda row: row.elementwise)
MULTIPASS: Set[str] = _Names(lambda row: row.multipass)
