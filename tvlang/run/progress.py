"""The progress line on stderr: tensors and bytes done, throughput and ETA."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

__all__ = ["Progress", "progress_for"]


class Progress:
    """tensors and bytes done, throughput and ETA on one stderr line."""

    def __init__(self, total_tensors: int, total_bytes: int, passes: int) -> None:
        self.total = total_tensors * passes
        self.total_bytes = total_bytes
        self.done = 0
        self.bytes = 0
        self.started = time.perf_counter()
        self.last = 0.0
        self.lock = threading.Lock()

    def advance(self, name: str, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self.last < 0.1 and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.started
        rate = self.bytes / elapsed / 2**20 if elapsed > 0 else 0.0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} tensors, {self.bytes / 2**20:.0f} MiB, "
                         f"{rate:.0f} MiB/s, ETA {eta:.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * 79 + "\r")
        sys.stderr.flush()


def progress_for(progress: Any, session, outputs: int) -> Progress | None:
    """A progress line for ``session``'s passes over ``outputs`` outputs, when asked for and stderr is a terminal."""
    if not progress:
        return None
    if progress is True and not sys.stderr.isatty():
        return None
    names = session._order()
    total_bytes = sum(session.layout.infos[n].nbytes for n in names) * outputs
    return Progress(len(names), total_bytes, session.plan.schedule.passes)
