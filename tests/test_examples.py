"""Every recipe in examples/ runs, as the README says, against generated checkpoints.

The fixture copies examples/*.tv next to freshly generated checkpoints (recipes
load paths relative to themselves: ``checkpoints/t5-base``) and runs each with
``tvlang run RECIPE -o OUT``; outputs are compared with eager computations from
the generator's own state dicts.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvlang.faces.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = sorted(p.name for p in EXAMPLES.glob("*.tv"))


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"tvlang_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    for recipe in RECIPES:
        shutil.copy(EXAMPLES / recipe, root / recipe)
    assert _module("make_checkpoints").main(["--out", str(root / "checkpoints"), "-q"]) == 0
    return root


@pytest.fixture(scope="module")
def models():
    return _module("make_checkpoints").build()


def test_the_generator_writes_small_hf_directories(workdir, models):
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert names == sorted(models) and "t5-base" in names and "t5-amazon-sent" in names
    total = sum(f.stat().st_size for f in (workdir / "checkpoints").rglob("*") if f.is_file())
    assert total < 5 * 2**20
    config = json.loads((workdir / "checkpoints" / "t5-base" / "config.json").read_text())
    assert config["model_type"] == "t5"
    saved = load_file(workdir / "checkpoints" / "t5-yelp-lm" / "model.safetensors")
    assert torch.equal(saved["shared.weight"], models["t5-yelp-lm"]["shared.weight"])


def test_the_generator_is_deterministic(models):
    again = _module("make_checkpoints").build()
    assert all(torch.equal(again["t5-toxic"][k], models["t5-toxic"][k]) for k in models["t5-toxic"])


def test_there_is_a_recipe_for_each_edit():
    assert {"yelp_analogy.tv", "forget.tv", "forget_random.tv", "multitask.tv"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_example_runs(workdir, recipe, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(workdir / recipe), "-o", str(out), "-q"]) == 0
    tensors = load_file(out / "model.safetensors")
    assert len(tensors) == 48 and all(torch.isfinite(t).all() for t in tensors.values())
    assert (out / "config.json").exists()  # the base's config comes along


def _run(workdir, recipe, tmp_path, *extra):
    out = tmp_path / recipe.replace(".tv", "")
    assert main(["run", str(workdir / recipe), "-o", str(out), "-q", *extra]) == 0
    return load_file(out / "model.safetensors")


def test_yelp_analogy_matches_an_eager_computation(workdir, models, tmp_path):
    got = _run(workdir, "yelp_analogy.tv", tmp_path)
    pre, yl, al, asent = (models[n] for n in ("t5-base", "t5-yelp-lm", "t5-amazon-lm", "t5-amazon-sent"))
    for key in pre:
        expected = pre[key] + 0.4 * ((yl[key] - pre[key]) - (al[key] - pre[key])) + 0.7 * (asent[key] - pre[key])
        torch.testing.assert_close(got[key], expected, rtol=1e-5, atol=1e-6)


def test_analogy_with_unit_coefficients_reaches_the_held_out_model(workdir, models, tmp_path):
    got = _run(workdir, "yelp_analogy.tv", tmp_path, "--set", "lm=1", "--set", "sent=1")
    for key, tensor in models["t5-yelp-sent"].items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-6)


def test_forget_and_multitask_match_eager_computations(workdir, models, tmp_path):
    pre = models["t5-base"]
    forget = _run(workdir, "forget.tv", tmp_path, "--set", "lam=0.8")
    multi = _run(workdir, "multitask.tv", tmp_path)
    for key in pre:
        torch.testing.assert_close(forget[key], pre[key] - 0.8 * (models["t5-toxic"][key] - pre[key]),
                                   rtol=1e-5, atol=1e-6)
        tasks = sum(models[f"t5-task-{t}"][key] - pre[key] for t in "abcd")
        torch.testing.assert_close(multi[key], pre[key] + 0.4 * tasks, rtol=1e-5, atol=1e-6)


def test_random_baseline_has_the_task_vectors_norm_per_tensor(workdir, models, tmp_path):
    got = _run(workdir, "forget_random.tv", tmp_path)
    pre, toxic = models["t5-base"], models["t5-toxic"]
    for key in pre:
        moved = got[key] - pre[key]
        torch.testing.assert_close(moved.norm(), 0.5 * (toxic[key] - pre[key]).norm(), rtol=1e-4, atol=1e-7)
        assert not torch.allclose(moved, -0.5 * (toxic[key] - pre[key]))


def test_lambda_sweep_example(workdir, capsys):
    sweep = _module("lambda_sweep")
    assert sweep.main([str(workdir / "checkpoints")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "lam   distance to t5-yelp-sent"
    distances = {float(l.split()[0]): float(l.split()[1]) for l in lines[1:]}
    assert distances[1.0] == 0.0  # the analogy is exact on these checkpoints
    assert distances[0.0] > distances[0.5] > distances[1.0]
    assert distances[0.5] == pytest.approx(distances[0.0] / 2, rel=1e-3)


def test_the_generator_takes_the_directory_as_an_argument(tmp_path, capsys):
    generator = _module("make_checkpoints")
    assert generator.main([str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out == f"wrote 11 checkpoints (2.1 MiB) to {tmp_path / 'a'}\n"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(generator.build())
