"""Benchmark ``tvlang run`` against a naive loop, an ideal streaming loop and mergekit.

    python benchmarks/bench_run.py                       # four 1.5 GB float32 checkpoints
    python benchmarks/bench_run.py --size-gb 1.5 --scales 0.5,1,2 --repeat 3
    python benchmarks/bench_run.py --size-gb 0.1 --repeat 1 --only tvlang,ideal   # a quick look

Makes (once, cached under ``--workdir``, default /tmp/tvlang-bench) a synthetic
Llama-shaped float32 base ``pre`` and three "fine-tuned" copies ``a``, ``b``,
``c`` of about ``--size-gb`` GB each (HF model directories: config.json and
model.safetensors), then times the design card's expression

    pre + 0.4*(a - b) + 0.7*(c - pre)

each contender in a fresh subprocess, measured by ``harness.measure``:

- ``tvlang``: ``python -m tvlang run -e EXPR --bind ... -o OUT -q`` (the recipe is linear over
  float32 safetensors files: the torch-free executor, tvlang.run.direct, runs it);
- ``tvlang+torch``: the same command with ``TVLANG_DIRECT=0``: the local executor, which
  imports torch;
- ``naive``: ``safetensors.torch.load_file`` of all four, compute, ``save_file``;
- ``ideal``: a hand-written streaming loop: each file mapped once, per tensor
  ``out = 0.3*pre + 0.4*a - 0.4*b + 0.7*c`` (the simplification done by hand),
  computed in cache-sized chunks into one reused buffer, written straight after
  a header built up front; ``ideal+fsync`` also syncs the file as tvlang does before it
  renames its output into place (every 64 MiB from a thread while writing, and once at
  the end); both exit without the interpreter's teardown, as ``tvlang`` does;
- ``floor``: the physical floor: reads every input byte once (its header, then 1 MiB ``readinto``
  blocks of its tensors' bytes, a block of each input in turn)
  and writes and syncs an output of one model's size (its blocks reserved first, as tvlang's
  writer does; synced as ``ideal+fsync`` does), with no arithmetic; every contender's ratio
  to it is printed after the table;
- ``tvlang@base``: ``tvlang`` on the code of ``--baseline-src`` (another commit's
  checkout), run alternately with ``tvlang``;
- ``mergekit``: ``mergekit-yaml`` with ``task_arithmetic`` (weights 0.4, -0.4,
  0.7 over base ``pre``), when ``mergekit-yaml`` is found (``--mergekit PATH``).

Every contender runs once untimed first (inputs in the page cache: warm
numbers), then ``--repeat`` rounds, interleaved (A B C A B C ...) so that a slow
spell of a shared machine hits every contender alike; each run's output is checked
against a direct computation on a few tensors. The table gives the median wall time, the
throughput in MB/s of input read (4 x model size / wall), and the peak memory
over the repeats (see harness.py for what each column counts). With
``--scales`` the tvlang and ideal contenders also run at those multiples of
the size, to show memory flat in model size. ``--startup`` times
``tvlang check`` on a small recipe.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import struct
import subprocess
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Result, by_round, cached_models, fmt_bytes, machine, measure, median_result  # noqa: E402

EXPR = "pre + 0.4*(a - b) + 0.7*(c - pre)"
NAMES = ("pre", "a", "b", "c")
CONTENDERS = ("tvlang", "tvlang+torch", "naive", "ideal", "ideal+fsync", "floor", "mergekit", "tvlang@base")


# -- checkpoints -------------------------------------------------------------------------


def make_checkpoints(workdir: str, size_gb: float) -> dict[str, str]:
    """pre, a, b, c as model directories of about ``size_gb`` GB; reused when present."""
    from tvlang.testing.synth import llama_spec_for_bytes, write_synthetic

    spec = llama_spec_for_bytes(int(size_gb * 1e9))

    def writer(seed: int):
        if seed == 0:
            return lambda path: write_synthetic(path, spec, seed=0)
        return lambda path: write_synthetic(path, spec, seed=seed, finetune_of=0, scale=0.01)

    return cached_models(os.path.join(workdir, f"size-{size_gb:g}"),
                         {name: writer(seed) for seed, name in enumerate(NAMES)})


def weights(path: str) -> str:
    return os.path.join(path, "model.safetensors")


# -- contenders (each runs in its own process: bench_run.py _run NAME ...) -----------------


def run_naive(paths: list[str], out: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    pre, a, b, c = (load_file(weights(p)) for p in paths)
    result = {}
    for name, p in pre.items():
        if p.dtype.is_floating_point:
            result[name] = (p + 0.4 * (a[name] - b[name]) + 0.7 * (c[name] - p)).to(p.dtype)
        else:
            result[name] = p
    os.makedirs(out)
    shutil.copyfile(os.path.join(paths[0], "config.json"), os.path.join(out, "config.json"))
    save_file(result, weights(out), metadata={"format": "pt"})
    del torch


class SyncEvery:
    """Writes to a file and syncs it from a thread every 64 MiB: the disk writes while the
    rest is produced (the pattern of tvlang's writer, tvlang.io.writer.Writeback, written
    again here so that the floor imports nothing of tvlang: ``import tvlang.io.writer`` takes
    0.23-0.29 s here, since it imports the tvlang package, and the floor must not pay it, though
    the writer no longer imports torch). ``close()`` then fsyncs."""

    STEP = 64 << 20

    def __init__(self, f) -> None:
        import threading

        self.f, self.written, self.asked, self.stop = f, 0, 0, False
        self.wanted = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if self.stop:
                return
            os.fdatasync(self.f.fileno())

    def write(self, data) -> None:
        self.f.write(data)
        self.written += len(data)
        if self.written - self.asked >= self.STEP:
            self.asked = self.written
            self.wanted.set()

    def close(self) -> None:
        self.stop = True
        self.wanted.set()
        self.thread.join()
        os.fsync(self.f.fileno())


def reserve(fd: int, nbytes: int) -> None:
    """The output's blocks reserved before it is written (Linux ``fallocate``, size kept), as
    tvlang's writer does (tvlang.io.writer._reserve, written again here for the floor's sake: see
    SyncEvery): writing into reserved blocks is faster on this machine's ext4 (docs/performance.md,
    twentieth round), and the floor must write the fastest way. Elsewhere nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fallocate(fd, 1, 0, nbytes)  # 1: FALLOC_FL_KEEP_SIZE; a refusal leaves the writes to allocate


