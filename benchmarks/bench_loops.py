"""Time the helper's loops that run a chain of DARE or breadcrumbs calls over one chunk.

    python benchmarks/bench_loops.py [--chunk 262144] [--inputs 3] [--repeats 7]

The main pass of ``pre + dare(a - pre) + dare(b - pre) + dare(c - pre)`` (or the same with
``breadcrumbs``) computes each chunk of a tensor with the helper (tvlang/ops/native.c). Three
ways, on one core, over chunks of ``--chunk`` float32 entries (1 MiB by default, the direct
executor's chunk) that stay in the cache as a real pass's do not, so the loops' arithmetic and
cache traffic and not the page cache are timed:

- ``ideal``: plain task arithmetic's loop over the same inputs (``tv_linear_run_f32``: ``pre +
  0.4*(a - pre) + ...`` folded to ``(1 - 0.4k)*pre + 0.4*a + ...``, one read of each input, one
  write), the bound for any loop that reads them all;
- ``one by one``: each call in its own fused loop with its ``axpy`` and its taker
  (``tv_fused_merge_f32`` with one input, as before the chains): the result read and written once
  a call;
- ``chain``: the calls in one loop (``tv_drop_chain_f32``, tvlang.run.direct's ``_drop_chains``).

For keep bits (DARE with ``p`` 0.9, bits drawn beforehand) and for a band (breadcrumbs' trim),
the best and the median of ``--repeats`` rounds of 50 chunks, and the ratios to ``ideal`` and of
``chain`` to ``one by one``.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy

from tvlang.ops import native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=1 << 18)
    parser.add_argument("--inputs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    lib = native.linear_steps()
    if lib is None:
        raise SystemExit("the helper is not built: python -m pip install -e . builds it")
    n, k = args.chunk, args.inputs
    rng = numpy.random.default_rng(0)
    pre = rng.standard_normal(n).astype(numpy.float32)
    fine = [pre + 0.01 * rng.standard_normal(n).astype(numpy.float32) for _ in range(k)]
    packed = [numpy.packbits(rng.random(n + 8) < 0.1) for _ in range(k)]
    out = numpy.empty(n, numpy.float32)
    scales = (ctypes.c_float * k)(*[10.0] * k)
    ones = (ctypes.c_float * k)(*[1.0] * k)

    def fields(form: int, low: float, high: float, which) -> ctypes.Array:
        made = (native.FusedInput * len(which))()
        for one, i in zip(made, which):
            one.a, one.b, one.cb = fine[i].ctypes.data, pre.ctypes.data, -1.0
            one.form, one.lo, one.hi = form, low, high
            one.packed, one.offset, one.windows = packed[i].ctypes.data, 0, 0
        return made

    sources = (ctypes.c_void_p * k)(*(x.ctypes.data for x in fine))
    coefs = (ctypes.c_float * k)(*[0.4] * k)

    def ideal(form, low, high) -> None:  # pre*(1 - 0.4k) + 0.4*a + ...: the folded recipe's loop
        lib.tv_linear_run_f32(pre.ctypes.data, 1.0 - 0.4 * k, 0, sources, coefs, k, n, out.ctypes.data)

    def one_by_one(form, low, high) -> None:
        base = pre
        for i in range(k):
            lib.tv_fused_merge_f32(fields(form, low, high, [i]), 1, n, 10.0, 0, 0, base.ctypes.data, 1.0, 1.0,
                                   out.ctypes.data)
            base = out

    def chain(form, low, high) -> None:
        lib.tv_drop_chain_f32(fields(form, low, high, range(k)), scales, ones, k, n, pre.ctypes.data, 1.0,
                              out.ctypes.data)

    ways = {"ideal": ideal, "one by one": one_by_one, "chain": chain}
    print(f"{k} inputs, chunks of {n} float32 entries ({4 * n / 2**20:.2f} MiB), 50 chunks a round")
    for label, form, low, high in (("keep bits (dare)", 1, 0.0, 0.0), ("band (breadcrumbs)", 3, 0.01, 0.02)):
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, fn in ways.items():  # interleaved
                start = time.perf_counter()
                for _ in range(50):
                    fn(form, low, high)
                times[way].append((time.perf_counter() - start) / 50 * 1e3)
        best = {way: min(t) for way, t in times.items()}
        median = {way: statistics.median(t) for way, t in times.items()}
        for way in ways:
            print(f"  {label:20s} {way:11s} best {best[way]:.3f} ms, median {median[way]:.3f} ms"
                  f" ({median[way] / median['ideal']:.2f}x ideal)")
        print(f"  {label:20s} chain / one by one: best {best['chain'] / best['one by one']:.2f},"
              f" median {median['chain'] / median['one by one']:.2f}")


if __name__ == "__main__":
    main()
