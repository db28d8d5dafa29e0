"""Benchmark the Ray executor against the local one: the same recipe, the same bytes, the wall times.

    python benchmarks/bench_ray.py                          # three ~1.5 GB float32 models, 2 rounds
    python benchmarks/bench_ray.py --size-gb 0.1 --rounds 1 # a quick look

Makes (once, cached under ``--workdir``, default /tmp/tvlang-bench-ray) a synthetic
Llama-shaped float32 base ``pre`` and two "fine-tuned" copies ``a`` and ``b`` of about
``--size-gb`` GB each, then, in this one process (the driver; Ray's workers are its
raylet's children), starts a local Ray instance of 2 CPUs (timed) and runs each recipe
with three contenders:

- ``local``: ``plan.run(...)``, the local streaming executor;
- ``ray x1``: ``plan.run(..., executor="ray", workers=1)``;
- ``ray x2``: ``plan.run(..., executor="ray", workers=2)``;

all with ``--shard-size`` (default 250 MB: 6 shards at 1.5 GB, 6 tasks per pass). Every
contender runs once untimed first (the page cache warm, Ray's workers started, and the
outputs compared byte for byte with the local one's), then ``--rounds`` rounds,
interleaved (local, x1, x2, local, ...) so that a slow spell of the shared machine hits
every contender alike. The table gives the median wall, the ratio to ``local``'s median
and the rate of input read (every input byte each pass reads, over the wall). Recipes:
``plain`` (no reduction), ``norm`` (a reduction pass of norms before the main pass: map
tasks on Ray).

Then ``tvlang similarity`` of ``a`` and ``b`` against ``pre`` (the Gram matrix: one pass
over the three models), locally and on Ray with 2 workers (``similarity(...,
executor="ray")``: partial sums over ranges of tensors), the matrices compared to 1e-12.

Last, the per-task scheduling overhead: a small model of ``--tiny-tensors`` one-tensor
shards, run locally and on Ray with 2 workers; (Ray's wall - local wall) / shards.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import cached_models  # noqa: E402

RECIPES = {
    "plain": "pre + 0.5*(a - pre) + 0.3*(b - pre)",
    "norm": "pre + (norm(b - pre) / norm(a - pre))*(a - pre)",
}
NAMES = ("pre", "a", "b")
CONTENDERS = {"local": None, "ray x1": 1, "ray x2": 2}


def make_checkpoints(workdir: str, size_gb: float) -> dict[str, str]:
    """pre, a, b as model directories of about ``size_gb`` GB; reused when present."""
    from tvlang.testing.synth import llama_spec_for_bytes, write_synthetic

    return _models(os.path.join(workdir, f"size-{size_gb:g}"), llama_spec_for_bytes(int(size_gb * 1e9)),
                   write_synthetic)


def tiny_checkpoints(workdir: str, tensors: int) -> dict[str, str]:
    from tvlang.testing.synth import write_synthetic

    return _models(os.path.join(workdir, f"tiny-{tensors}"), {f"layers.{i}.w": (32, 32) for i in range(tensors)},
                   write_synthetic)


def _models(folder: str, spec, write_synthetic) -> dict[str, str]:
    """pre, and a and b fine-tuned from it."""
    def writer(seed: int):
        return lambda path: write_synthetic(path, spec, seed=seed, finetune_of=None if seed == 0 else 0)

    return cached_models(folder, {name: writer(seed) for seed, name in enumerate(NAMES)})


def digest(path: str) -> dict[str, str]:
    """sha256 of every file of an output directory, by name."""
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def run_once(plan, bindings, out: str, workers: int | None, shard_size: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    options = {} if workers is None else {"executor": "ray", "workers": workers}
    started = time.perf_counter()
    plan.run(bindings, out, shard_size=shard_size, **options)
    return time.perf_counter() - started


def bench_recipe(name: str, bindings, args, input_bytes: int) -> None:
    import tvlang

    plan = tvlang.compile(RECIPES[name])
    outs = {c: os.path.join(args.workdir, "out", c.replace(" ", "-")) for c in CONTENDERS}
    first = {}
    for contender, workers in CONTENDERS.items():  # untimed: warm cache, started workers, bytes checked
        first[contender] = run_once(plan, bindings, outs[contender], workers, args.shard_size)
        if workers is not None and digest(outs[contender]) != digest(outs["local"]):
            sys.exit(f"{name}: {contender}'s output differs from the local one")
    walls: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    for _ in range(args.rounds):
        for contender, workers in CONTENDERS.items():
            walls[contender].append(run_once(plan, bindings, outs[contender], workers, args.shard_size))
    base = statistics.median(walls["local"])
    shards = len([f for f in os.listdir(outs["local"]) if f.startswith("model") and f.endswith(".safetensors")])
    print(f"\nrecipe {name}: {RECIPES[name]}  ({plan.schedule.passes} pass{'es' if plan.schedule.passes > 1 else ''},"
          f" {shards} shards; outputs byte-identical)")
    print(f"  {'contender':<10} {'median wall':>12} {'vs local':>9} {'input MB/s':>11} {'first run':>10}   rounds")
    for contender in CONTENDERS:
        wall = statistics.median(walls[contender])
        rounds = " ".join(f"{w:.2f}" for w in walls[contender])
        print(f"  {contender:<10} {wall:>10.2f} s {wall / base:>8.2f}x {input_bytes / wall / 1e6:>11.0f}"
              f" {first[contender]:>8.2f} s   {rounds}", flush=True)
    for path in outs.values():
        shutil.rmtree(path, ignore_errors=True)


def bench_similarity(bindings, args, input_bytes: int) -> None:
    import numpy as np

    from tvlang.bases.gram import similarity

    inputs = [("a", bindings["a"]), ("b", bindings["b"])]
    contenders = {"local": {}, "ray x2": {"executor": "ray", "workers": 2}}
    walls: dict[str, list[float]] = {c: [] for c in contenders}
    grams = {}
    for _ in range(args.rounds + 1):  # the first round untimed
        for contender, options in contenders.items():
            started = time.perf_counter()
            grams[contender] = similarity(inputs, base=bindings["pre"], **options).gram
            walls[contender].append(time.perf_counter() - started)
    difference = float(np.abs(grams["ray x2"] - grams["local"]).max() / np.abs(grams["local"]).max())
    if difference > 1e-12:
        sys.exit(f"similarity: the Ray matrix differs from the local one by {difference:.3g} (relative)")
    base = statistics.median(walls["local"][1:])
    print(f"\nsimilarity of a, b against pre (one pass, 3 models; matrices equal to {difference:.1g})")
    print(f"  {'contender':<10} {'median wall':>12} {'vs local':>9} {'input MB/s':>11}   rounds")
    for contender in contenders:
        wall = statistics.median(walls[contender][1:])
        rounds = " ".join(f"{w:.2f}" for w in walls[contender][1:])
        print(f"  {contender:<10} {wall:>10.2f} s {wall / base:>8.2f}x {input_bytes / wall / 1e6:>11.0f}   {rounds}",
              flush=True)


def bench_per_task(args) -> None:
    import tvlang

    bindings = tiny_checkpoints(args.workdir, args.tiny_tensors)
    plan = tvlang.compile(RECIPES["plain"])
    out = os.path.join(args.workdir, "out", "tiny")
    run_once(plan, bindings, out, 2, 1)  # warm
    local, remote = [], []
    for _ in range(max(args.rounds, 2)):
        local.append(run_once(plan, bindings, out, None, 1))
        remote.append(run_once(plan, bindings, out, 2, 1))
    shutil.rmtree(out, ignore_errors=True)
    lw, rw = statistics.median(local), statistics.median(remote)
    print(f"\nper-task overhead: {args.tiny_tensors} one-tensor shards of 4 KiB: local {lw:.2f} s,"
          f" ray x2 {rw:.2f} s: {(rw - lw) / args.tiny_tensors * 1e3:.0f} ms of wall per shard"
          f" ({(rw - lw) / args.tiny_tensors * 2e3:.0f} ms per task per worker)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=250 * 10**6)
    parser.add_argument("--recipes", default="plain,norm", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--no-similarity", dest="similarity", action="store_false",
                        help="skip the similarity measure")
    parser.add_argument("--tiny-tensors", type=int, default=64, help="shards of the per-task measure (0: skip it)")
    parser.add_argument("--workdir", default="/tmp/tvlang-bench-ray")
    args = parser.parse_args()
    os.makedirs(os.path.join(args.workdir, "out"), exist_ok=True)

    import ray
    import torch

    print(f"machine: {platform.node()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; torch {torch.__version__},"
          f" ray {ray.__version__}", flush=True)
    bindings = make_checkpoints(args.workdir, args.size_gb)
    size = sum(os.path.getsize(os.path.join(bindings["pre"], f)) for f in os.listdir(bindings["pre"])
               if f.endswith(".safetensors"))
    print(f"models: 3 x {size / 1e9:.2f} GB float32; shard size {args.shard_size / 1e6:g} MB", flush=True)
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    print(f"ray.init (local instance, 2 CPUs): {time.perf_counter() - started:.1f} s", flush=True)
    try:
        for name in args.recipes.split(","):
            import tvlang

            schedule = tvlang.compile(RECIPES[name]).schedule
            passes = schedule.passes - 1 - len(schedule.levels)  # passes beyond one per reduction level
            reads = len(schedule.main.reads) + sum(len(program.reads) for _, program in schedule.levels)
            assert passes == 0, "a recipe with multi-pass reductions: count its reads"
            bench_recipe(name, bindings, args, reads * size)
        if args.similarity:
            bench_similarity(bindings, args, 3 * size)
        if args.tiny_tensors:
            bench_per_task(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
