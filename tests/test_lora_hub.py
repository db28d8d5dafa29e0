"""lora("hf:org/name[@rev][/folder]"): PEFT adapters from the Hub, resolved through huggingface_hub's cache
(written offline in its layout by tvlang.testing.hub; HF_HUB_OFFLINE=1, no network)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

import huggingface_hub  # noqa: E402
import torch  # noqa: E402

import tvlang  # noqa: E402
from lora_models import make_adapter, tiny_llama  # noqa: E402
from test_hub import offline_cache  # noqa: E402
from tvlang.faces.cli import main  # noqa: E402
from tvlang.testing.hub import copy_model, write_repo  # noqa: E402


@pytest.fixture
def adapters(tmp_path, monkeypatch):
    """A tiny Llama (local and as org/base), an adapter as org/yelp (main), and another one in the
    folder yelp/ of org/multi at branch v2."""
    cache = offline_cache(monkeypatch, tmp_path / "hub-cache")
    base = tiny_llama(str(tmp_path / "base"))
    one = tmp_path / "one"
    two = tmp_path / "two"
    merged_one = make_adapter(base, str(one), seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_adapter(base, str(two), seed=2, r=2, lora_alpha=2, target_modules=["k_proj"], use_rslora=True)
    write_repo(cache, "org/base", copy_model(base))
    commits = {"yelp": write_repo(cache, "org/yelp", copy_model(one)),
               "multi": write_repo(cache, "org/multi", copy_model(two, prefix="yelp/"), revision="v2")}
    return {"base": base, "one": str(one), "two": str(two), "merged_one": merged_one, "commits": commits}


def test_huggingface_hub_finds_the_adapter_in_the_cache(adapters):
    path = huggingface_hub.hf_hub_download("org/yelp", "adapter_config.json", local_files_only=True)
    assert json.load(open(path))["r"] == 4


def test_a_hub_adapter_is_the_local_one(adapters):
    base = adapters["base"]
    hub = tvlang.compile('pre + lora("hf:org/yelp")').evaluate({"pre": base})
    local = tvlang.compile(f'pre + lora("{adapters["one"]}")').evaluate({"pre": base})
    assert hub.keys() == local.keys() and all(torch.equal(hub[k], local[k]) for k in hub)
    merged = adapters["merged_one"]
    assert all((hub[k] - merged[k]).abs().max() <= 1e-6 for k in hub)
    # a revision and a folder, in a recipe and bound on the command line and in the API
    commit = adapters["commits"]["multi"]
    want = tvlang.compile(f'pre + lora("{adapters["two"]}")').evaluate({"pre": base})
    for ref in ("hf:org/multi@v2/yelp", f"hf:org/multi@{commit}/yelp"):
        got = tvlang.compile(f'pre + lora("{ref}")').evaluate({"pre": base})
        assert all(torch.equal(got[k], want[k]) for k in want)
    api = tvlang.compile("pre + tau").evaluate({"pre": base, "tau": tvlang.lora("hf:org/multi@v2/yelp")})
    assert all(torch.equal(api[k], want[k]) for k in want)


def test_cli_binding_and_hub_base(adapters, tmp_path):
    out = tmp_path / "merged"
    code = main(["run", "-e", "pre + 0.5*tau", "--bind", "pre=hf:org/base", "--bind", "tau=lora:hf:org/yelp",
                 "-o", str(out), "-q"])
    assert code == 0
    got = tvlang.compile("x").evaluate({"x": str(out)})
    want = tvlang.compile('pre + 0.5*lora("hf:org/yelp")').evaluate({"pre": adapters["base"]})
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_errors_name_the_reference(adapters, tmp_path, capsys):
    base = adapters["base"]
    with pytest.raises(tvlang.TvlangError, match="hf:org/base: the repository holds no PEFT adapter at commit"):
        tvlang.compile('pre + lora("hf:org/base")').evaluate({"pre": base})
    with pytest.raises(tvlang.TvlangError, match="org/nothing is not in the local Hugging Face cache"):
        tvlang.compile('pre + lora("hf:org/nothing")').evaluate({"pre": base})
    with pytest.raises(tvlang.TvlangError, match="lora\\(\\) reads an adapter folder, not one file"):
        tvlang.compile('pre + lora("hf:org/yelp@main/adapter_model.safetensors")').evaluate({"pre": base})
    recipe = tmp_path / "r.tv"
    recipe.write_text('pre = load("hf:org/base")\nout = pre + lora("hf:org/multi")\n')
    assert main(["run", str(recipe), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "r.tv:2:13: error: hf:org/multi:" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_lockfile_pins_the_adapters_commit(adapters, tmp_path):
    recipe = tmp_path / "r.tv"
    recipe.write_text(f'pre = load("{adapters["base"]}")\nout = pre + lora("hf:org/multi@v2/yelp")\n')
    assert main(["lock", str(recipe)]) == 0
    entry = json.load(open(f"{recipe}.lock"))["inputs"]['lora("hf:org/multi@v2/yelp")']
    assert entry["commit"] == adapters["commits"]["multi"]
    assert sorted(entry["files"]) == ["yelp/adapter_config.json", "yelp/adapter_model.safetensors"]
    assert main(["run", str(recipe), "--locked", "-o", str(tmp_path / "out"), "-q"]) == 0
    # the branch moves to a commit whose factors differ: the locked run refuses it
    other = tmp_path / "other"
    make_adapter(adapters["base"], str(other), seed=7, r=2, lora_alpha=2, target_modules=["k_proj"], use_rslora=True)
    write_repo(os.environ["HF_HUB_CACHE"], "org/multi", copy_model(other, prefix="yelp/"), revision="v2")
    assert main(["run", str(recipe), "--locked", "-o", str(tmp_path / "out2"), "-q"]) == 1
    assert not (tmp_path / "out2").exists()


def test_similarity_and_bases_take_hub_adapters(adapters, tmp_path, capsys):
    base = adapters["base"]
    local = [f"a=lora:{adapters['one']}", f"b=lora:{adapters['two']}"]
    hub = ["a=lora:hf:org/yelp", "b=lora:hf:org/multi@v2/yelp"]
    tables = []
    for inputs in (local, hub):
        assert main(["similarity", *inputs, "--base", base, "--json"]) == 0
        tables.append(json.loads(capsys.readouterr().out))
    assert tables[0] == tables[1]
    twice = ["a=lora:hf:org/yelp", f"b=lora:{adapters['one']}"]
    assert main(["bases", *twice, "--base", base, "-o", str(tmp_path / "bases"), "--k", "1", "-q"]) == 0
    manifest = json.load(open(tmp_path / "bases" / "manifest.json"))
    assert "hf:org/yelp" in json.dumps(manifest)


def test_the_repl_lists_an_adapter_as_an_adapter(adapters, monkeypatch, capsys):
    """:sources shows an adapter's modules, rank and scale (not its factor tensors), bound with
    lora:DIR (local or hf:) or read by lora() in a definition; the bound adapter computes."""
    import io
    import sys

    base = adapters["base"]
    text = f':sources\nup = pre + lora("{adapters["two"]}")\n:sources\npre + y\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = main(["repl", "--bind", f"pre={base}", "--bind", "y=lora:hf:org/yelp"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "y: hf:org/yelp (bound, delta; LoRA adapter: 4 modules (q_proj, v_proj), rank 4, scale 2)"
    assert (f'up: {adapters["two"]} (lora() in up, delta; LoRA adapter: 2 modules (k_proj), rank 2,'
            ' rsLoRA scale 1.4142136)') in lines
    assert not [line for line in lines if line.startswith(("y:", "up:")) and "tensors" in line]  # no factors
    assert "Model: " in out and "y (lora:hf:org/yelp)" in out.split("Model: ")[1]  # pre + y summarised