def run_floor(paths: list[str], out: str) -> None:
    """The physical floor: read every input byte once and write and sync an output of one
    model's size (the base's bytes), with no arithmetic at all, its blocks reserved first
    (``reserve``, since the twentieth round) and the output synced every 64 MiB
    while it is written (``SyncEvery``; one fsync at the end took 4.7-5.8 s at 1.5 GB on the
    development machine, docs/performance.md). The inputs are read side by side, a block of
    each in turn, and the base's block written after them: the pattern of a streaming merge.
    Blocks of 1 MiB, as tvlang's chunks: a block that stays in the core's cache is copied out
    of the page cache about four times as fast as one that does not (the four 0.75 GB inputs:
    0.29 s in 1 MiB blocks, 1.23 s in 16 MiB blocks). The floor read the inputs one after the
    other in 16 MiB blocks before (fifteenth round): it wrote the whole output while reading the
    base, faster than the disk took it, and took 2.2-2.6 s at 0.75 GB where tvlang took 1.1-1.4 s.

    Each file's header is read and the base's written first, and then the tensors' bytes in
    blocks from the end of the header, as a merge writes its output; and each block is read into
    memory at the same place modulo 64 as its bytes in the file, as tvlang reads them. Two
    slow paths of this machine's kernel, both measured in the sixteenth round
    (docs/performance.md), which the floor met and a merge does not: a read copies out of the
    page cache about four times slower into memory 1 to 31 bytes further into its page than the
    file offset (0.43-0.58 against 0.10 s a GiB), where a 1 MiB ``bytearray`` starts 16 bytes
    into its page; and 1 MiB writes at offsets that are multiples of 1 MiB (a whole file copied
    from its start) took 2.4-3.1 s a GiB to copy into the page cache, against 0.25-0.27 s at any
    other offset tried. The floor took 1.41-1.48 s at 0.75 GB the first way and 1.8-3.4 s at
    1.5 GB the second, where tvlang took 0.90-0.98 s and 1.3-1.6 s."""
    size = 1 << 20
    os.makedirs(out)
    shutil.copyfile(os.path.join(paths[0], "config.json"), os.path.join(out, "config.json"))
    sources = [open(weights(path), "rb", buffering=0) for path in paths]
    try:
        heads = []  # each file's header: its 8-byte length and the JSON
        for source in sources:
            length = source.read(8)
            heads.append(length + source.read(struct.unpack("<Q", length)[0]))
        blocks = [mmap.mmap(-1, size + 64) for _ in paths]
        views = [memoryview(block)[len(head) % 64:len(head) % 64 + size] for block, head in zip(blocks, heads)]
        with open(weights(out), "wb", buffering=0) as f:
            reserve(f.fileno(), os.path.getsize(weights(paths[0])))
            target = SyncEvery(f)
            target.write(heads[0])
            while True:
                counts = [source.readinto(view) for source, view in zip(sources, views)]  # 0 once read
                if not any(counts):
                    break
                if counts[0]:
                    target.write(views[0][:counts[0]])
            target.close()
    finally:
        for source in sources:
            source.close()


