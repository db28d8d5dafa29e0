"""Recursive walks without a deep Python stack: the walk is written as generators.

A recipe can be as deep as it is long (``t1 = 0.5*t0``, ``t2 = 0.5*t1``, ... over
100,000 lines, or a sum of 20,000 terms), so no stage may recurse once per level.
A function that would call itself is written as a generator that *yields* the
sub-call whose result it needs and receives that result back; :func:`trampoline`
runs the frames on an explicit stack. The code keeps the shape of the recursion,
so the order in which it does things (nodes made, errors reported) is the same.

>>> def depth(n):
...     if n == 0:
...         return 0
...     return 1 + (yield depth(n - 1))
>>> trampoline(depth(100_000))
100000

An exception raised in a frame reaches its caller's frame at the ``yield``, as it
would reach the caller of a function, and leaves :func:`trampoline` when no frame
catches it.
"""

from __future__ import annotations

from typing import Any, Generator

__all__ = ["Frame", "trampoline"]

#: A frame yields the frames of its sub-calls and returns its result.
Frame = Generator["Frame", Any, Any]


def trampoline(frame: Frame) -> Any:
    """The result of ``frame``, running every sub-call it yields on an explicit stack."""
    stack = [frame]
    value: Any = None
    error: BaseException | None = None
    while True:
        top = stack[-1]
        try:
            call = top.send(value) if error is None else top.throw(error)
        except StopIteration as returned:
            stack.pop()
            if not stack:
                return returned.value
            value, error = returned.value, None
            continue
        except BaseException as raised:
            stack.pop()
            if not stack:
                raise
            value, error = None, raised
            continue
        stack.append(call)
        value, error = None, None
