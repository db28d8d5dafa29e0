"""The digits reproduction (examples/digits), end to end in its --quick form.

One run of ``python -m examples.digits --quick`` (train, write checkpoints, make every edit
with tvlang recipes, write the report) is shared by the tests below, which check the files
it wrote, recompute its edits with plain torch, and check the paper's first claim: negating
a task vector lowers target accuracy more than a random vector of the same norm does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import tvlang  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICK_TASKS = ["rot90", "hflip", "invert", "permute"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    docs, work = root / "docs", root / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "examples.digits", "--quick", "--out", str(docs), "--work", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    return {"docs": docs, "work": work, "results": results, "stdout": proc.stdout}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_checkpoints_written(run):
    work = run["work"]
    names = ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias"]
    pre = _weights(work / "pre")
    assert sorted(pre) == sorted(names)
    assert pre["body.0.weight"].shape == (256, 64) and pre["head.weight"].shape == (10, 256)
    for task in QUICK_TASKS + ["rot270", "rot90_invert", "rot270_invert", "rot90_low", "rot270_high"]:
        ft = _weights(work / "ft" / task)
        assert json.loads((work / "ft" / task / "config.json").read_text())["task"] == task
        # the head is frozen in fine-tuning: identical in every checkpoint
        assert torch.equal(ft["head.weight"], pre["head.weight"])
        assert not torch.equal(ft["body.0.weight"], pre["body.0.weight"])


def test_report_and_figures_written(run):
    text = (run["docs"] / "digits.md").read_text()
    assert "<!-- BEGIN GENERATED RESULTS" in text and "<!-- END GENERATED RESULTS -->" in text
    assert "### Forgetting via negation" in text and "**average**" in text
    for name in ("forgetting", "addition_pairs", "addition_subsets", "analogies"):
        png = run["docs"] / "figures" / f"digits_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"figures/digits_{name}.png" in text


def test_training_worked(run):
    r = run["results"]
    for task in QUICK_TASKS:
        f = r["forgetting"][task]
        assert f["pretrained"]["test"]["control"] > 0.85  # pre-trained on plain digits
        assert f["finetuned"]["test"]["target"] > 0.7  # quick: 120 steps
        assert f["finetuned"]["test"]["target"] > f["pretrained"]["test"]["target"] + 0.3


def test_negation_forgets_more_than_random(run):
    r = run["results"]["forgetting"]
    at_one = {}
    for task in QUICK_TASKS:
        neg = {p["lam"]: p["test"]["target"] for p in r[task]["negation_curve"]}
        rnd = {p["lam"]: p["test"]["target"] for p in r[task]["random_curve"]}
        assert neg[0.0] == rnd[0.0] == r[task]["pretrained"]["test"]["target"]  # lam 0: the pre-trained model
        at_one[task] = (neg[1.0], rnd[1.0])
    mean_neg = sum(n for n, _ in at_one.values()) / len(at_one)
    mean_rnd = sum(x for _, x in at_one.values()) / len(at_one)
    assert mean_neg < mean_rnd - 0.05, at_one
    # The chosen lam keeps the control accuracy (validation) at >= 95% of the pre-trained model's.
    for task in QUICK_TASKS:
        chosen = r[task]["negation"]
        assert chosen["val"]["control"] >= 0.95 * r[task]["pretrained"]["val"]["control"]


def test_forget_checkpoint_is_the_recipe(run):
    """The edited checkpoint that plan.run wrote equals pre - lam*(ft - pre) computed here."""
    work, r = run["work"], run["results"]["forgetting"]
    pre = _weights(work / "pre")
    recipe = (REPO / "examples" / "digits" / "recipes" / "forget.tv").read_text()
    for task in QUICK_TASKS:
        lam = r[task]["negation"]["lam"]
        ft = _weights(work / "ft" / task)
        out = work / "edited" / f"forget_{task}"
        got = _weights(out)
        for name, p in pre.items():
            torch.testing.assert_close(got[name], p - lam * (ft[name] - p), rtol=0, atol=1e-6)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["tvlang.recipe"] == recipe
        assert json.loads(meta["tvlang.params"])["lam"] == lam
        assert json.loads((out / "config.json").read_text())["hidden"] == 256  # copied from the base


def test_addition_and_analogy_checkpoints_are_the_recipes(run):
    work, r = run["work"], run["results"]
    pre = _weights(work / "pre")
    subsets = r["addition"]["subsets"]
    assert len(subsets) == 2 ** len(QUICK_TASKS) - 1
    everything = subsets[-1]
    assert everything["tasks"] == QUICK_TASKS
    fts = {t: _weights(work / "ft" / t) for t in QUICK_TASKS}
    got = _weights(work / "edited" / "add_all")
    for name, p in pre.items():
        want = p + everything["lam"] * sum(fts[t][name] - p for t in QUICK_TASKS)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    for x in subsets:
        assert 0.0 <= x["test_normalized_all"] <= 1.5
    # The same with one frozen head per task: every checkpoint carries every head, unchanged.
    heads = work / "per_task_heads"
    pre_h = _weights(heads / "pre")
    assert {f"heads.{t}.weight" for t in QUICK_TASKS} <= set(pre_h)
    assert torch.equal(pre_h["body.0.weight"], pre["body.0.weight"])  # the same pre-trained backbone
    fts_h = {t: _weights(heads / "ft" / t) for t in QUICK_TASKS}
    for t, ft in fts_h.items():
        for name in pre_h:
            assert torch.equal(ft[name], pre_h[name]) == (not name.startswith("body.")), (t, name)
    lam = r["addition_per_task_heads"]["subsets"][-1]["lam"]
    got = _weights(heads / "edited" / "add_all")
    for name, p in pre_h.items():
        want = p + lam * sum(fts_h[t][name] - p for t in QUICK_TASKS)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    for kind in ("subpopulation", "inversion"):
        targets = r["analogy"][kind]["targets"]
        assert len(targets) == 4
        for t in targets:
            a, b, c = (_weights(work / "ft" / t[k]) for k in ("a", "b", "c"))
            got = _weights(Path(t["checkpoint"]))
            lam = t["analogy"]["lam"]
            for name, p in pre.items():
                want = p + lam * ((c[name] - p) + (b[name] - a[name]))
                torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def test_random_baseline_has_the_task_vectors_norm(run):
    work = run["work"]
    bindings = {"pre": str(work / "pre"), "ft": str(work / "ft" / "hflip")}
    tau = tvlang.compile("ft - pre").evaluate(bindings)
    rnd = tvlang.compile("random_like(ft - pre, seed=0)").evaluate(bindings)
    for name, t in tau.items():
        assert torch.linalg.vector_norm(rnd[name]).item() == pytest.approx(torch.linalg.vector_norm(t).item(), rel=1e-5)
        if t.abs().sum() > 0:
            cos = torch.nn.functional.cosine_similarity(rnd[name].flatten(), t.flatten(), dim=0)
            assert abs(cos.item()) < 0.2  # a random direction, not the task vector


def test_analogy_corners(run):
    """D = C + (B - A): C shares D's row, B shares D's column, A is the opposite corner."""
    targets = {t["target"]: t for t in run["results"]["analogy"]["subpopulation"]["targets"]}
    assert (targets["rot90_high"]["c"], targets["rot90_high"]["b"], targets["rot90_high"]["a"]) == (
        "rot90_low",
        "rot270_high",
        "rot270_low",
    )
    targets = {t["target"]: t for t in run["results"]["analogy"]["inversion"]["targets"]}
    assert (targets["rot270_invert"]["c"], targets["rot270_invert"]["b"], targets["rot270_invert"]["a"]) == (
        "rot270",
        "rot90_invert",
        "rot90",
    )


def test_forgetting_lambda_rule(monkeypatch):
    """The documented rule: lowest validation target accuracy among the lambdas keeping
    validation control >= 95% of the pre-trained model's; ties go to the larger lambda."""
    monkeypatch.syspath_prepend(str(REPO))
    from examples.digits.experiment import _select_forget

    def point(lam, target, control):
        return {"lam": lam, "val": {"target": target, "control": control}}

    curve = [point(0.0, 0.40, 0.90), point(0.5, 0.20, 0.86), point(0.75, 0.20, 0.856), point(1.0, 0.10, 0.80)]
    # 0.95 * 0.90 = 0.855: lam 1.0 loses too much control; 0.5 and 0.75 tie on target.
    assert _select_forget(curve, 0.90, 0.95)["lam"] == 0.75
    assert _select_forget(curve, 0.90, 0.80)["lam"] == 1.0
    assert _select_forget(curve[:1], 0.90, 0.95)["lam"] == 0.0


def test_every_recipe_file_compiles():
    recipes = sorted((REPO / "examples" / "digits" / "recipes").glob("*.tv"))
    assert [p.name for p in recipes] == ["add_three.tv", "analogy.tv", "forget.tv", "forget_random.tv"]
    for path in recipes:
        plan = tvlang.compile(path.read_text(), filename=str(path))
        assert plan.outputs == ["out"] and plan.output_kind("out") == "model", path
    add = tvlang.compile((REPO / "examples/digits/recipes/add_three.tv").read_text())
    assert set(add.sources_read()) == {"pre", "rot90", "hflip", "invert"}


def test_a_run_writes_its_report_into_the_work_directory_unless_told():
    """Issue 13: a plain run rewrote the tracked docs/digits.md and its figures."""
    from examples.digits.run import REPO, build_parser, report_dir

    assert report_dir(build_parser().parse_args([])) == REPO / "examples" / "checkpoints" / "digits" / "report"
    assert report_dir(build_parser().parse_args(["--work", "/tmp/w"])) == Path("/tmp/w/report")
    assert report_dir(build_parser().parse_args(["--update-docs"])) == REPO / "docs"
    assert report_dir(build_parser().parse_args(["--out", "/tmp/o"])) == Path("/tmp/o")