def _map_file(path: str):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header.pop("__metadata__", None)
    return header, mapped, 8 + length


def run_ideal(paths: list[str], out: str, fsync: bool) -> None:
    import torch

    # Two threads and 1M-element chunks: the fastest of the four settings tried on the
    # 2-core machine (1 or 2 threads, whole tensors or chunks; docs/performance.md).
    # TVLANG_BENCH_IDEAL="threads,chunk" overrides.
    threads, chunk = (int(v) for v in os.environ.get("TVLANG_BENCH_IDEAL", "2,1048576").split(","))
    torch.set_num_threads(threads)
    codes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    files = [_map_file(weights(p)) for p in paths]
    header = files[0][0]
    order = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    biggest = max(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in order)
    buffer = torch.empty(biggest, dtype=torch.uint8)
    out_header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        out_header[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"],
                            "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(out_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    os.makedirs(out)
    shutil.copyfile(os.path.join(paths[0], "config.json"), os.path.join(out, "config.json"))

    def view(index: int, name: str) -> torch.Tensor:
        head, mapped, start = files[index]
        begin, end = head[name]["data_offsets"]
        dtype = codes[head[name]["dtype"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only map: we never write to it
            return torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=start + begin)

    with open(weights(out), "wb", buffering=0) as raw:
        f = SyncEvery(raw) if fsync else raw
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            dtype = codes[header[name]["dtype"]]
            pre = view(0, name)
            if not dtype.is_floating_point:
                f.write(memoryview(pre.numpy()).cast("B"))
                continue
            acc = buffer[: pre.numel() * dtype.itemsize].view(dtype)
            a, b, c = view(1, name), view(2, name), view(3, name)
            # pre + 0.4*(a - b) + 0.7*(c - pre), simplified by hand, in cache-sized chunks
            for start in range(0, pre.numel(), chunk):
                s = slice(start, start + chunk)
                torch.mul(pre[s], 0.3, out=acc[s])
                acc[s].add_(a[s], alpha=0.4)
                acc[s].add_(b[s], alpha=-0.4)
                acc[s].add_(c[s], alpha=0.7)
            f.write(memoryview(acc.view(torch.uint8).numpy()))
        if fsync:
            f.close()  # the last sync (SyncEvery synced every 64 MiB on the way, as tvlang's writer does)


def run_tvlang_cmd(paths: dict[str, str], out: str) -> list[str]:
    binds = [arg for name in NAMES for arg in ("--bind", f"{name}={paths[name]}")]
    return [sys.executable, "-m", "tvlang", "run", "-e", EXPR, *binds, "-o", out, "-q"]


def mergekit_cmd(mergekit: str, paths: dict[str, str], out: str, folder: str) -> list[str]:
    config = os.path.join(folder, "mergekit.yml")
    with open(config, "w") as f:
        f.write(
            "merge_method: task_arithmetic\n"
            f"base_model: {paths['pre']}\n"
            "parameters:\n  normalize: false\n"
            "dtype: float32\n"
            "models:\n"
            f"  - model: {paths['a']}\n    parameters:\n      weight: 0.4\n"
            f"  - model: {paths['b']}\n    parameters:\n      weight: -0.4\n"
            f"  - model: {paths['c']}\n    parameters:\n      weight: 0.7\n"
        )
    return [mergekit, config, out, "--copy-tokenizer", "--allow-crimes", "--lazy-unpickle"]


def contender_cmd(name: str, paths: dict[str, str], out: str, args) -> list[str] | None:
    me = os.path.abspath(__file__)
    ordered = [paths[n] for n in NAMES]
    if name in ("tvlang", "tvlang+torch"):
        return run_tvlang_cmd(paths, out)
    if name == "tvlang@base":  # the same command, on the code of --baseline-src
        return run_tvlang_cmd(paths, out) if args.baseline_src else None
    if name == "naive":
        return [sys.executable, me, "_run", "naive", out, *ordered]
    if name == "ideal":
        return [sys.executable, me, "_run", "ideal", out, *ordered]
    if name == "ideal+fsync":
        return [sys.executable, me, "_run", "ideal+fsync", out, *ordered]
    if name == "floor":
        return [sys.executable, me, "_run", "floor", out, *ordered]
    if name == "mergekit":
        if not args.mergekit:
            return None
        return mergekit_cmd(args.mergekit, paths, out, os.path.dirname(out))
    raise ValueError(name)


# -- the driver -------------------------------------------------------------------------------


def check_output(out: str, paths: dict[str, str]) -> float:
    """Max |output - expected| over a few tensors (a contender that computes garbage fails)."""
    import torch
    from safetensors import safe_open

    found = None
    for file in ("model.safetensors", "model-00001-of-00001.safetensors"):
        if os.path.exists(os.path.join(out, file)):
            found = os.path.join(out, file)
    if found is None:
        index = os.path.join(out, "model.safetensors.index.json")
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    worst = 0.0
    handles = {n: safe_open(weights(paths[n]), "pt") for n in NAMES}
    for name in ("model.norm.weight", "model.layers.0.self_attn.q_proj.weight"):
        file = found or os.path.join(out, weight_map[name])
        with safe_open(file, "pt") as got:
            value = got.get_tensor(name)
        pre, a, b, c = (handles[n].get_tensor(name) for n in NAMES)
        expected = pre + 0.4 * (a - b) + 0.7 * (c - pre)
        worst = max(worst, float((value - expected).abs().max()))
    del torch
    return worst


def contender_env(name: str = "", args=None) -> dict[str, str]:
    """The environment without PYTHONDONTWRITEBYTECODE: contenders start as a user's
    would, from compiled modules (the warm-up run writes them). A ``@base`` contender
    imports tvlang from ``--baseline-src`` (a checkout of another commit) instead; a ``...+torch``
    contender runs with ``TVLANG_DIRECT=0``."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if name.endswith("+torch"):
        env["TVLANG_DIRECT"] = "0"  # the local executor (tvlang.run.direct.DISABLE)
    if name.endswith("@base") and args is not None and args.baseline_src:
        env["PYTHONPATH"] = os.path.abspath(args.baseline_src)
    return env


def run_round(names: list[str], paths: dict[str, str], folder: str, args) -> dict[str, Result | None]:
    """Every contender once, measured (None: not installed)."""
    results: dict[str, Result | None] = {}
    for name in names:
        out = os.path.join(folder, f"out-{name.replace('+', '-')}")
        cmd = contender_cmd(name, paths, out, args)
        if cmd is None:
            results[name] = None
            continue
        shutil.rmtree(out, ignore_errors=True)
        result = measure(cmd, env=contender_env(name, args),
                         cwd=folder)  # not a folder holding a tvlang package: --baseline-src's would lose
        if result.rc != 0:
            print(f"  {name} failed (exit {result.rc}):\n{result.stderr[-3000:]}", file=sys.stderr)
        elif name != "floor":  # the floor computes nothing: its output is the base
            error = check_output(out, paths)
            if error > 1e-5:
                print(f"  {name}: WRONG output, max error {error:g}", file=sys.stderr)
                result.rc = -1
        shutil.rmtree(out, ignore_errors=True)
        results[name] = result
    return results


def bench(names: list[str], paths: dict[str, str], folder: str, args) -> dict[str, Result | None]:
    """A warm-up round (inputs into the page cache), then ``--repeat`` rounds with the
    contenders interleaved (A B C A B C ...), so that a slow spell of a shared machine
    hits them all alike; the median run of each."""
    warm = run_round(names, paths, folder, args)
    names = [n for n in names if warm[n] is not None and warm[n].rc == 0]
    runs: dict[str, list[Result]] = {n: [] for n in names}
    for index in range(args.repeat):
        for name, result in run_round(names, paths, folder, args).items():
            if result is not None and result.rc == 0:
                runs[name].append(result)
                print(f"  round {index + 1}: {name} {result.wall:.2f} s, anon {fmt_bytes(result.peak_anon)}",
                      file=sys.stderr, flush=True)
    out: dict[str, Result | None] = {n: (median_result(r) if r else warm[n]) for n, r in runs.items()}
    for name, result in warm.items():
        out.setdefault(name, result)
    return out


def table(rows: list[tuple[str, float, Result]], ref: dict[str, float]) -> str:
    head = ("| contender | size | wall (median) | input MB/s | peak RSS | peak RssAnon | peak Pss_Anon "
            "| peak private | vs naive | vs ideal | vs mergekit |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for name, size_gb, r in rows:
        mbps = 4 * size_gb * 1e9 / 1e6 / r.wall

        def ratio(key):
            other = ref.get((key, size_gb))
            return f"{r.wall / other:.2f}x" if other else "-"

        lines.append(f"| {name} | {size_gb:g} GB | {r.wall:.2f} s | {mbps:.0f} | {fmt_bytes(r.peak_rss)} | "
                     f"{fmt_bytes(r.peak_anon)} | {fmt_bytes(r.peak_pss_anon)} | {fmt_bytes(r.peak_private)} | "
                     f"{ratio('naive')} | {ratio('ideal')} | {ratio('mergekit')} |")
    return "\n".join(lines)


def startup(workdir: str, repeat: int) -> str:
    recipe = os.path.join(workdir, "small.tv")
    with open(recipe, "w") as f:
        f.write("param lam = 0.4\nout = pre + lam*(a - b) + 0.7*(c - pre)\n")
    cmd = [sys.executable, "-m", "tvlang", "check", recipe]
    measure(cmd, env=contender_env())
    walls = [measure(cmd, env=contender_env()).wall for _ in range(repeat)]
    bare = [measure([sys.executable, "-c", "pass"]).wall for _ in range(repeat)]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tvlang", "check", recipe],
                          capture_output=True, text=True, env=contender_env())
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = [p.strip() for p in line[len("import time:"):].split("|")]
            if parts[0].isdigit():
                rows.append((int(parts[1]), parts[2]))
    top = sorted(rows, reverse=True)[:8]
    torch_loaded = any(name.strip() == "torch" for _, name in rows)
    text = [f"tvlang check startup: median {statistics.median(walls):.3f} s over {repeat} runs "
            f"(min {min(walls):.3f} s; a bare python -c pass: median {statistics.median(bare):.3f} s); "
            f"torch imported: {torch_loaded}",
            "largest cumulative imports (us): " + ", ".join(f"{n.strip()} {t}" for t, n in top)]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_run":
        kind, out, *paths = argv[1:]
        if kind == "naive":
            run_naive(paths, out)
        elif kind == "floor":
            run_floor(paths, out)
        else:
            run_ideal(paths, out, fsync=kind == "ideal+fsync")
            # Exit as tvlang's command does (tvlang.faces.cli.entry): without the interpreter's
            # teardown of torch's modules (about 0.5 s), which is no part of the loop's work.
            sys.stdout.flush()
            os._exit(0)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.5, help="size of each checkpoint (default 1.5)")
    parser.add_argument("--scales", default="1", help="multiples of --size-gb to run tvlang and ideal at "
                        "(e.g. 0.5,1,2); naive and mergekit run at 1 only")
    parser.add_argument("--workdir", default="/tmp/tvlang-bench", type=os.path.abspath,
                        help="where checkpoints are cached")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (median reported)")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="contenders to run (comma-separated)")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), type=os.path.abspath,
                        help="path of mergekit-yaml")
    parser.add_argument("--startup", action="store_true", help="also time tvlang check start-up")
    parser.add_argument("--baseline-src", default=None,
                        help="a source checkout of another tvlang (git worktree add DIR COMMIT): adds the "
                             "contender tvlang@base, run alternately with tvlang")
    args = parser.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender {unknown[0]}; choose from {', '.join(CONTENDERS)}")
    os.makedirs(args.workdir, exist_ok=True)
    print(f"machine: {machine()}; expression: {EXPR}", flush=True)
    rows: list[tuple[str, float, Result]] = []
    ref: dict[tuple[str, float], float] = {}
    rounds: dict[tuple[str, float], list[float]] = {}  # each run's wall, round by round
    for scale in (float(s) for s in args.scales.split(",")):
        size_gb = round(args.size_gb * scale, 3)
        print(f"checkpoints of {size_gb:g} GB:", file=sys.stderr)
        paths = make_checkpoints(args.workdir, size_gb)
        folder = os.path.dirname(paths["pre"])
        names = [n for n in only if scale == 1.0 or n not in ("naive", "mergekit")]
        for name, result in bench(names, paths, folder, args).items():
            if result is None:
                print(f"  {name}: skipped (not installed)", file=sys.stderr)
                continue
            if result.rc == 0:
                rows.append((name, size_gb, result))
                ref[(name, size_gb)] = result.wall
                rounds[(name, size_gb)] = result.extra.get("walls", [])
                walls = ", ".join(f"{w:.1f}" for w in result.extra.get("walls", [result.wall]))
                print(f"  {name}: median {result.wall:.2f} s ({walls})", file=sys.stderr, flush=True)
    print(table(rows, ref))
    for (name, size_gb), wall in ref.items():
        floor = ref.get(("floor", size_gb))
        if floor and name != "floor":
            rounds_text = by_round(rounds[(name, size_gb)], rounds[("floor", size_gb)])
            also = f"; by round: {rounds_text}" if rounds_text else ""
            print(f"{name} / floor at {size_gb:g} GB: {wall / floor:.3f}{also}")
        if name == "tvlang@base" and ("tvlang", size_gb) in ref:
            print(f"tvlang / tvlang@base at {size_gb:g} GB: {ref[('tvlang', size_gb)] / wall:.3f}")
    if args.startup:
        print(startup(args.workdir, max(5, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
