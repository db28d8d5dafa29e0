"""Time the operator kernels against plain task arithmetic on large random tensors.

    python benchmarks/bench_ops.py [--numel 16777216] [--tensors 3] [--repeats 5]

Each kernel runs over ``--tensors`` different tensor names (one random tensor
per input and name); the time is the best of ``--repeats`` rounds that
interleave all the cases. Ratios are against the plain ``a + 0.4*b`` (the
brief's baseline) and against plain three-vector task arithmetic
``0.4*a + 0.4*b + 0.4*c``, both written with fresh temporaries as a user would.
"""

from __future__ import annotations

import argparse
import time

import torch

from tvlang.ops.context import TensorContext
from tvlang.ops.registry import KERNELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--tensors", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.weight" for i in range(args.tensors)]
    data = {n: [torch.randn(args.numel, generator=g) for _ in range(3)] for n in names}

    def once(fn) -> float:
        start = time.perf_counter()
        for n in names:
            fn(n)
        return time.perf_counter() - start

    def kernel(name, count, **options):
        k = KERNELS[name]
        return lambda n: k(data[n][:count], TensorContext(n), **options)

    buffer = torch.empty(args.numel)
    cases = {
        "a + 0.4*b (baseline)": lambda n: data[n][0] + 0.4 * data[n][1],
        "a + 0.4*b into a buffer (no allocation)": lambda n: torch.add(data[n][0], data[n][1], alpha=0.4, out=buffer),
        "0.4*(a+b+c) (3-vector TA)": lambda n: 0.4 * data[n][0] + 0.4 * data[n][1] + 0.4 * data[n][2],
        "ties 3 inputs, density 0.2": kernel("ties", 3, density=0.2),
        "ties 3 inputs, density 0.2, frequency": kernel("ties", 3, density=0.2, elect="frequency"),
        "topk density 0.2": kernel("topk", 1, density=0.2),
        "dare p=0.9": kernel("dare", 1, p=0.9),
        "dare_ties 3 inputs, p=0.9": kernel("dare_ties", 3, p=0.9),
        "breadcrumbs density 0.9 gamma 0.01": kernel("breadcrumbs", 1, density=0.9, gamma=0.01),
        "slerp t=0.3": kernel("slerp", 2, t=0.3),
        "random_like": kernel("random_like", 1),
        "mean of 3": kernel("mean", 3),
    }
    if args.numel <= 1 << 22:  # argsort per row: slow by nature
        cases["della 2 inputs density 0.5"] = kernel("della", 2, density=0.5, epsilon=0.1)

    for fn in cases.values():
        fn(names[0])  # warm-up (scratch buffers, lazy imports)
    # Rounds interleave the cases so that a burst of load on a shared machine hits
    # them all alike; the minimum over rounds is the least disturbed run.
    rounds: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(args.repeats):
        for label, fn in cases.items():
            rounds[label].append(once(fn))
    times = {label: min(values) for label, values in rounds.items()}
    base = times["a + 0.4*b (baseline)"]
    ta3 = times["0.4*(a+b+c) (3-vector TA)"]
    print(f"{args.tensors} tensors of {args.numel:,} float32 entries, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats} interleaved rounds")
    floor = times["a + 0.4*b into a buffer (no allocation)"]
    print(f"{'kernel':42s} {'ms':>8s} {'x a+0.4b':>9s} {'x 3-TA':>7s} {'x buffer':>9s}")
    for label, seconds in times.items():
        print(f"{label:42s} {seconds * 1e3:8.1f} {seconds / base:9.2f} {seconds / ta3:7.2f} {seconds / floor:9.2f}")


if __name__ == "__main__":
    main()
