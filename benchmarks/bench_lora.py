"""Benchmark LoRA adapters in and out: memory and time at ~1.5 GB.

    python benchmarks/bench_lora.py                    # 1.5 GB float32 base and fine-tune, rank 64
    python benchmarks/bench_lora.py --size-gb 0.1      # a quick look

Makes (once, cached under ``--workdir``, default /tmp/tvlang-bench) a synthetic
Llama-shaped float32 base ``pre`` and a "fine-tuned" copy ``ft`` of about
``--size-gb`` GB each (``tvlang.testing.synth``), then measures, each in a fresh
subprocess (``harness.measure``, after one untimed run so the inputs are in the
page cache):

- ``extract``: ``tvlang extract-lora -e "ft - pre" --rank R -o adapter``: one exact
  SVD per matrix, the rank-R adapter written;
- ``read``: ``tvlang run -e "pre + tau" --bind tau=lora:adapter -o out``: the
  adapter read as a task vector, every adapted tensor computed as ``B @ A`` when its
  turn comes, the merged model written.

The table gives wall time and the peak memory columns of harness.py; ``private`` is
the figure the issue's target (under 0.5 GiB) is about.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import cached_models, fmt_bytes, measure  # noqa: E402


def make_checkpoints(workdir: str, size_gb: float) -> dict[str, str]:
    from tvlang.testing.synth import llama_spec_for_bytes, write_synthetic

    spec = llama_spec_for_bytes(int(size_gb * 1e9))
    return cached_models(os.path.join(workdir, f"lora-size-{size_gb:g}"), {
        "pre": lambda path: write_synthetic(path, spec, seed=0),
        "ft": lambda path: write_synthetic(path, spec, seed=1, finetune_of=0),
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--workdir", default="/tmp/tvlang-bench")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = make_checkpoints(args.workdir, args.size_gb)
    print(f"checkpoints ready in {time.perf_counter() - started:.1f} s: {paths['pre']}, {paths['ft']}")
    out = os.path.join(args.workdir, f"lora-out-{args.size_gb:g}")
    os.makedirs(out, exist_ok=True)
    adapter = os.path.join(out, "adapter")
    merged = os.path.join(out, "merged")
    tvlang = [sys.executable, "-m", "tvlang"]
    commands = {
        "extract": tvlang + ["extract-lora", "-e", "ft - pre", "--bind", f"pre={paths['pre']}", "--bind",
                             f"ft={paths['ft']}", "--rank", str(args.rank), "-o", adapter, "--force"],
        "read": tvlang + ["run", "-e", "pre + tau", "--bind", f"pre={paths['pre']}", "--bind",
                          f"tau=lora:{adapter}", "-o", merged, "--force", "-q"],
    }
    print(f"{'contender':10} {'wall':>9} {'peak rss':>10} {'anon':>10} {'pss anon':>10} {'private':>10}")
    for name, cmd in commands.items():
        if name == "read":
            measure(cmd)  # untimed: the adapter and the base in the page cache
        result = measure(cmd)
        if result.rc != 0:
            print(f"{name} failed ({result.rc}):\n{result.stderr}")
            return 1
        print(f"{name:10} {result.wall:8.1f}s {fmt_bytes(result.peak_rss):>10} {fmt_bytes(result.peak_anon):>10}"
              f" {fmt_bytes(result.peak_pss_anon):>10} {fmt_bytes(result.peak_private):>10}")
        if name == "extract":
            print("  " + result.stderr.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
