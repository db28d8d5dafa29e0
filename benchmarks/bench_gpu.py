"""Benchmark tvlang on a device: in memory against the device's own copy bandwidth, ``ties`` on
the device against the CPU, and ``tvlang run --device DEVICE`` end to end against the CPU run.

    python benchmarks/bench_gpu.py [--device cuda] [--size-gb 1.5] [--repeat 3]
                                   [--folder /tmp/tvlang-bench] [--skip-run]

Issue 19's lines, each section printing its own ratio:

1. ``copy``: a plain torch copy kernel (``dst.copy_(src)``) over one model's bytes on the
   device; its bandwidth counts the bytes read and the bytes written (2 x model / time).
2. ``in memory``: four models of ``--size-gb`` made on the device (pre, a, b, c: the shapes of
   ``bench_run.py``'s models), and ``tvlang.apply_to`` of ``pre + 0.4*(a - b) + 0.7*(c - pre)``
   into a module whose tensors are on the device: the inputs are read where they are and the
   results written there (tvlang.io.torch_file, tvlang.run.driver.apply_to). Its bandwidth
   counts four models read and one written (5 x model / time); the line asks for 70 % of the
   copy kernel's. ``Plan.evaluate`` (results handed back on the host) is timed beside it.
3. ``ties``: ``pre + ties(a - pre, b - pre, c - pre, density=0.2)`` the same way, on the device
   and on the CPU (inputs in the CPU's memory); the line asks for the device to take at most
   1/20 of the CPU's time.
4. ``end to end`` (unless ``--skip-run``): ``python -m tvlang run -e EXPR ... --device DEVICE``
   against ``--device cpu``, plain task arithmetic and ``ties``, over the checkpoints
   ``bench_run.py`` writes (``--folder/size-SIZE``, made once and reused), in alternating
   rounds (``--repeat``), each output checked on a few tensors against a direct computation.

Every in-memory figure is the best of ``--repeat`` runs after one untimed run, timed with
the device synchronized at both ends. Without the device (``--device cuda`` where torch sees
no GPU) it says so and exits 2. ``--device cpu`` runs every section on the CPU: a dry run of
the script, and the CPU's own figures for sections 1 and 2 (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_run import NAMES, check_output, contender_env, make_checkpoints  # noqa: E402
from harness import by_round, measure, median_result  # noqa: E402

import tvlang  # noqa: E402
from tvlang.testing.synth import llama_spec_for_bytes, module_with  # noqa: E402

EXPR = "pre + 0.4*(a - b) + 0.7*(c - pre)"  # bench_run.py's
TIES = "pre + ties(a - pre, b - pre, c - pre, density=0.2)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run, device: torch.device, repeat: int) -> float:
    """The best of ``repeat`` timed runs of ``run()``, after one untimed run."""
    run()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def copy_time(nbytes: int, device: torch.device, repeat: int) -> float:
    """A plain torch copy of ``nbytes`` on ``device`` (its two buffers freed on return)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return best_time(lambda: dst.copy_(src), device, repeat)


def float_shapes(size_gb: float) -> dict[str, tuple[int, ...]]:
    """The float32 tensors of bench_run.py's checkpoints of ``size_gb`` GB (its integer
    buffers left out: they are a few bytes)."""
    spec = llama_spec_for_bytes(int(size_gb * 1e9))
    return {name: tuple(entry) for name, entry in spec.items() if isinstance(entry, (tuple, list))
            and all(isinstance(d, int) for d in entry)}


