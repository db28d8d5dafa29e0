"""Benchmark tvlang's merge operators (ties, dare, dare_ties) end to end against plain task
arithmetic and mergekit.

    python benchmarks/bench_merge.py                          # 1.5 GB checkpoints
    python benchmarks/bench_merge.py --size-gb 0.375 --repeat 3
    python benchmarks/bench_merge.py --only tvlang-ta,tvlang-ties --repeat 1   # a quick look
    python benchmarks/bench_merge.py --methods all --size-gb 0.1 --repeat 1     # every mergekit method
    python benchmarks/bench_merge.py --gradient --size-gb 0.25 --repeat 3       # gradient vs constant

The checkpoints are those of ``bench_run.py`` (a synthetic Llama-shaped float32 base
``pre`` and three fine-tuned copies ``a``, ``b``, ``c``, cached under ``--workdir``, default
/tmp/tvlang-bench, made by the same generator when missing). Contenders, each run in a
fresh process and measured by ``harness.measure``:

- ``tvlang-ta``: plain task arithmetic ``pre + 0.4*(a - pre) + 0.4*(b - pre) + 0.4*(c - pre)``
  (linear over float32 files: the torch-free executor runs it, tvlang.run.direct);
- ``tvlang-ta+torch``: the same with ``TVLANG_DIRECT=0``: the local executor, which imports torch
  as every operator's run does;
- ``tvlang-ties``: ``pre + ties(a - pre, b - pre, c - pre, density=0.2)``;
- ``tvlang-dare``: ``pre + dare(a - pre, 0.9, seed=1) + dare(b - pre, 0.9, seed=2) + dare(c - pre, 0.9, seed=3)``;
- ``tvlang-dare_ties``: ``pre + dare_ties(a - pre, b - pre, c - pre, p=0.9)``;
- ``tvlang-dare_ties_l1``: the same with ``rescale_by="l1"`` (mergekit's ``rescale: true``, its
  dare_ties configs' default: each input's drop scaled back to its L1 norm, found in a pass before
  the main one), checked against the eager evaluation as ``tvlang-della``;
- ``tvlang-ties+torch``, ``tvlang-dare+torch``, ``tvlang-dare_ties+torch``: those three with
  ``TVLANG_DIRECT=0``: the local executor (the torch-free one runs ``ties``, ``breadcrumbs``,
  ``dare`` and unit-weight ``dare_ties`` too, tvlang.run.direct);
- ``tvlang-breadcrumbs``: ``pre + breadcrumbs(a - pre, density=0.2, gamma=0.01) + ...`` over
  ``b`` and ``c`` as well (issue 19: at most 2x plain task arithmetic, as ``ties``);
- ``tvlang-slerp``: ``pre + slerp(a - pre, b - pre, t=0.5) + 0.4*(c - pre)`` and
  ``tvlang-model_stock``: ``model_stock(pre, a, b, c)`` (issue 19: at most 2.5x plain task
  arithmetic; a pass of norms and dot products before the main one);
- ``tvlang-random_like``: ``pre + random_like(a - pre, seed=1) + 0.4*(b - pre) + 0.4*(c - pre)``
  (issue 19: at most 2.5x plain task arithmetic), checked by the noise's norm (that of ``a - pre``);
- ``tvlang-della``: ``pre + della(a - pre, b - pre, c - pre, density=0.2, epsilon=0.1, seed=1)``
  (issue 19: at most 2.5x plain task arithmetic), checked against the eager evaluation of the
  same recipe on each checked tensor (its samples depend on the seed and the tensor's name only);
- ``tvlang-della_l1``: the same with ``rescale_by="l1"`` (mergekit's ``rescale: true``: each input's
  sample scaled back to its L1 norm, found in a pass before the main one), checked the same way;
- ``tvlang-cos``: ``pre + cos(a - pre, b - pre)*(a - pre) + 0.4*(b - pre) + 0.4*(c - pre)``: a
  whole-model reduction pass before the main one (issue 19: flat memory with ``norm``/``cos``);
- ``mergekit-ta``: ``mergekit-yaml`` ``task_arithmetic``, weights 0.4, ``normalize: false``;
- ``mergekit-ties``: ``ties``, weight 1 and density 0.2 per model, ``normalize: true``
  (the sum of the agreeing entries over the number agreeing: tvlang's default ``merge="mean"``);
- ``mergekit-dare_ties``: ``dare_ties``, weight 1 and density 0.1 (p 0.9), ``normalize: true``.

Every contender runs once untimed first (inputs into the page cache; mergekit only with
``--mergekit-warmup``, as a mergekit ``ties`` run at 1.5 GB takes minutes), then
``--repeat`` interleaved rounds (``--mergekit-repeat`` for mergekit). Outputs are checked
on a few tensors against a direct computation: task arithmetic exactly; ties against an
independent sort-based reference (float32 deltas, float64 merge), breadcrumbs likewise (the
entries ranked ``top+1 .. top+keep`` of each delta by a stable sort); dare and dare_ties
entry by entry (each output entry must be ``pre`` plus ``1/(1-p)`` times the sum, or the
mean, of some subset of the three deltas) and by the fraction of entries left unchanged.
mergekit ties is compared with the same reference and the difference reported, not
failed (mergekit keeps exactly ``int(d*n)`` entries, breaking ties by position).

``--methods all`` (or a comma-separated list of mergekit methods) times instead, for each
of mergekit 0.1.5's 20 methods, one mergekit config over the same checkpoints (``METHODS``:
three fine-tunes where the method takes several, ``pre`` as ``base_model`` where it takes
one) run by ``tvlang run config.yml`` (contender ``tvlang:METHOD``) and by ``mergekit-yaml
config.yml`` (``mergekit:METHOD``), one after the other in each round. After each mergekit
run the two outputs are compared on a few tensors (the largest difference is reported, not
failed: random methods draw other masks, and magnitude trimming breaks ties differently on
large tensors), and the summary gives mergekit's wall over tvlang's per method.

``--gradient`` times instead, tvlang only, a merge whose parameter is a per-layer gradient
against the same merge with that parameter constant (``GRADIENT``: ``slerp`` with ``t: [0, 0.5,
1]`` against ``t: 0.5``; ``ties`` with ``density: [0.1, 0.5, 1]`` against ``density: 0.5``),
each a mergekit config run by ``tvlang run config.yml``, and gives the gradient's wall over the
constant one's per merge (issue 14 asks for at most 1.2x).

The table: median wall, throughput (4 x model size read / wall), peak memory (see
harness.py), and ratios against tvlang's plain task arithmetic and mergekit ties.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_run import NAMES, contender_env, make_checkpoints, weights  # noqa: E402
from harness import Result, by_round, fmt_bytes, machine, measure, median_result  # noqa: E402

P = 0.9
DENSITY = 0.2
GAMMA = 0.01
EXPRS = {
    "tvlang-ta": "pre + 0.4*(a - pre) + 0.4*(b - pre) + 0.4*(c - pre)",
    "tvlang-ta+torch": "pre + 0.4*(a - pre) + 0.4*(b - pre) + 0.4*(c - pre)",  # TVLANG_DIRECT=0
    "tvlang-ties": f"pre + ties(a - pre, b - pre, c - pre, density={DENSITY})",
    "tvlang-dare": " + ".join(["pre"] + [f"dare({m} - pre, {P}, seed={i})" for i, m in enumerate("abc", 1)]),
    "tvlang-dare_ties": f"pre + dare_ties(a - pre, b - pre, c - pre, p={P})",
    "tvlang-dare_ties_l1": f'pre + dare_ties(a - pre, b - pre, c - pre, p={P}, rescale_by="l1")',
    "tvlang-ties+torch": f"pre + ties(a - pre, b - pre, c - pre, density={DENSITY})",
    "tvlang-dare+torch": " + ".join(["pre"] + [f"dare({m} - pre, {P}, seed={i})" for i, m in enumerate("abc", 1)]),
    "tvlang-dare_ties+torch": f"pre + dare_ties(a - pre, b - pre, c - pre, p={P})",
    "tvlang-breadcrumbs": " + ".join(["pre"] + [f"breadcrumbs({m} - pre, density={DENSITY}, gamma={GAMMA})"
                                                for m in "abc"]),
    "tvlang-slerp": "pre + slerp(a - pre, b - pre, t=0.5) + 0.4*(c - pre)",
    "tvlang-model_stock": "model_stock(pre, a, b, c)",
    "tvlang-cos": "pre + cos(a - pre, b - pre)*(a - pre) + 0.4*(b - pre) + 0.4*(c - pre)",
    "tvlang-random_like": "pre + random_like(a - pre, seed=1) + 0.4*(b - pre) + 0.4*(c - pre)",
    "tvlang-della": "pre + della(a - pre, b - pre, c - pre, density=0.2, epsilon=0.1, seed=1)",
    "tvlang-della_l1": 'pre + della(a - pre, b - pre, c - pre, density=0.2, epsilon=0.1, seed=1, rescale_by="l1")',
}
MERGEKIT = {
    "mergekit-ta": ("task_arithmetic", "false", {"weight": 0.4}),
    "mergekit-ties": ("ties", "true", {"weight": 1.0, "density": DENSITY}),
    "mergekit-dare_ties": ("dare_ties", "true", {"weight": 1.0, "density": round(1 - P, 6)}),
}
CONTENDERS = tuple(EXPRS) + tuple(MERGEKIT) + tuple(f"{name}@base" for name in EXPRS)
M3 = ("a", "b", "c")
# mergekit method -> (models, base_model pre?, global parameters, parameters of each model)
METHODS = {
    "linear": (M3, False, {}, {"weight": 1.0}),
    "task_arithmetic": (M3, True, {}, {"weight": 0.4}),
    "ties": (M3, True, {"density": DENSITY}, {"weight": 1.0}),
    "dare_ties": (M3, True, {"density": round(1 - P, 6)}, {"weight": 1.0}),
    "dare_linear": (M3, True, {"density": round(1 - P, 6)}, {"weight": 1.0}),
    "breadcrumbs": (M3, True, {"density": 0.9, "gamma": 0.01}, {"weight": 1.0}),
    "breadcrumbs_ties": (M3, True, {"density": 0.9, "gamma": 0.01}, {"weight": 1.0}),
    "della": (M3, True, {"density": 0.1, "epsilon": 0.05}, {"weight": 1.0}),
    "della_linear": (M3, True, {"density": 0.1, "epsilon": 0.05}, {"weight": 1.0}),
    "slerp": (("a", "pre"), True, {"t": 0.3}, {}),
    "nuslerp": (("a", "b"), True, {}, {"weight": 0.5}),
    "multislerp": (M3, True, {}, {"weight": 1.0}),
    "karcher": (M3, False, {}, {}),
    "model_stock": (M3, True, {}, {}),
    "nearswap": (("a", "pre"), True, {"t": 0.005}, {}),
    "arcee_fusion": (("a",), True, {}, {}),
    "sce": (M3, True, {"select_topk": 0.1}, {}),
    "ram": (M3, True, {"epsilon": 0.01}, {}),
    "ramplus_tl": (("a", "b"), True, {"r": 0.5, "alpha": 0.8, "epsilon": 0.008}, {}),
    "passthrough": (("a",), False, {}, {"scale": 0.5}),
}
# tvlang only (--gradient): a per-layer gradient against the same merge with constant
# parameters (issue 14: within 1.2x). name -> (mergekit method, as in METHODS)
GRADIENT = {
    "slerp-gradient": ("slerp", (("a", "pre"), True, {"t": [0, 0.5, 1]}, {})),
    "slerp-constant": ("slerp", (("a", "pre"), True, {"t": 0.5}, {})),
    "ties-gradient": ("ties", (M3, True, {"density": [0.1, 0.5, 1]}, {"weight": 1.0})),
    "ties-constant": ("ties", (M3, True, {"density": 0.5}, {"weight": 1.0})),
}
DEFAULT = "tvlang-ta,tvlang-ties,tvlang-dare,tvlang-dare_ties,mergekit-ta,mergekit-ties"
CHECKED = ("model.norm.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")


def method_config(method: str, paths: dict[str, str], folder: str) -> str:
    """Writes METHODS[method] (or GRADIENT[method]) as a mergekit config; its path."""
    merge, (models, with_base, params, each) = GRADIENT.get(method) or (method, METHODS[method])
    lines = [f"merge_method: {merge}", "dtype: float32"]
    if with_base:
        lines.append(f"base_model: {paths['pre']}")
    if params:
        lines += ["parameters:"] + [f"  {key}: {value}" for key, value in params.items()]
    lines.append("models:")
    for m in models:
        lines.append(f"  - model: {paths[m]}")
        if each:
            lines += ["    parameters:"] + [f"      {key}: {value}" for key, value in each.items()]
    config = os.path.join(folder, f"bench-method-{method}.yml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    return config


def method_cmd(name: str, mergekit: str, paths: dict[str, str], out: str, folder: str) -> list[str]:
    """``tvlang:METHOD``: tvlang run config.yml; ``mergekit:METHOD``: mergekit-yaml config.yml."""
    tool, method = name.split(":")
    config = method_config(method, paths, folder)
    if tool == "tvlang":
        return [sys.executable, "-m", "tvlang", "run", config, "-o", out, "-q"]
    return [mergekit, config, out, "--copy-tokenizer", "--allow-crimes", "--lazy-unpickle"]


def compare_outputs(ours: str, theirs: str) -> str:
    """The largest difference between two outputs on the CHECKED tensors."""
    diffs = []
    for tensor in CHECKED:
        a, b = _output_tensor(ours, tensor), _output_tensor(theirs, tensor)
        diffs.append(float((a.double() - b.double()).abs().max()))
    return f"max |tvlang - mergekit| on {len(CHECKED)} tensors: {max(diffs):.2g}"


def tvlang_cmd(name: str, paths: dict[str, str], out: str) -> list[str]:
    """The command of a tvlang contender; ``NAME@base`` is NAME on the code of --baseline-src."""
    binds = [arg for n in NAMES for arg in ("--bind", f"{n}={paths[n]}")]
    expr = EXPRS[name.removesuffix("@base")]
    return [sys.executable, "-m", "tvlang", "run", "-e", expr, *binds, "-o", out, "-q"]


def mergekit_cmd(name: str, mergekit: str, paths: dict[str, str], out: str, folder: str) -> list[str]:
    method, normalize, params = MERGEKIT[name]
    lines = [f"merge_method: {method}", f"base_model: {paths['pre']}", "parameters:",
             f"  normalize: {normalize}", "dtype: float32", "models:"]
    for m in ("a", "b", "c"):
        lines += [f"  - model: {paths[m]}", "    parameters:"]
        lines += [f"      {key}: {value}" for key, value in params.items()]
    config = os.path.join(folder, f"bench-merge-{name}.yml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    return [mergekit, config, out, "--copy-tokenizer", "--allow-crimes", "--lazy-unpickle"]


# -- checking outputs --------------------------------------------------------------------


def _output_tensor(out: str, name: str):
    from safetensors import safe_open

    index = os.path.join(out, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            file = os.path.join(out, json.load(f)["weight_map"][name])
    else:
        file = next(os.path.join(out, f) for f in sorted(os.listdir(out)) if f.endswith(".safetensors"))
    with safe_open(file, "pt") as got:
        return got.get_tensor(name)


def ties_reference(deltas, density: float):
    """TIES written directly: per input the k = keep_count(density, n) largest |d| found by a
    full stable sort (of entries tied at the k-th, the first in flat order: tvlang's rule), sign
    of the sum (0 elects +), mean of the agreeing."""
    import torch

    from tvlang.ops.common import keep_count

    kept = []
    for d in deltas:
        flat = d.reshape(-1)
        k = keep_count(density, flat.numel())
        if k == 0:
            kept.append(torch.zeros_like(flat, dtype=torch.float64))
            continue
        # exactly k: entries of equal magnitude ranked by flat index, the earlier first (a stable sort)
        top = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[top] = True
        kept.append(torch.where(keep, flat, 0).to(torch.float64))
    stack = torch.stack(kept)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(torch.float64)
    agree = (stack * sign) > 0
    total = (stack * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return (total / count).reshape(deltas[0].shape)


def breadcrumbs_reference(delta, density: float, gamma: float):
    """Breadcrumbs written directly: the entries ranked ``top+1 .. top+keep`` by magnitude in a
    full stable sort (ties by flat index), ``(keep, top)`` as tvlang counts them."""
    import torch

    from tvlang.ops.prune import breadcrumb_counts

    flat = delta.reshape(-1)
    keep, top = breadcrumb_counts(density, gamma, flat.numel(), "floor")
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[top:top + keep]
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[order] = True
    return torch.where(kept, flat, 0).to(torch.float64).reshape(delta.shape)


def model_cosine(paths: dict[str, str]) -> float:
    """The cosine of ``a - pre`` and ``b - pre`` over every floating-point tensor of the models,
    summed in float64 by torch (``tvlang-cos``'s coefficient)."""
    import math

    from safetensors import safe_open

    handles = {n: safe_open(weights(paths[n]), "pt") for n in ("pre", "a", "b")}
    dot = aa = bb = 0.0
    for key in handles["pre"].keys():
        pre = handles["pre"].get_tensor(key)
        if not pre.is_floating_point():
            continue
        da = (handles["a"].get_tensor(key) - pre).double().reshape(-1)
        db = (handles["b"].get_tensor(key) - pre).double().reshape(-1)
        dot, aa, bb = dot + float(da @ db), aa + float(da @ da), bb + float(db @ db)
    return dot / math.sqrt(aa * bb) if aa and bb else 0.0


def geometric_reference(name: str, pre, deltas):
    """``tvlang-slerp``'s or ``tvlang-model_stock``'s tensor in float64, from norms and dot products
    summed by torch in float64 and the formulas of docs/operators.md."""
    import math

    flat = [d.double().reshape(-1) for d in deltas]
    if name.endswith("-slerp"):
        a, b = flat[0], flat[1]
        cos = float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
        theta = math.acos(cos)
        s0, s1 = math.sin(0.5 * theta) / math.sin(theta), math.sin(0.5 * theta) / math.sin(theta)
        moved = s0 * deltas[0].double() + s1 * deltas[1].double() + 0.4 * deltas[2].double()
        return pre.double() + moved
    cosines = [float(flat[i] @ flat[j]) / math.sqrt(float(flat[i] @ flat[i]) * float(flat[j] @ flat[j]))
               for i, j in ((0, 1), (0, 2), (1, 2))]
    c = min(1.0, max(0.0, sum(cosines) / 3))
    t = 3 * c / (1 + 2 * c)
    return pre.double() * (1 - t) + t * sum(pre.double() + d.double() for d in deltas) / 3


def check(name: str, out: str, paths: dict[str, str]) -> tuple[bool, str]:
    """(ok, note) for a contender's output on the CHECKED tensors."""
    import torch
    from safetensors import safe_open

    handles = {n: safe_open(weights(paths[n]), "pt") for n in NAMES}
    notes, ok = [], True
    cosine = model_cosine(paths) if name.endswith("-cos") else None
    for tensor in CHECKED:
        got = _output_tensor(out, tensor)
        pre, a, b, c = (handles[n].get_tensor(tensor) for n in NAMES)
        deltas = [a - pre, b - pre, c - pre]  # float32, as the evaluator computes them
        if name.endswith(("-ta", "-ta+torch")):
            expected = pre + 0.4 * deltas[0] + 0.4 * deltas[1] + 0.4 * deltas[2]
            err = float((got - expected).abs().max())
            ok &= err <= 1e-5
            notes.append(f"{tensor}: max err {err:.2g}")
        elif name.endswith("-random_like"):
            noise = got.double() - (pre.double() + 0.4 * deltas[1].double() + 0.4 * deltas[2].double())
            want = float(deltas[0].double().norm())
            err = abs(float(noise.norm()) - want) / want
            ok &= err <= 1e-4
            notes.append(f"{tensor}: noise norm off by {err:.2g} (relative)")
        elif name.endswith(("-della", "-della_l1", "-dare_ties_l1")):
            import tvlang

            eager = tvlang.compile(EXPRS[name]).evaluate({n: {tensor: t} for n, t in zip(NAMES, (pre, a, b, c))})
            err = float((got - eager[tensor]).abs().max())
            ok &= bool(torch.equal(got, eager[tensor]))
            notes.append(f"{tensor}: max diff to the eager evaluation {err:.2g}")
        elif name.endswith("-cos"):
            expected = pre + cosine * deltas[0] + 0.4 * deltas[1] + 0.4 * deltas[2]
            err = float((got - expected).abs().max())
            ok &= err <= 1e-5
            notes.append(f"{tensor}: max err {err:.2g}")
        elif name.endswith(("-slerp", "-model_stock")):
            expected = geometric_reference(name, pre, deltas)
            err = float((got.double() - expected).abs().max())
            ok &= err <= 1e-5
            notes.append(f"{tensor}: max err {err:.2g}")
        elif name.endswith("-breadcrumbs"):
            expected = pre.double() + sum(breadcrumbs_reference(d, DENSITY, GAMMA) for d in deltas)
            err = float((got.double() - expected).abs().max())
            ok &= err <= 1e-5
            notes.append(f"{tensor}: max err {err:.2g}")
        elif name.endswith(("-ties", "-ties+torch")):
            expected = pre.double() + ties_reference(deltas, DENSITY)
            diff = (got.double() - expected).abs()
            err, frac = float(diff.max()), float((diff > 1e-6).double().mean())
            if name.startswith("tvlang"):
                ok &= err <= 1e-5
            notes.append(f"{tensor}: max err {err:.2g}, entries off by >1e-6: {frac:.2%}")
        else:  # dare (sum of kept) or dare_ties (mean of kept): one of the subset values per entry
            scale = 1.0 / (1.0 - P)
            moved = got.double() - pre.double()
            candidates = [torch.zeros_like(moved)]
            for size in (1, 2, 3):
                for subset in itertools.combinations(deltas, size):
                    total = sum(d.double() for d in subset) * scale
                    candidates.append(total if name.endswith(("-dare", "-dare+torch")) else total / size)
            err = float(torch.stack([(moved - c).abs() for c in candidates]).min(0).values.max())
            unchanged = float((moved == 0).double().mean())
            # three independent keeps of probability 1-p: an entry moves unless all three drop
            # (dare_ties can also cancel to 0 only on exact ties, which random data has none of)
            expect = P ** 3
            if name.startswith("tvlang"):  # mergekit's masks are its own: reported, not failed
                ok &= err <= 1e-5 and (got.numel() < 10000 or abs(unchanged - expect) < 0.01)
            notes.append(f"{tensor}: max err to nearest subset {err:.2g}, unchanged {unchanged:.3f} "
                         f"(expected {expect:.3f})")
    return ok, "; ".join(notes)


# -- the driver -------------------------------------------------------------------------------


def run_one(name: str, paths: dict[str, str], folder: str, args, verbose: bool) -> Result | None:
    out = os.path.join(folder, f"out-merge-{name.replace(':', '-')}")
    if ":" in name:
        return run_method(name, paths, folder, out, args)
    if name.startswith("mergekit"):
        if not args.mergekit:
            return None
        cmd = mergekit_cmd(name, args.mergekit, paths, out, folder)
    else:
        cmd = tvlang_cmd(name, paths, out)
    shutil.rmtree(out, ignore_errors=True)
    if name.endswith("@base") and not args.baseline_src:
        return None
    result = measure(cmd, env=contender_env(name, args),
                     cwd=folder)  # not a folder holding a tvlang package: --baseline-src's would lose
    if result.rc == 0:
        good, note = check(name.removesuffix("@base"), out, paths)
        if verbose or not good:
            print(f"  {name}: {'ok' if good else 'WRONG'}: {note}", file=sys.stderr, flush=True)
        if not good:
            result.rc = -1
    else:
        print(f"  {name} failed (exit {result.rc}):\n{result.stderr[-3000:]}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    return result


def run_method(name: str, paths: dict[str, str], folder: str, out: str, args) -> Result | None:
    """A ``tool:METHOD`` contender. tvlang's output stays until mergekit's of the same method
    has run (they are compared), then both go."""
    if name.startswith("mergekit") and not args.mergekit:
        return None
    shutil.rmtree(out, ignore_errors=True)
    result = measure(method_cmd(name, args.mergekit, paths, out, folder), env=contender_env(name, args),
                     cwd=folder)  # not a folder holding a tvlang package: --baseline-src's would lose
    if result.rc != 0:
        print(f"  {name} failed (exit {result.rc}):\n{result.stderr[-3000:]}", file=sys.stderr)
    ours = os.path.join(folder, f"out-merge-tvlang-{name.split(':')[1]}")
    if name.split(":")[1] in GRADIENT:  # tvlang only: nothing to compare with
        shutil.rmtree(out, ignore_errors=True)
    elif name.startswith("mergekit"):
        if result.rc == 0 and os.path.isdir(ours):
            print(f"  {name.split(':')[1]}: {compare_outputs(ours, out)}", file=sys.stderr, flush=True)
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return result


def bench(names: list[str], paths: dict[str, str], folder: str, args) -> dict[str, Result]:
    runs: dict[str, list[Result]] = {n: [] for n in names}
    for name in names:  # warm-up, checked and reported
        if name.startswith("mergekit") and not args.mergekit_warmup:
            continue
        result = run_one(name, paths, folder, args, verbose=True)
        if result is None or result.rc != 0:
            runs.pop(name)
        else:
            print(f"  warm-up: {name} {result.wall:.2f} s", file=sys.stderr, flush=True)
    for index in range(max(args.repeat, args.mergekit_repeat)):
        for name in list(runs):
            limit = args.mergekit_repeat if name.startswith("mergekit") else args.repeat
            if index >= limit:
                continue
            result = run_one(name, paths, folder, args, verbose=not runs[name] and name.startswith("mergekit"))
            if result is None:
                print(f"  {name}: skipped (mergekit-yaml not found)", file=sys.stderr)
                runs.pop(name)
            elif result.rc == 0:
                runs[name].append(result)
                print(f"  round {index + 1}: {name} {result.wall:.2f} s, anon {fmt_bytes(result.peak_anon)}",
                      file=sys.stderr, flush=True)
    return {n: median_result(r) for n, r in runs.items() if r}


def table(results: dict[str, Result], size_gb: float) -> str:
    head = ("| contender | wall (median) | runs | input MB/s | peak RSS | peak RssAnon | peak private "
            "| vs tvlang-ta | vs tvlang-ta+torch | vs tvlang-ties | vs mergekit-ties |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]

    def ratio(r: Result, other: str) -> str:
        return f"{r.wall / results[other].wall:.2f}x" if other in results else "-"

    for name, r in results.items():
        mbps = 4 * size_gb * 1e9 / 1e6 / r.wall
        walls = ", ".join(f"{w:.1f}" for w in r.extra.get("walls", [r.wall]))
        lines.append(f"| {name} | {r.wall:.2f} s | {walls} | {mbps:.0f} | {fmt_bytes(r.peak_rss)} | "
                     f"{fmt_bytes(r.peak_anon)} | {fmt_bytes(r.peak_private)} | {ratio(r, 'tvlang-ta')} | "
                     f"{ratio(r, 'tvlang-ta+torch')} | {ratio(r, 'tvlang-ties')} | {ratio(r, 'mergekit-ties')} |")
    return "\n".join(lines)


def round_ratios(results: dict[str, Result], reference: str = "tvlang-ta") -> str:
    """Each contender's wall over ``reference``'s round by round, and their median (``by_round``),
    where both ran every round."""
    if reference not in results:
        return ""
    base = results[reference].extra.get("walls", [])
    lines = [f"{name} / {reference} by round: {text}" for name, r in results.items() if name != reference
             for text in [by_round(r.extra.get("walls", []), base)] if text]
    return "\n".join(lines)


def method_ratios(results: dict[str, Result]) -> str:
    """Per method: tvlang's and mergekit's median walls and mergekit's over tvlang's."""
    lines = ["| method | tvlang run | mergekit-yaml | mergekit / tvlang |", "|---|---|---|---|"]
    for method in METHODS:
        ours, theirs = results.get(f"tvlang:{method}"), results.get(f"mergekit:{method}")
        if ours and theirs:
            lines.append(f"| {method} | {ours.wall:.2f} s | {theirs.wall:.2f} s | {theirs.wall / ours.wall:.2f}x |")
    return "\n".join(lines)


def gradient_ratios(results: dict[str, Result]) -> str:
    """Per merge in GRADIENT: the gradient's median wall over the constant one's (the issue: at most 1.2)."""
    lines = ["| merge | gradient | constant | gradient / constant |", "|---|---|---|---|"]
    for name in GRADIENT:
        if name.endswith("-gradient"):
            merge = name.removesuffix("-gradient")
            ours, flat = results.get(f"tvlang:{name}"), results.get(f"tvlang:{merge}-constant")
            if ours and flat:
                lines.append(f"| {merge} | {ours.wall:.2f} s | {flat.wall:.2f} s | {ours.wall / flat.wall:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.5, help="size of each checkpoint (default 1.5)")
    parser.add_argument("--workdir", default="/tmp/tvlang-bench", type=os.path.abspath,
                        help="where checkpoints are cached")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tvlang contender (median)")
    parser.add_argument("--mergekit-repeat", type=int, default=1, help="timed runs per mergekit contender")
    parser.add_argument("--mergekit-warmup", action="store_true", help="an untimed mergekit run first")
    parser.add_argument("--only", default=DEFAULT, help=f"contenders (comma-separated) among {', '.join(CONTENDERS)}")
    parser.add_argument("--methods", default=None,
                        help=f"'all' or mergekit methods (comma-separated) among {', '.join(METHODS)}: "
                             "tvlang:METHOD and mergekit:METHOD contenders instead of --only")
    parser.add_argument("--gradient", action="store_true",
                        help=f"instead of --only: tvlang run of each of {', '.join(GRADIENT)} (a per-layer "
                             "gradient and the same merge with constant parameters), and the ratio of each pair")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), type=os.path.abspath,
                        help="path of mergekit-yaml")
    parser.add_argument("--baseline-src", default=None,
                        help="a source checkout of another tvlang (git worktree add DIR COMMIT): contenders "
                             "NAME@base run NAME on its code, alternately with the current code")
    args = parser.parse_args(argv)
    if args.methods:
        methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown method {unknown[0]}; choose from all, {', '.join(METHODS)}")
        only = [f"{tool}:{m}" for m in methods for tool in ("tvlang", "mergekit")]
    elif args.gradient:
        only = [f"tvlang:{name}" for name in GRADIENT]
    else:
        only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CONTENDERS and ":" not in c]
    if unknown:
        parser.error(f"unknown contender {unknown[0]}; choose from {', '.join(CONTENDERS)}")
    os.makedirs(args.workdir, exist_ok=True)
    print(f"machine: {machine()}; checkpoints of {args.size_gb:g} GB", flush=True)
    for name in only:
        if ":" not in name:
            print(f"  {name}: {EXPRS.get(name.removesuffix('@base')) or MERGEKIT[name]}", flush=True)
    paths = make_checkpoints(args.workdir, args.size_gb)
    results = bench(only, paths, os.path.dirname(paths["pre"]), args)
    print(table(results, args.size_gb))
    print(round_ratios(results))
    if args.methods:
        print(method_ratios(results))
    if args.gradient:
        print(gradient_ratios(results))
    for name, result in results.items():
        if name.endswith("@base") and name.removesuffix("@base") in results:
            current = results[name.removesuffix("@base")]
            print(f"{name.removesuffix('@base')} / {name}: {current.wall / result.wall:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
