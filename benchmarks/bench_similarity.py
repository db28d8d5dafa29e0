"""Benchmark: streaming similarity of 16 task vectors against a plain read of all files.

    python benchmarks/bench_similarity.py --size 20          # 16 x 20 MB
    python benchmarks/bench_similarity.py --size 100 --dir /tmp/tvbench

Writes a synthetic base and 16 fine-tuned checkpoints (float32 safetensors,
``--size`` MB each, several tensors, the biggest above one chunk), then times,
in this process:

- ``read``: one sequential read of every byte of the 17 files (1 MB blocks);
- ``similarity``: ``tvlang.bases.gram.similarity`` over the same files.

Each is timed warm (files in the page cache, after one untimed pass) and cold
(pages dropped with ``posix_fadvise(DONTNEED)`` first, which works without root
on clean pages; where it is not honoured the "cold" numbers are warm ones).
Prints the ratio similarity / read (target <= 1.5) and the peak anonymous
memory (RssAnon/VmHWM from /proc, sampled) of the similarity run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import threading
import time

import torch

N_TASKS = 16


def make_checkpoints(folder: str, size_mb: float) -> list[str]:
    """The base and N_TASKS fine-tuned files (tvlang.testing.synth, Llama-shaped, float32); reused when present."""
    from tvlang.testing.synth import llama_spec_for_bytes, write_synthetic

    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, "base.safetensors")] + [
        os.path.join(folder, f"ft_{i:02d}.safetensors") for i in range(N_TASKS)
    ]
    stamp = os.path.join(folder, f"size-{size_mb}")
    if os.path.exists(stamp) and all(os.path.exists(p) for p in paths):
        return paths
    spec = llama_spec_for_bytes(int(size_mb * 2**20), layers=4)
    write_synthetic(paths[0], spec, seed=0, force=True)
    for i in range(N_TASKS):
        write_synthetic(paths[i + 1], spec, seed=i + 1, finetune_of=0, scale=0.01, force=True)
    open(stamp, "w").close()
    return paths


def drop_cache(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(paths: list[str]) -> int:
    buf = bytearray(2**20)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return total


class AnonPeak:
    """Samples RssAnon (anonymous resident memory, file pages excluded) every 5 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def __enter__(self) -> "AnonPeak":
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=100.0, help="MB per checkpoint (default 100)")
    parser.add_argument("--dir", default="/tmp/tvlang-bench-similarity", help="where the checkpoints go")
    parser.add_argument("--dtype", default=None, choices=["float32", "float64"],
                        help="dtype of the chunk products (default: float32 for float32 inputs);"
                             " the Gram is accumulated in float64")
    parser.add_argument("--repeat", type=int, default=3, help="warm runs; the best is reported")
    parser.add_argument("--tasks", type=int, default=N_TASKS,
                        help=f"use the first TASKS task vectors (default {N_TASKS}; memory should not grow with it)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args(argv)

    from tvlang.bases.gram import DEFAULT_CHUNK_BYTES, similarity

    paths = make_checkpoints(args.dir, args.size)[: args.tasks + 1]
    nbytes = sum(os.path.getsize(p) for p in paths)
    inputs = {f"t{i:02d}": p for i, p in enumerate(paths[1:])}
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"{args.tasks} task vectors + base, {args.size:g} MB each, {nbytes / 2**20:.0f} MB in all;"
          f" chunk budget {DEFAULT_CHUNK_BYTES // 2**20} MB, products in {args.dtype or 'float32'},"
          f" torch threads {torch.get_num_threads()}")

    def run_similarity():
        return similarity(inputs, base=paths[0], dtype=dtype)

    results = {}
    idle = AnonPeak.now()
    print(f"RssAnon before: {idle / 2**20:.0f} MB (torch, numpy and the interpreter)")
    for label, prepare in (("cold", lambda: drop_cache(paths)), ("warm", lambda: None)):
        if label == "warm":
            sequential_read(paths)  # make sure everything is cached
        best_read = best_sim = float("inf")
        for _ in range(1 if label == "cold" else args.repeat):
            prepare()
            t0 = time.perf_counter()
            sequential_read(paths)
            best_read = min(best_read, time.perf_counter() - t0)
            prepare()
            t0 = time.perf_counter()
            with AnonPeak() as peak:
                sim = run_similarity()
            best_sim = min(best_sim, time.perf_counter() - t0)
        results[label] = (best_read, best_sim, peak.peak)
        print(f"{label:>5}: read {best_read:7.3f} s ({nbytes / 2**20 / best_read:7.0f} MB/s)   "
              f"similarity {best_sim:7.3f} s   ratio {best_sim / best_read:5.2f}   "
              f"peak RssAnon {peak.peak / 2**20:6.0f} MB (+{(peak.peak - idle) / 2**20:.0f})")
    print(f"process max RSS (ru_maxrss, includes file pages mapped while writing the checkpoints): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"cosine[0, 1..3] = {[round(float(x), 4) for x in sim.cosine[0, 1:4]]}")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
