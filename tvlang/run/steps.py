"""The numbers of each arithmetic step op, defined once for both interpreters.

``STEP_OPS`` (tvlang.plan.schedule) says what every op means; the ops marked
``arithmetic`` are computed here, by one function each: ``fn(dst, srcs, coef, out)``
returns the result, written into ``out`` when given (a chunk buffer, an output
piece, or ``dst`` itself to change it in place) and fresh memory otherwise.
The whole-tensor interpreter (``whole``) and the chunked one (``chunked``) call
the same functions; only where results live differs.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from tvlang.errors import TvlangError
from tvlang.ops.registry import KERNELS

__all__ = ["ARITHMETIC", "kernel", "numel", "tensor_error", "translated", "translated_call"]


def _set(dst, srcs, coef, out):
    # dst = coef * src
    if coef == 1.0:
        return srcs[0].clone() if out is None else out.copy_(srcs[0])
    return torch.mul(srcs[0], coef, out=out)


def _add(dst, srcs, coef, out):
    # dst = coef[0] * srcs[0] + coef[1] * srcs[1]
    first, second = coef
    if first == 1.0:
        return torch.add(srcs[0], srcs[1], alpha=second, out=out)
    return torch.mul(srcs[0], first, out=out).add_(srcs[1], alpha=second)


def _scale(dst, srcs, coef, out):
    # dst *= coef
    return torch.mul(dst, coef, out=out)


def _axpy(dst, srcs, coef, out):
    # dst += coef * src
    return torch.add(dst, srcs[0], alpha=coef, out=out)


ARITHMETIC: dict[str, Callable] = {"set": _set, "add": _add, "scale": _scale, "axpy": _axpy}


def kernel(name: str):
    """The whole-tensor kernel of operator ``name``."""
    return KERNELS[name]


def numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


# Errors of computing one tensor that are the recipe's or the data's, said with the
# tensor's name: TvlangError (a kernel refusing its options or data) and RuntimeError
# (torch refusing shapes, dtypes or memory). Anything else (a TypeError, an IndexError,
# a ValueError from tvlang's own code) is a bug in tvlang and keeps its traceback.
USER_ERRORS = (TvlangError, RuntimeError)


def tensor_error(name: str, exc: Exception) -> TvlangError:
    """A failure while computing tensor ``name`` as one TvlangError that names it."""
    if not isinstance(exc, TvlangError):
        return TvlangError(f"while computing tensor '{name}': {exc}", tensor=name)
    if exc.tensor is None:
        exc.tensor = name
        exc.message = f"tensor '{name}': {exc.message}"
        exc.args = (exc.message,)
    return exc


def translated_call(name: str, function, *args):
    """``function(*args)`` with its errors said as computing tensor ``name``."""
    try:
        return function(*args)
    except USER_ERRORS as exc:
        raise tensor_error(name, exc) from exc


def translated(name: str, chunks: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``chunks`` with the errors of computing tensor ``name`` said as computing it."""
    try:
        yield from chunks
    except USER_ERRORS as exc:
        raise tensor_error(name, exc) from exc