def make_models(shapes: dict[str, tuple[int, ...]], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """pre, a, b, c on ``device``: a, b, c close to pre (fine-tunes of it)."""
    gen = torch.Generator(device=device).manual_seed(0)
    models: dict[str, dict[str, torch.Tensor]] = {name: {} for name in NAMES}
    for tensor, shape in shapes.items():
        pre = torch.randn(shape, generator=gen, device=device)
        models["pre"][tensor] = pre
        for name in NAMES[1:]:
            models[name][tensor] = pre + 0.01 * torch.randn(shape, generator=gen, device=device)
    return models


def module_of(shapes: dict[str, tuple[int, ...]], device: torch.device) -> torch.nn.Module:
    """A module with one buffer of each shape, under the same dotted names, on ``device``."""
    return module_with({name: torch.empty(shape, device=device) for name, shape in shapes.items()})


def check_module(module: torch.nn.Module, models: dict, recipe: str) -> float:
    """The largest difference, over three tensors, between the module and a direct computation."""
    state = module.state_dict()
    worst = 0.0
    for name in list(models["pre"])[:3]:
        pre, a, b, c = (models[m][name].double() for m in NAMES)
        if recipe == EXPR:
            expected = pre + 0.4 * (a - b) + 0.7 * (c - pre)
        else:  # ties: the device's result against the CPU's (same kernel, same entries kept)
            expected = tvlang.compile(recipe).evaluate({m: {name: models[m][name].cpu()} for m in NAMES})[name]
        worst = max(worst, float((state[name].double().cpu() - expected.double().cpu()).abs().max()))
    return worst


def in_memory(device: torch.device, size_gb: float, repeat: int) -> dict[str, float]:
    """Sections 1 to 3: the copy kernel, task arithmetic and ties in memory (seconds, best of repeat)."""
    shapes = float_shapes(size_gb)
    nbytes = sum(4 * torch.Size(s).numel() for s in shapes.values())
    print(f"device: {describe(device)}; models of {nbytes / 1e9:.2f} GB ({len(shapes)} float32 tensors)",
          flush=True)
    copy = copy_time(nbytes, device, repeat)
    copy_bw = 2 * nbytes / copy
    print(f"copy kernel: {copy * 1e3:.1f} ms, {copy_bw / 1e9:.1f} GB/s (bytes read + written)", flush=True)

    models = make_models(shapes, device)
    module = module_of(shapes, device)
    plan = tvlang.compile(EXPR)
    ta = best_time(lambda: tvlang.apply_to(module, plan, models, device=str(device)), device, repeat)
    error = check_module(module, models, EXPR)
    ta_bw = 5 * nbytes / ta
    print(f"in memory, apply_to: {ta * 1e3:.1f} ms, {ta_bw / 1e9:.1f} GB/s (4 models read, 1 written): "
          f"{ta_bw / copy_bw:.0%} of the copy kernel's (line: at least 70 %); max error {error:.2g}", flush=True)
    evaluate = best_time(lambda: plan.evaluate(models, device=str(device)), device, repeat)
    print(f"in memory, evaluate (results to the host): {evaluate * 1e3:.1f} ms, "
          f"{5 * nbytes / evaluate / 1e9:.1f} GB/s", flush=True)

    ties_plan = tvlang.compile(TIES)
    ties = best_time(lambda: tvlang.apply_to(module, ties_plan, models, device=str(device)), device, repeat)
    ties_error = check_module(module, models, TIES)
    result = {"copy": copy, "ta": ta, "evaluate": evaluate, "ties": ties}
    print(f"ties on {device.type}: {ties:.3f} s (max difference from the CPU's on three tensors: {ties_error:.2g})",
          flush=True)
    if device.type != "cpu":
        del models, module
        if device.type == "cuda":
            torch.cuda.empty_cache()
        host = make_models(shapes, torch.device("cpu"))
        host_module = module_of(shapes, torch.device("cpu"))
        on_cpu = best_time(lambda: tvlang.apply_to(host_module, ties_plan, host), torch.device("cpu"),
                           max(1, min(repeat, 2)))
        result["ties_cpu"] = on_cpu
        print(f"ties on the CPU ({os.cpu_count()} cores): {on_cpu:.3f} s; the device {on_cpu / ties:.1f}x faster "
              "(line: at least 20x)", flush=True)
    return result


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return f"{device.type} ({os.cpu_count()} cores), torch {torch.__version__}"


def end_to_end(device: torch.device, size_gb: float, repeat: int, folder: str) -> None:
    """Section 4: ``tvlang run`` with ``--device DEVICE`` and with ``--device cpu``, alternating."""
    paths = make_checkpoints(folder, size_gb)
    binds = [arg for name in NAMES for arg in ("--bind", f"{name}={paths[name]}")]
    contenders = {}
    for label, recipe in (("ta", EXPR), ("ties", TIES)):
        for where in dict.fromkeys([str(device), "cpu"]):
            contenders[f"{label}@{where}"] = (recipe, where)
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    results: dict[str, list] = {name: [] for name in contenders}
    for index in range(repeat + 1):  # the first round untimed: inputs into the page cache
        for name, (recipe, where) in contenders.items():
            out = os.path.join(folder, f"out-gpu-{name.replace('@', '-').replace(':', '')}")
            cmd = [sys.executable, "-m", "tvlang", "run", "-e", recipe, *binds, "-o", out, "--device", where,
                   "-q", "--force"]
            result = measure(cmd, env=contender_env(), cwd=folder)
            if result.rc != 0:
                print(f"  {name} failed (exit {result.rc}):\n{result.stderr[-2000:]}", file=sys.stderr)
                continue
            if recipe == EXPR:
                error = check_output(out, paths)
                if error > 1e-5:
                    print(f"  {name}: WRONG output, max error {error:g}", file=sys.stderr)
                    continue
            if index:
                walls[name].append(result.wall)
                results[name].append(result)
                print(f"  round {index}: {name} {result.wall:.2f} s", file=sys.stderr, flush=True)
    for label in ("ta", "ties"):
        cpu, dev = f"{label}@cpu", f"{label}@{device}"
        for name in dict.fromkeys([dev, cpu]):
            if results[name]:
                r = median_result(results[name])
                print(f"end to end, {name}: {r.wall:.2f} s (median of {len(results[name])}), "
                      f"{4 * size_gb * 1e9 / r.wall / 1e6:.0f} MB/s of input", flush=True)
        if dev != cpu and walls[dev] and walls[cpu]:
            print(f"end to end, {label}: {device} / cpu by round: {by_round(walls[dev], walls[cpu])}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", default="/tmp/tvlang-bench")
    parser.add_argument("--skip-run", action="store_true", help="the in-memory sections only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: torch sees no CUDA device here; --device cpu runs the same sections on the CPU",
              file=sys.stderr)
        return 2
    in_memory(device, args.size_gb, args.repeat)
    if not args.skip_run:
        end_to_end(device, args.size_gb, args.repeat, args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
