"""Time the helper's MAGPRUNE (``della``'s sampling of rows) and its PCG64 words, one core.

    python benchmarks/bench_magprune.py [--lib PATH ...] [--rounds 40]

``tv_magprune_f32`` over blocks of whole rows (about 32,768 entries, the executors' row blocks) of
1,824 and 4,864 entries (the rows of the benchmarks' Llama-shaped checkpoints), Gaussian entries
of a task vector's size, ``density`` 0.2 and ``epsilon`` 0.1 with probability rescaling (the
``tvlang-della`` recipe of bench_merge.py); and ``tv_pcg64_words`` in pieces of 2**16 words. Each
library (the checkout's helper, then every ``--lib``: another build of tvlang/ops/native.c, such
as a baseline's) runs in turn, round after round, so they share the machine's state; each line
gives the best of ``--rounds`` rounds in ns an entry (or a word) and its ratio to the first
library's. Every library must give the same outputs (a checksum of the first blocks; a
difference stops the benchmark).
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy

from tvlang.ops import native

ROWS = (1824, 4864)
BLOCK = 1 << 15
BLOCKS = 40


def bind(path: str | None) -> ctypes.CDLL:
    lib = native.library() if path is None else ctypes.CDLL(path)
    if lib is None:
        raise SystemExit("the helper is not built: python -m pip install -e . builds it")
    p, n, f, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_float, ctypes.c_int
    lib.tv_magprune_f32.argtypes = [p, ctypes.c_uint64, p, n, n, f, f, i, p, p, p]
    lib.tv_magprune_f32.restype = None
    lib.tv_pcg64_words.argtypes = [p, n, p]
    lib.tv_pcg64_words.restype = None
    return lib


def magprune(lib, m: int, blocks: list, out: numpy.ndarray) -> tuple[float, float]:
    """Seconds for every block once, and a checksum of the first five blocks' outputs."""
    rows = blocks[0].size // m
    c, d = numpy.float32(0.2 / (m - 1)), numpy.float32(0.1)
    scratch = numpy.empty(5 * m + 32, dtype=numpy.uint64)
    st = numpy.array([1, 2, 3, 5, 0, 0], dtype=numpy.uint64)
    check = 0.0
    start = time.perf_counter()
    for k, block in enumerate(blocks):
        lib.tv_magprune_f32(st.ctypes.data, 0, block.ctypes.data, rows, m, c, d, 1, scratch.ctypes.data,
                            out.ctypes.data, None)
        if k < 5:
            check += float(out.view(numpy.uint32).astype(numpy.uint64).sum())
    return time.perf_counter() - start, check


def words(lib, out: numpy.ndarray) -> tuple[float, int]:
    st = numpy.array([1, 2, 3, 5, 0, 0], dtype=numpy.uint64)
    start = time.perf_counter()
    for _ in range(100):
        lib.tv_pcg64_words(st.ctypes.data, out.size, out.ctypes.data)
    return time.perf_counter() - start, int(out.astype(numpy.uint64).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", action="append", default=[], help="another build of the helper (repeatable)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    names = ["checkout", *args.lib]
    libs = [bind(None), *[bind(path) for path in args.lib]]
    rng = numpy.random.default_rng(0)
    cases = {}
    for m in ROWS:
        rows = max(1, BLOCK // m)
        cases[m] = [(0.01 * rng.standard_normal(rows * m)).astype(numpy.float32) for _ in range(BLOCKS)]
    best = {(name, what): float("inf") for name in names for what in (*ROWS, "words")}
    checks: dict = {}
    word_out = numpy.empty(1 << 16, dtype=numpy.uint32)
    for _ in range(args.rounds):
        for name, lib in zip(names, libs):
            for m, blocks in cases.items():
                seconds, check = magprune(lib, m, blocks, numpy.empty(blocks[0].size, dtype=numpy.float32))
                best[name, m] = min(best[name, m], seconds / (len(blocks) * blocks[0].size) * 1e9)
                if checks.setdefault(m, check) != check:
                    raise SystemExit(f"{name}: MAGPRUNE's outputs differ from the first library's (rows of {m})")
            seconds, check = words(lib, word_out)
            best[name, "words"] = min(best[name, "words"], seconds / (100 * word_out.size) * 1e9)
            if checks.setdefault("words", check) != check:
                raise SystemExit(f"{name}: the words differ from the first library's")
    print("| library | " + " | ".join(f"MAGPRUNE, rows of {m} (ns an entry)" for m in ROWS)
          + " | words (ns a word) |")
    print("|---|" + "---|" * (len(ROWS) + 1))
    for name in names:
        cells = [f"{best[name, what]:.3f} ({best[name, what] / best[names[0], what]:.2f})"
                 for what in (*ROWS, "words")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
