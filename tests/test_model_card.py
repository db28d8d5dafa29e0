"""The model card (README.md) of a model output directory, read back by huggingface_hub's own parser."""

from __future__ import annotations

import hashlib
import os

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

import tvlang
import tvlang.io.writer as writer_module
from test_hub import model_dir, offline_cache
from tvlang.faces.cli import main
from tvlang.testing.hub import copy_model, write_repo

RECIPE = ('pre = load("hf:org/base")\nft = load("hf:org/ft@v2") - pre\nlocal = load("../local/other") - pre\n'
          "param lam = 0.5\nparam mu = -0.25\n# a comment with ``` in it\nout = pre + lam*ft + mu*local\n")


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("TVLANG_CACHE_DIR", str(tmp_path / "tvlang-cache"))
    cache = offline_cache(monkeypatch, tmp_path / "hub-cache")
    local = tmp_path / "local"
    base = model_dir(local / "base", 0, readme="# the base's own card\n")
    commits = {"base": write_repo(cache, "org/base", copy_model(base)),
               "ft": write_repo(cache, "org/ft", copy_model(model_dir(local / "ft", 1)), revision="v2")}
    model_dir(local / "other", 2)
    (tmp_path / "repo").mkdir()
    recipe = tmp_path / "repo" / "merge.tv"
    recipe.write_text(RECIPE)
    return {"tmp": tmp_path, "recipe": recipe, "commits": commits, "local": local}


def test_the_card_reads_back_with_huggingface_hub(world):
    out = world["tmp"] / "out"
    assert main(["run", str(world["recipe"]), "-o", str(out), "-q"]) == 0
    card = huggingface_hub.ModelCard.load(out / "README.md")
    # the Hub model inputs, the base first; the local input has no Hub id
    assert card.data.base_model == ["org/base", "org/ft"]
    assert card.data.tags == ["merge", "tvlang"]
    assert card.data.library_name == "transformers"  # the base has a config.json, copied into the output
    text = (out / "README.md").read_text()
    assert "the base's own card" not in text  # the base's README is never copied over it
    # the recipe, exactly, in a fence longer than any run of backticks in it
    assert "\n````tvlang\n" + RECIPE + "````\n" in text
    commits = world["commits"]
    assert f"- `pre`: `hf:org/base@{commits['base']}` (revision `main`)\n" in text
    assert f"""- `load("hf:org/ft@v2")`: `hf:org/ft@{commits['ft']}` (revision `v2`)\n""" in text
    assert """- `load("../local/other")`: `../local/other`\n""" in text
    assert "| `lam` | 0.5 |\n| `mu` | -0.25 |\n" in text
    assert "no file hashes are recorded" in text
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]


def test_a_locked_run_lists_the_hashes(world):
    assert main(["lock", str(world["recipe"]), "-q"]) == 0
    out = world["tmp"] / "out"
    assert main(["run", str(world["recipe"]), "--locked", "-o", str(out), "-q"]) == 0
    text = (out / "README.md").read_text()
    weights = world["local"] / "other" / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (f"""- `load("../local/other")`: `../local/other`\n  - `model.safetensors`: sha256 `{digest}`,"""
            f" {os.path.getsize(weights)} bytes\n") in text
    assert "no file hashes" not in text


def test_local_inputs_only_and_no_config(world):
    """No Hub id: no base_model; a base without config.json: no library_name."""
    bare = world["tmp"] / "bare"
    bare.mkdir()
    g = torch.Generator().manual_seed(5)
    save_file({"w": torch.randn(3, 3, generator=g)}, bare / "model.safetensors")
    out = world["tmp"] / "out"
    tvlang.compile("pre + 0.5*(ft - pre)").run({"pre": str(bare), "ft": str(bare)}, out)
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.base_model is None and card.data.library_name is None
    assert card.data.tags == ["merge", "tvlang"]
    assert "## Parameters" not in card.text  # an expression with no params


def test_no_model_card(world):
    out = world["tmp"] / "out"
    assert main(["run", str(world["recipe"]), "--no-model-card", "-o", str(out), "-q"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    plan = tvlang.compile("pre + 0.5*(ft - pre)")
    plan.run({"pre": "hf:org/base", "ft": "hf:org/ft@v2"}, world["tmp"] / "api", model_card=False)
    assert sorted(os.listdir(world["tmp"] / "api")) == ["config.json", "model.safetensors"]


def test_no_card_for_a_single_file_or_a_task_vector(world):
    plan = tvlang.compile("pre + 0.5*(ft - pre)")
    bindings = {"pre": "hf:org/base", "ft": "hf:org/ft@v2"}
    plan.run(bindings, world["tmp"] / "one.safetensors")
    assert sorted(os.listdir(world["tmp"])) == ["hub-cache", "local", "one.safetensors", "repo"]
    tvlang.compile("ft - pre").run(bindings, world["tmp"] / "tau")
    assert os.listdir(world["tmp"] / "tau") == ["model.safetensors"]


def test_the_card_is_written_inside_the_output_transaction(world, monkeypatch):
    """README.md goes into the output's temporary directory, renamed into place with the weights."""
    written = []
    real = writer_module.write_files

    def watched(files, directory):
        written.append((sorted(files), os.path.basename(directory), os.path.exists(world["tmp"] / "out")))
        return real(files, directory)

    monkeypatch.setattr(writer_module, "write_files", watched)
    assert main(["run", str(world["recipe"]), "-o", str(world["tmp"] / "out"), "-q"]) == 0
    assert written == [(["README.md"], f".out.tvtmp-{os.getpid()}", False)]
    assert (world["tmp"] / "out" / "README.md").exists()
