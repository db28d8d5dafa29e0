"""Ctrl-C and SIGTERM end a command the same way: cleanup runs, one line, exit 130 or 143.

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
import sys
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "interrupts_raise"]

_REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}
#: The exit status of a command a signal stopped: 128 + the signal's number, as shells report it.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; ``reason`` says which, ``exit_code`` what to exit with."""

    def __init__(self, reason: str, exit_code: int = 130) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


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
        raise Interrupted(_REASONS.get(signum, f"stopped by signal {signum}"), EXIT_CODES.get(signum, 128 + signum))

    # An exception raised while the garbage collector finalizes an object (a generator closed
    # because nothing refers to it any more) is printed and dropped by Python: an Interrupted
    # raised there is lost. The next signal must then work: the handler is re-armed, and the
    # traceback Python would print is not shown. (The run closes its own generators itself, so
    # that a signal landing there propagates: tvlang.run.session.)
    previous_hook = sys.unraisablehook

    def unraisable(info) -> None:
        nonlocal fired
        if isinstance(info.exc_value, Interrupted):
            fired = False
            return
        previous_hook(info)

    previous = {signum: signal.signal(signum, handler) for signum in _REASONS}
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for signum, old in previous.items():
            signal.signal(signum, old)
