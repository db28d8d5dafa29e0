"""Run a command in a fresh process and measure its wall time and memory.

Memory is sampled from ``/proc/PID`` by a polling thread of the parent (every
``interval`` seconds), and the kernel's own peak RSS comes from ``wait4``:

- ``peak_rss``: the kernel's high-water mark of resident memory (``ru_maxrss``).
  It counts file pages a process maps (an ``mmap``-ed checkpoint in the page
  cache), so it grows with what is mapped, not only with what is allocated.
- ``peak_anon``: the largest ``RssAnon`` (``/proc/PID/status``) seen (sampled every 50 ms): anonymous
  memory, the heap and the tensors the process computed or copied. This is the
  memory the process really takes from the machine.
- ``peak_pss_anon``: the largest ``Pss_Anon`` (``/proc/PID/smaps_rollup``, read
  every ``10 * interval``: walking the page tables of a process that maps whole
  checkpoints is expensive).
- ``peak_private``: the largest ``Private_Clean + Private_Dirty``
  (``smaps_rollup``): anonymous memory plus file pages mapped by this process
  alone (clean page-cache pages of a mapped file count here although the
  kernel can drop them at any time).

Linux only (``/proc``); elsewhere the sampled numbers are 0.

>>> r = measure(["python3", "-c", "x = bytearray(50 * 2**20)"])
>>> r.rc, r.wall > 0, r.peak_rss >= 50 * 2**20
(0, True, True)
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["Result", "cached_models", "machine", "measure", "median_result", "fmt_bytes"]


@dataclass
class Result:
    cmd: list[str]
    rc: int
    wall: float
    peak_rss: int
    peak_anon: int
    peak_pss_anon: int
    peak_private: int
    stderr: str = ""
    samples: int = 0
    extra: dict = field(default_factory=dict)


def _read_kb(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    found = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                name = key.decode()
                if name in keys:
                    found[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.stop = threading.Event()
        self.anon = self.pss_anon = self.private = 0
        self.samples = 0

    def run(self) -> None:
        status = f"/proc/{self.pid}/status"
        rollup = f"/proc/{self.pid}/smaps_rollup"
        tick = 0
        while not self.stop.is_set():
            st = _read_kb(status, ("RssAnon",))
            # smaps_rollup walks every page table of the process: for one that maps whole
            # checkpoints it costs the parent (and the machine) real CPU, so read it 10x
            # less often than the cheap status line.
            ro = _read_kb(rollup, ("Pss_Anon", "Private_Clean", "Private_Dirty")) if tick % 10 == 0 else {}
            tick += 1
            if st or ro:
                self.samples += 1
                self.anon = max(self.anon, st.get("RssAnon", 0))
                self.pss_anon = max(self.pss_anon, ro.get("Pss_Anon", 0))
                self.private = max(self.private, ro.get("Private_Clean", 0) + ro.get("Private_Dirty", 0))
            self.stop.wait(self.interval)


def measure(cmd: list[str], *, env: dict | None = None, interval: float = 0.05, cwd: str | None = None,
            timeout: float | None = None) -> Result:
    """Run ``cmd`` (stdout discarded, stderr kept) and measure it.

    The file systems are synced first, untimed, so that a run does not pay for writing
    back an earlier run's output: mergekit, ``naive`` and ``ideal`` leave theirs in the
    page cache, and the disk would write it while the next contender writes its own.
    """
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    sampler = _Sampler(proc.pid, interval)
    sampler.start()
    err_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    deadline = None if timeout is None else started + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
        time.sleep(0.01)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop.set()
    sampler.join()
    reader.join()
    return Result(list(cmd), proc.returncode, wall, usage.ru_maxrss * 1024, sampler.anon, sampler.pss_anon,
                  sampler.private, b"".join(err_chunks).decode(errors="replace"), sampler.samples)


def median_result(results: list[Result]) -> Result:
    """The run with the median wall time, with every memory figure the max over runs."""
    ordered = sorted(results, key=lambda r: r.wall)
    mid = ordered[(len(ordered) - 1) // 2]
    return Result(mid.cmd, max(r.rc for r in results), statistics.median(r.wall for r in results),
                  max(r.peak_rss for r in results), max(r.peak_anon for r in results),
                  max(r.peak_pss_anon for r in results), max(r.peak_private for r in results),
                  mid.stderr, sum(r.samples for r in results), {"walls": [r.wall for r in results]})


def by_round(walls: list[float], reference: list[float]) -> str:
    """The ratios of ``walls`` to ``reference``'s round by round (the contenders of a round run one
    after the other), as ``median M (r1, r2, ...)``: a slow spell of the machine moves that median
    less than the ratio of the two medians. Empty where the two did not run the same rounds.

    >>> by_round([2.0, 3.0, 2.2], [1.0, 2.0, 1.0])
    'median 2.00 (2.00, 1.50, 2.20)'
    >>> by_round([2.0], [1.0, 2.0])
    ''
    """
    if not walls or len(walls) != len(reference):
        return ""
    ratios = [w / r for w, r in zip(walls, reference)]
    return f"median {statistics.median(ratios):.2f} ({', '.join(f'{q:.2f}' for q in ratios)})"


def machine() -> str:
    """This machine as a benchmark's first line names it: cores, the processor's model name (Linux's
    ``/proc/cpuinfo``), memory, and one core's speed at numpy's PCG64 (millions of 64-bit outputs a
    second, the best of five draws of 2**20). That speed bounds the operators that draw randomness
    (``dare``, ``della``, ``random_like``: PCG64's 128-bit multiplies), and it tells two machines with
    the same model name apart (a virtual machine's share of a core): the ratios to plain task
    arithmetic, which mostly reads and writes, move with it.

    >>> machine().split(" cores")[0] == str(os.cpu_count())
    True
    """
    import numpy

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    bits = numpy.random.PCG64(0)
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        bits.random_raw(1 << 20)
        best = min(best, time.perf_counter() - started)
    return (f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB; one core draws "
            f"{(1 << 20) / best / 1e6:.0f} M PCG64 outputs/s")


def fmt_bytes(n: float) -> str:
    """Bytes for a table.

    >>> fmt_bytes(3 * 2**30), fmt_bytes(5 * 2**20)
    ('3.00 GiB', '5 MiB')
    """
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"


def cached_models(folder: str, writers: Mapping[str, Callable[[str], None]]) -> dict[str, str]:
    """``folder/NAME`` for each name of ``writers``, written by ``writers[NAME](path)`` the first
    time and reused while the folder's ``complete`` stamp is there (a folder a killed run left
    half written has no stamp, and is written again)."""
    paths = {name: os.path.join(folder, name) for name in writers}
    stamp = os.path.join(folder, "complete")
    if os.path.exists(stamp):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for name, write in writers.items():
        started = time.perf_counter()
        write(paths[name])
        print(f"  made {paths[name]} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    open(stamp, "w").close()
    return paths
