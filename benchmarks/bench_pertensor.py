"""Memory and time of the per-tensor operators on one large tensor: della, slerp, model_stock,
random_like, against plain task arithmetic over the same inputs, and against another commit.

    python benchmarks/bench_pertensor.py                                   # a 200 MB tensor
    python benchmarks/bench_pertensor.py --size-mb 200 --repeat 3 --baseline-src /tmp/tvlang-base

(``git archive COMMIT | tar -x -C /tmp/tvlang-base`` makes a baseline tree; ``--src`` a tree
for the current code, so that edits in the checkout during a run do not reach it.)

Makes (once, cached under ``--workdir``, default /tmp/tvlang-bench-pertensor) four float32
checkpoints ``pre``, ``a``, ``b``, ``c`` (single safetensors files), each one matrix of
``--size-mb`` MB (rows of 4096 entries) and a 4096-entry vector, and runs each contender in a
fresh process (``harness.measure``: wall time, peak RssAnon, peak private memory):

- ``ta``: ``pre + 0.5*(a - pre) + 0.5*(b - pre)`` (the reference: every ratio is against it);
- ``della``: ``pre + della(a - pre, b - pre, density=0.5, epsilon=0.1, seed=1)``;
- ``slerp``: ``pre + slerp(a - pre, b - pre, 0.3)`` (the fine-tunes are nearly colinear: their
  deltas are not); ``model_stock``: ``model_stock(pre, a, b, c)``;
  ``random_like``: ``pre + random_like(a - pre, seed=1)``; ``model_stock_rows``: ``model_stock(pre, a, b, c,
  filter_wise=true)`` (a ratio per row);
- the threshold kernels ``ties`` (``pre + ties(a - pre, b - pre, c - pre, density=0.2)``), ``topk``
  (density 0.2), ``breadcrumbs`` (density 0.2, gamma 0.01), ``dare_ties`` (p 0.9), and two
  recipes with whole-model passes first: ``cos`` (``cos`` and ``norm`` coefficients) and
  ``ties_model`` (``ties`` with ``scope="model"``); mergekit's rescale, a pass for each input's
  L1 norms first: ``dare_l1`` (``pre + dare(a - pre, 0.5, rescale_by="l1", seed=1)``) and
  ``della_l1`` (``della`` as above with ``rescale_by="l1"``);
- each of them again as ``NAME@base`` on the code of ``--baseline-src`` (a checkout of another
  commit: ``git archive COMMIT | tar -x -C DIR``), when given.

Every contender runs once untimed (inputs into the page cache), then ``--repeat`` rounds
interleaved (A B C ... A B C ...); the table gives the median wall and the peak memory over
the rounds. Each output is checked on its first 1,000,000 entries: finite, and (``ta``,
``slerp``, ``model_stock``, ``cos``) equal to the formula, with the per-tensor (whole-model for
``cos``) factors computed here from float64 sums over the files.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Result, fmt_bytes, measure, median_result  # noqa: E402

NAMES = ("pre", "a", "b", "c")
RECIPES = {
    "ta": "pre + 0.5*(a - pre) + 0.5*(b - pre)",
    "della": "pre + della(a - pre, b - pre, density=0.5, epsilon=0.1, seed=1)",
    "slerp": "pre + slerp(a - pre, b - pre, 0.3)",
    "model_stock": "model_stock(pre, a, b, c)",
    "random_like": "pre + random_like(a - pre, seed=1)",
    "model_stock_rows": "model_stock(pre, a, b, c, filter_wise=true)",
    "ties": "pre + ties(a - pre, b - pre, c - pre, density=0.2)",
    "topk": "pre + topk(a - pre, 0.2)",
    "breadcrumbs": "pre + breadcrumbs(a - pre, 0.2, gamma=0.01)",
    "dare_ties": "pre + dare_ties(a - pre, b - pre, c - pre, p=0.9)",
    "cos": "pre + cos(a - pre, b - pre)*(a - pre) + norm(a - pre)/norm(b - pre)*(b - pre)",
    "ties_model": 'pre + ties(a - pre, b - pre, c - pre, density=0.2, scope="model")',
    "dare_l1": 'pre + dare(a - pre, 0.5, rescale_by="l1", seed=1)',
    "della_l1": 'pre + della(a - pre, b - pre, density=0.5, epsilon=0.1, rescale_by="l1", seed=1)',
}
COLUMNS = 4096
CHECKED = 1_000_000


def make_checkpoints(workdir: str, size_mb: float) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    rows = max(1, int(size_mb * 1e6 / 4 / COLUMNS))
    folder = os.path.join(workdir, f"{size_mb:g}mb")
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{name}.safetensors") for name in NAMES}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    g = torch.Generator().manual_seed(0)
    pre = {"big.weight": torch.randn(rows, COLUMNS, generator=g), "norm.weight": torch.ones(COLUMNS)}
    for name in NAMES:
        tensors = pre if name == "pre" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        save_file(tensors, paths[name] + ".tmp")
        os.replace(paths[name] + ".tmp", paths[name])
    return paths


def command(name: str, paths: dict[str, str], out: str) -> list[str]:
    recipe = RECIPES[name.removesuffix("@base")]
    binds = [arg for n in NAMES if re.search(rf"\b{n}\b", recipe) for arg in ("--bind", f"{n}={paths[n]}")]
    return [sys.executable, "-m", "tvlang", "run", "-e", recipe, *binds, "-o", out, "-q", "--force"]


def _rows(path: str, start: int, stop: int):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_slice("big.weight")[start:stop].double()


def coefficients(paths: dict[str, str]) -> dict[str, tuple[float, ...]]:
    """slerp's and model_stock's factors for 'big.weight', from float64 sums over row blocks."""
    from safetensors import safe_open

    with safe_open(paths["pre"], "pt") as f:
        rows = f.get_slice("big.weight").get_shape()[0]
    aa = bb = ab = 0.0
    s = [0.0] * 6  # |d_a|^2 |d_b|^2 |d_c|^2, d_a.d_b, d_a.d_c, d_b.d_c
    for start in range(0, rows, 4096):
        pre, a, b, c = (_rows(paths[n], start, start + 4096) for n in NAMES)
        d = [a - pre, b - pre, c - pre]
        aa, bb, ab = aa + float((d[0] * d[0]).sum()), bb + float((d[1] * d[1]).sum()), ab + float((d[0] * d[1]).sum())
        for k, (i, j) in enumerate([(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]):
            s[k] += float((d[i] * d[j]).sum())
    theta = math.acos(ab / math.sqrt(aa * bb))  # far from colinear: the spherical branch
    slerp = (math.sin(0.7 * theta) / math.sin(theta), math.sin(0.3 * theta) / math.sin(theta))
    norms = [math.sqrt(v) for v in s[:3]]
    cos = [s[3] / (norms[0] * norms[1]), s[4] / (norms[0] * norms[2]), s[5] / (norms[1] * norms[2])]
    c = min(1.0, max(0.0, sum(cos) / 3))
    # the recipe "cos": whole-model cos and norms, over the small tensor too
    with safe_open(paths["pre"], "pt") as f0, safe_open(paths["a"], "pt") as fa, safe_open(paths["b"], "pt") as fb:
        small = [f.get_tensor("norm.weight").double() for f in (f0, fa, fb)]
    da, db = small[1] - small[0], small[2] - small[0]
    aa, bb, ab = aa + float(da @ da), bb + float(db @ db), ab + float(da @ db)
    model_cos = (ab / math.sqrt(aa * bb), math.sqrt(aa) / math.sqrt(bb))
    return {"slerp": slerp, "model_stock": (3 * c / (1 + 2 * c),), "cos": model_cos}


def check(name: str, out: str, paths: dict[str, str], factors) -> str | None:
    """What is wrong with the output (its first CHECKED entries), or None."""
    rows = CHECKED // COLUMNS
    got = _rows(out, 0, rows)
    if not bool(got.isfinite().all()):
        return "non-finite values"
    pre, a, b, c = (_rows(paths[n], 0, rows) for n in NAMES)
    base = name.removesuffix("@base")
    if base == "ta":
        want = pre + 0.5 * (a - pre) + 0.5 * (b - pre)
    elif base == "slerp":
        want = pre + factors["slerp"][0] * (a - pre) + factors["slerp"][1] * (b - pre)
    elif base == "model_stock":
        t = factors["model_stock"][0]
        want = t * (a + b + c) / 3 + (1 - t) * pre
    elif base == "cos":
        want = pre + factors["cos"][0] * (a - pre) + factors["cos"][1] * (b - pre)
    else:  # random draws, or per-tensor thresholds: finite is what is checked here
        return None
    error = float((got - want).abs().max())
    return f"max error {error:g}" if error > 1e-5 else None


def run_round(names: list[str], paths: dict[str, str], folder: str, source: str, baseline: str | None,
              factors) -> dict[str, Result]:
    results = {}
    for name in names:
        out = os.path.join(folder, f"out-{name.replace('@', '-')}.safetensors")
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        # tvlang from --src (or --baseline-src), run from the checkpoints' folder: with
        # ``python -m`` the working directory comes first on sys.path
        env["PYTHONPATH"] = os.path.abspath(baseline if name.endswith("@base") else source)
        result = measure(command(name, paths, out), env=env, cwd=folder)
        if result.rc == 0:
            problem = check(name, out, paths, factors)
            if problem:
                print(f"  {name}: WRONG output, {problem}", file=sys.stderr)
                result.rc = -1
        else:
            print(f"  {name} failed (exit {result.rc}):\n{result.stderr[-3000:]}", file=sys.stderr)
        if os.path.exists(out):
            os.remove(out)
        results[name] = result
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200.0, help="size of the large tensor (default 200)")
    parser.add_argument("--workdir", default="/tmp/tvlang-bench-pertensor", help="where checkpoints are cached")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (median reported)")
    parser.add_argument("--only", default=",".join(RECIPES), help="contenders (comma-separated)")
    parser.add_argument("--src", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the tvlang source tree the contenders run (default: this checkout)")
    parser.add_argument("--baseline-src", default=None, help="a source tree of another tvlang: adds NAME@base")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown contender {unknown[0]}; choose from {', '.join(RECIPES)}")
    if args.baseline_src:
        names += [f"{n}@base" for n in names if n != "ta"]
    paths = make_checkpoints(args.workdir, args.size_mb)
    folder = os.path.dirname(paths["pre"])
    size = os.path.getsize(paths["pre"])
    print(f"machine: {os.cpu_count()} cores; a tensor of {size / 1e6:.0f} MB per input", flush=True)
    factors = coefficients(paths)
    warm = run_round(names, paths, folder, args.src, args.baseline_src, factors)
    names = [n for n in names if warm[n].rc == 0]
    runs: dict[str, list[Result]] = {n: [] for n in names}
    for index in range(args.repeat):
        for name, result in run_round(names, paths, folder, args.src, args.baseline_src, factors).items():
            if result.rc == 0:
                runs[name].append(result)
                print(f"  round {index + 1}: {name} {result.wall:.2f} s, anon {fmt_bytes(result.peak_anon)}, "
                      f"private {fmt_bytes(result.peak_private)}", file=sys.stderr, flush=True)
    med = {n: median_result(r) for n, r in runs.items() if r}
    ref = med.get("ta")
    print("| contender | wall (median) | runs | peak RssAnon | peak private | private / tensor | vs ta |")
    print("|---|---|---|---|---|---|---|")
    for name, r in med.items():
        walls = ", ".join(f"{w:.1f}" for w in r.extra.get("walls", [r.wall]))
        vs = f"{r.wall / ref.wall:.2f}x" if ref else "-"
        print(f"| {name} | {r.wall:.2f} s | {walls} | {fmt_bytes(r.peak_anon)} | {fmt_bytes(r.peak_private)} "
              f"| {r.peak_private / size:.2f} | {vs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
