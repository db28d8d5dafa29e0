"""Ctrl-C and SIGTERM end a command the same way: cleanup runs, one line, exit 1.

By default SIGTERM kills Python at once (the run's temporaries stay behind) and a second
Ctrl-C arriving while the first one's cleanup runs escapes as a traceback with exit 130.
While a command runs, :func:`interrupts_raise` makes the first SIGINT or SIGTERM raise
:class:`Interrupted` (a ``KeyboardInterrupt``, so every cleanup that handles Ctrl-C
handles both) and ignores the ones that follow, so the cleanup it started (removing
temporaries, withdrawing outputs already renamed) finishes. Nothing is done outside the
main thread (signals are only delivered there) or for the REPL, which reads Ctrl-C as
"cancel this line".

>>> import signal
>>> with interrupts_raise():
...     try:
...         signal.raise_signal(signal.SIGTERM)
...     except Interrupted as exc:
...         print(exc.reason)
terminated (SIGTERM)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "interrupts_raise"]

_REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While the block runs: the first SIGINT/SIGTERM raises :class:`Interrupted`, later ones are ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if fired:
            return  # the first signal's cleanup is running: let it finish
        fired = True
        raise Interrupted(_REASONS.get(signum, f"stopped by signal {signum}"))

    previous = {signum: signal.signal(signum, handler) for signum in _REASONS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
