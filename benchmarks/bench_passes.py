"""Time each pass of the chunked interpreter over one large tensor: the passes a kernel makes
before the main one (``ties``' two threshold passes, ``slerp``'s sums) and the main pass.

    python benchmarks/bench_passes.py                                   # ties over a 200 MB tensor
    python benchmarks/bench_passes.py --recipe "pre + topk(a - pre, 0.2)" --threads 1 --repeat 3
    python benchmarks/bench_passes.py --src /tmp/tvlang-base            # another commit's tree

Uses the checkpoints of ``bench_pertensor.py`` (made there first if missing, under
``--workdir``) and runs the recipe in this process with ``Plan.run``, timing every call of
the interpreter's ``run_chunk`` by the pass it belongs to: wall seconds, and CPU seconds of
the process (``time.process_time``, all threads), which a loaded machine moves less than wall
time. ``--threads 1`` runs everything on one thread (the passes before the main one
otherwise use every core). Prints one line per run: total wall, then per pass wall/CPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="pre + ties(a - pre, b - pre, c - pre, density=0.2)")
    parser.add_argument("--size-mb", type=float, default=200.0, help="size of the large tensor (default 200)")
    parser.add_argument("--workdir", default="/tmp/tvlang-bench-pertensor", help="where checkpoints are cached")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs, after one untimed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every pass (0: tvlang's choice)")
    parser.add_argument("--src", default=None, help="the tvlang source tree to time (default: the installed one)")
    parser.add_argument("--out", default="/tmp/tvlang-bench-passes.safetensors", help="the output file")
    args = parser.parse_args(argv)
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    import torch
    from bench_pertensor import NAMES, make_checkpoints

    import tvlang
    from tvlang.run import chunked

    if args.threads:
        torch.set_num_threads(args.threads)
        os.cpu_count = lambda: args.threads  # the passes before the main one ask for every core
    paths = make_checkpoints(args.workdir, args.size_mb)
    wall: dict[str, float] = collections.defaultdict(float)
    cpu: dict[str, float] = collections.defaultdict(float)
    real = chunked.run_chunk

    def timed(*a, **k):
        key = f"pass {k.get('pass_index', 0) + 1}" if k.get("observing") else "main"
        started, used = time.perf_counter(), time.process_time()
        real(*a, **k)
        wall[key] += time.perf_counter() - started
        cpu[key] += time.process_time() - used

    chunked.run_chunk = timed
    binds = {n: paths[n] for n in NAMES if re.search(rf"\b{n}\b", args.recipe)}
    plan = tvlang.compile(args.recipe)
    print(f"{tvlang.__file__}: {args.recipe}, a tensor of {args.size_mb:g} MB, threads {args.threads or 'default'}")
    for index in range(args.repeat + 1):
        wall.clear()
        cpu.clear()
        started = time.perf_counter()
        plan.run(binds, args.out, force=True)
        total = time.perf_counter() - started
        passes = ", ".join(f"{key} {wall[key]:.2f} s wall / {cpu[key]:.2f} s CPU" for key in wall)
        print(f"{'warm-up' if index == 0 else f'run {index}'}: {total:.2f} s; {passes}", flush=True)
    os.remove(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
