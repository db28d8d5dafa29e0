"""Progress of a run, one bar per streaming pass, counting bytes: tqdm, or a callback.

``progress=True`` draws a tqdm bar on stderr when stderr is a terminal (``tqdm.auto``:
a widget in a notebook), one per pass, named after the pass ("pass 1 of 2: norm",
"main pass") and counting the bytes of the tensors the pass reads. ``progress=`` a
callable gets a ``ProgressEvent`` after each tensor of each pass instead, and draws
nothing. On Ray, a pass's "tensors" are its tasks, and its bytes move while they run
(``show``). Without tqdm installed (``pip install tvlang[progress]``) ``True`` draws
nothing; the summary line still comes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Progress", "ProgressEvent", "TensorBar", "progress_for", "tensor_bar"]


@dataclass(frozen=True)
class ProgressEvent:
    """Where a run is: the pass, the tensor just done, and the counts of the pass."""

    label: str  # "pass 1 of 2: norm" or "main pass"
    tensor: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


class Progress:
    """One pass at a time: ``start`` it, ``advance`` per tensor, ``close`` at the end (or on Ctrl-C)."""

    def __init__(self, callback: Callable[[ProgressEvent], Any] | None = None, bar_factory=None) -> None:
        self.callback = callback
        self.bar_factory = bar_factory
        self.bar = None
        self.label = ""
        self.tensors_total = self.bytes_total = self.tensors_done = self.bytes_done = 0

    def start(self, label: str, tensors: int, nbytes: int) -> None:
        self._close_bar()
        self.label, self.tensors_total, self.bytes_total = label, tensors, nbytes
        self.tensors_done = self.bytes_done = 0
        if self.bar_factory is not None:
            self.bar = self.bar_factory(label, nbytes)

    def advance(self, name: str, nbytes: int) -> None:
        self.tensors_done += 1
        self.bytes_done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        if self.callback is not None:
            self.callback(ProgressEvent(self.label, name, self.tensors_done, self.tensors_total,
                                        self.bytes_done, self.bytes_total))

    def show(self, name: str, bytes_done: int, tensors_done: int) -> None:
        """Where a pass run by tasks elsewhere is (the Ray executor): the tasks finished and the bytes
        done so far, running tasks' included. Bytes never go back (a retried task starts again)."""
        nbytes = max(bytes_done, self.bytes_done)
        if self.bar is not None and nbytes > self.bytes_done:
            self.bar.update(nbytes - self.bytes_done)
        self.bytes_done, self.tensors_done = nbytes, tensors_done
        if self.callback is not None:
            self.callback(ProgressEvent(self.label, name, self.tensors_done, self.tensors_total,
                                        self.bytes_done, self.bytes_total))

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def _tqdm_bar(label: str, nbytes: int):
    from tqdm.auto import tqdm

    return tqdm(total=nbytes, desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def progress_for(progress: Any) -> Progress | None:
    """The Progress that ``progress=`` asks for: None, a bar, or a callback's."""
    if not progress:
        return None
    if callable(progress):
        return Progress(callback=progress)
    if not sys.stderr.isatty():
        return None
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return None
    return Progress(bar_factory=_tqdm_bar)


class TensorBar:
    """A tqdm bar counting tensors, as a ``progress(name, index, total)`` callback (the similarity
    pass of ``tvlang similarity`` and ``tvlang bases``, local or on Ray); ``close()`` clears it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None

    def __call__(self, name: str, index: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="tensor", leave=False, file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.set_postfix_str(name[-40:], refresh=False)
        self.bar.update(index + 1 - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def tensor_bar(label: str) -> TensorBar | None:
    """A ``TensorBar`` when stderr is a terminal and tqdm is installed, else None (nothing drawn)."""
    if not sys.stderr.isatty():
        return None
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return None
    return TensorBar(label)
