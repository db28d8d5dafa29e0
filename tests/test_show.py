"""tvlang show, and a recipe with Hub ids that travels: the same bytes from another checkout with the same cache."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import tvlang
from test_hub import model_dir, offline_cache
from tvlang.faces.cli import main
from tvlang.testing.hub import copy_model, write_repo

RECIPE = ('# forget what ft learned, keep a little of other\npre = load("hf:org/base")\n'
          'ft = load("hf:org/ft@v2") - pre\nother = load("hf:org/other/sub") - pre\n'
          "param lam = 0.5\nparam mu = 0.25\nout = pre - lam*ft + mu*other\n")


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("TVLANG_CACHE_DIR", str(tmp_path / "tvlang-cache"))
    cache = offline_cache(monkeypatch, tmp_path / "hub-cache")
    local = tmp_path / "local"
    commits = {
        "base": write_repo(cache, "org/base", copy_model(model_dir(local / "base", 0, readme="# base\n"))),
        "ft": write_repo(cache, "org/ft", copy_model(model_dir(local / "ft", 1)), revision="v2"),
        "other": write_repo(cache, "org/other", copy_model(model_dir(local / "other", 2), "sub/")),
    }
    checkout = tmp_path / "checkout-a"
    checkout.mkdir()
    (checkout / "merge.tv").write_text(RECIPE)
    return {"tmp": tmp_path, "commits": commits, "checkout": checkout}


def files_of(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_a_recipe_with_hub_ids_travels_to_a_byte_identical_output(world, monkeypatch):
    a, b = world["checkout"], world["tmp"] / "elsewhere" / "checkout-b"
    b.mkdir(parents=True)
    shutil.copy(a / "merge.tv", b / "merge.tv")
    monkeypatch.chdir(a)  # run from inside one checkout, and from above the other
    assert main(["run", "merge.tv", "-o", str(world["tmp"] / "out-a"), "-q"]) == 0
    monkeypatch.chdir(world["tmp"])
    assert main(["run", str(b / "merge.tv"), "-o", str(world["tmp"] / "out-b"), "-q"]) == 0
    out_a, out_b = files_of(world["tmp"] / "out-a"), files_of(world["tmp"] / "out-b")
    assert sorted(out_a) == ["README.md", "config.json", "model.safetensors"]
    assert out_a == out_b  # weights, metadata, config and card: every byte
    # locked in one checkout, the lock travels with the recipe and the output is the same again
    assert main(["lock", str(a / "merge.tv"), "-q"]) == 0
    shutil.copy(a / "merge.tv.lock", b / "merge.tv.lock")
    assert main(["run", str(a / "merge.tv"), "--locked", "-o", str(world["tmp"] / "locked-a"), "-q"]) == 0
    assert main(["run", str(b / "merge.tv"), "--locked", "-o", str(world["tmp"] / "locked-b"), "-q"]) == 0
    assert files_of(world["tmp"] / "locked-a") == files_of(world["tmp"] / "locked-b")
    assert files_of(world["tmp"] / "locked-a")["model.safetensors"] != out_a["model.safetensors"]  # + tvlang.lock


def test_show_prints_the_recipe_inputs_params_and_producer(world, capsys):
    out = world["tmp"] / "out"
    assert main(["run", str(world["checkout"] / "merge.tv"), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["show", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    commits = world["commits"]
    assert info == {
        "output": "out", "kind": "model", "recipe": RECIPE, "params": {"lam": 0.5, "mu": 0.25},
        "inputs": {"pre": f"hf:org/base@{commits['base']}", 'load("hf:org/ft@v2")': f"hf:org/ft@{commits['ft']}",
                   'load("hf:org/other/sub")': f"hf:org/other@{commits['other']}/sub"},
        "lock": None, "tvlang_version": tvlang.__version__, "producer": f"tvlang {tvlang.__version__}",
    }
    assert main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"output:   out (a model)\nproducer: tvlang {tvlang.__version__}\n"
                           "params:   lam = 0.5, mu = 0.25\ninputs:\n")
    assert f"""  load("hf:org/other/sub")  hf:org/other@{commits['other']}/sub\n""" in text
    assert f"""  pre                       hf:org/base@{commits['base']}\n""" in text
    assert "recipe:\n  # forget what ft learned, keep a little of other\n  pre = load(\"hf:org/base\")\n" in text


def test_show_recipe_round_trips(world, capsys, tmp_path):
    out = world["tmp"] / "out"
    assert main(["run", str(world["checkout"] / "merge.tv"), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["show", str(out), "--recipe"]) == 0
    captured = capsys.readouterr()
    assert captured.out == RECIPE and captured.err == ""
    again = tmp_path / "again" / "r.tv"
    again.parent.mkdir()
    again.write_text(captured.out)
    assert main(["run", str(again), "-o", str(world["tmp"] / "out-again"), "-q"]) == 0
    assert files_of(world["tmp"] / "out-again") == files_of(out)
    # a param set on the command line is said, as the --set to give again
    assert main(["run", str(again), "--set", "mu=-0.5", "-o", str(world["tmp"] / "set"), "-q"]) == 0
    capsys.readouterr()
    assert main(["show", str(world["tmp"] / "set"), "--recipe"]) == 0
    captured = capsys.readouterr()
    assert captured.out == RECIPE
    assert captured.err == "note: this output was made with --set mu=-0.5; run the recipe with the same\n"


def test_show_a_locked_task_vector_file_and_a_sharded_output(world, capsys):
    recipe = world["checkout"] / "tau.tv"
    recipe.write_text('out = load("hf:org/ft@v2") - load("hf:org/base")\n')
    assert main(["lock", str(recipe), "-q"]) == 0
    tau = world["tmp"] / "tau.safetensors"
    assert main(["run", str(recipe), "--locked", "-o", str(tau), "-q"]) == 0
    capsys.readouterr()
    assert main(["show", str(tau), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    lock = json.loads((world["checkout"] / "tau.tv.lock").read_text())
    assert info["kind"] == "delta" and info["lock"] == {
        key: {name: entry["sha256"] for name, entry in value["files"].items()} for key, value in lock["inputs"].items()}
    sharded = world["tmp"] / "sharded"
    assert main(["run", str(world["checkout"] / "merge.tv"), "-o", str(sharded), "--shard-size", "60", "-q"]) == 0
    assert "model.safetensors.index.json" in os.listdir(sharded)
    capsys.readouterr()
    assert main(["show", str(sharded), "--recipe"]) == 0
    assert capsys.readouterr().out == RECIPE


def test_show_errors(world, capsys):
    plain = world["tmp"] / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    assert main(["show", str(plain)]) == 1
    err = capsys.readouterr().err
    assert f"error: {plain}: no tvlang metadata (tvlang.recipe is missing): it was not written by tvlang" in err
    assert main(["show", str(world["tmp"] / "nowhere")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: a usage error
        main(["show", str(plain), "--json", "--recipe"])
    assert exit_info.value.code == 2 and "not allowed with argument --json" in capsys.readouterr().err


def test_explain_of_an_output_explains_the_recipe_it_recorded_with_its_params(tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from tvlang.faces.cli import main

    monkeypatch.chdir(tmp_path)
    save_file({"w": torch.zeros(2)}, "pre.safetensors")
    save_file({"w": torch.ones(2)}, "ft.safetensors")
    (tmp_path / "r.tv").write_text('pre = load("pre.safetensors")\nft = load("ft.safetensors")\n'
                                  "param c = 0.5\nout = pre + c*(ft - pre)\n")
    assert main(["run", "r.tv", "-o", "merged.safetensors", "--set", "c=0.25", "-q"]) == 0
    capsys.readouterr()
    assert main(["explain", "merged.safetensors"]) == 0
    from_output = capsys.readouterr().out
    assert main(["explain", "r.tv", "--set", "c=0.25"]) == 0
    assert from_output == capsys.readouterr().out  # the same plan: recipe and params as they ran
    assert "  b0 *= 0.75\n" in from_output and "  b0 += 0.25 * b1\n" in from_output
    assert main(["explain", "merged.safetensors", "--set", "c=1"]) == 0  # --set still wins
    assert "  b0 = read(ft)\n  write(out, b0)\n" in capsys.readouterr().out
