"""The operator tables the planner and the evaluator read: views derived from the rows.

Every row of :data:`tvlang.language.builtins.BUILTINS` names its kernel, chunk form and
reducer as ``"module:attr"``; the views below resolve those names on first use and follow
the rows as they are registered (a test's or a plugin's operator shows up in every view).
No table here is written by hand. This module imports no torch.

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
- ``MULTIPASS``: chunk forms that may ask for passes over their whole input before the
  first result.
- ``REDUCERS[name]`` is a zero-argument factory of the Reducer of a ``reduce``-stage
  built-in (``norm``, ``dot``, ``cos``); it streams all the call's vector arguments, in
  order. Its ``result()`` is the scalar value.
- ``reductions_for(name, options, n_inputs)`` tells the planner which whole-model
  reductions a *tensor* built-in call needs before its kernel can run (the row's
  ``reductions``): a list of ``(key, factory, input_indices)``. The planner runs
  ``factory()`` over the listed inputs (evaluated arguments, by index into the kernel's
  ``inputs``) in ``reducer.passes`` streaming passes, and hands ``result()`` to the
  kernel as ``ctx.reduced[key]``. Per-tensor calls need nothing (``[]``).

Keys in ``ctx.reduced``: ``"threshold:<i>"`` is the global magnitude threshold of input
``i`` (``ties``/``topk`` with ``scope="model"``): the exact k-th largest ``|x|`` over
every tensor of that input, with ``k = keep_count(density, total number of entries)``;
the kernel keeps entries with ``|x| >= threshold``.

The Reducer protocol: ``passes`` (int), ``update(pass_index, tensors, ctx)`` once per
tensor name and pass, with ``tensors`` the streamed inputs of that tensor (a list, in
``input_indices`` order), ``end_pass(pass_index)`` after each pass, ``result()`` after
the last one.

>>> "ties" in CHUNKED, "ties" in MULTIPASS, "select" in ELEMENTWISE, "slerp" in CHUNKED
(True, True, True, False)
>>> reductions_for("ties", {"scope": "tensor"}, 2)
[]
>>> [key for key, _, _ in reductions_for("ties", {"scope": "model", "density": 0.1}, 2)]
['threshold:0', 'threshold:1']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Set
from typing import Any

from tvlang.language.builtins import BUILTINS, Builtin, Reduction, resolve

__all__ = ["KERNELS", "CHUNKED", "ELEMENTWISE", "MULTIPASS", "REDUCERS", "reductions_for", "resolve"]


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
REDUCERS: Mapping[str, Callable[[], Any]] = _Resolved(lambda row: row.stage == "reduce", "kernel")


def reductions_for(name: str, options: dict, n_inputs: int) -> list[tuple[str, Callable[[], Any], list[int]]]:
    """Whole-model reductions a call of tensor built-in ``name`` needs, or ``[]``.

    ``options`` are the call's resolved options (a missing one takes its default).
    Returns ``(key, factory, input_indices)`` triples; see the module docstring.
    """
    row = BUILTINS.get(name)
    if row is None or row.reductions is None:
        return []
    return [(r.key, _factory(r), list(r.inputs)) for r in row.reductions(row.complete(options), n_inputs)]


def _factory(reduction: Reduction) -> Callable[[], Any]:
    def make() -> Any:
        return resolve(reduction.reducer)(*reduction.args)

    return make
