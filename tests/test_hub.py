"""hf: references resolved through huggingface_hub, against a real cache built offline.

The cache is written by ``tvlang.testing.hub.write_repo`` in huggingface_hub's own
layout; every test first lets huggingface_hub itself read it back, and runs with
HF_HUB_OFFLINE=1 (no test touches the network).
"""

from __future__ import annotations

import json
import os
import shutil

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tvlang
from tvlang.errors import TvlangError
from tvlang.faces.cli import main
from tvlang.io import StreamingWriter, TensorInfo
from tvlang.io.hub import parse_reference, resolve
from tvlang.testing.hub import copy_model, repo_folder, write_repo


def offline_cache(monkeypatch, cache) -> str:
    """Point huggingface_hub at ``cache``, offline: the environment and its constants (read at import)."""
    cache = str(cache)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def model_dir(path, seed: int, *, config: str = '{"model_type": "bert"}', readme: str | None = None, shards=None):
    """A small model directory: two float tensors and an integer buffer, a config (and a README)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g),
               "pos_ids": torch.arange(6)}
    os.makedirs(path, exist_ok=True)
    if shards:
        layout = [TensorInfo(k, tuple(v.shape), v.dtype, v.numel() * v.element_size(), "") for k, v in tensors.items()]
        out = os.path.join(path, "w")
        with StreamingWriter(out, layout, shard_size=shards) as writer:
            for k, v in tensors.items():
                writer.write(k, v)
        for name in os.listdir(out):
            shutil.move(os.path.join(out, name), os.path.join(path, name))
        os.rmdir(out)
    else:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config)
    if readme is not None:
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(readme)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline cache holding org/base (main), org/ft (main, and a branch 'v2' at another commit)."""
    cache = offline_cache(monkeypatch, tmp_path / "hub-cache")
    local = tmp_path / "local"
    base = model_dir(local / "base", 0, readme="# the base's own card\n")
    ft = model_dir(local / "ft", 1)
    ft2 = model_dir(local / "ft2", 2)
    commits = {
        "base": write_repo(cache, "org/base", copy_model(base)),
        "ft": write_repo(cache, "org/ft", copy_model(ft)),
        "ft2": write_repo(cache, "org/ft", copy_model(ft2), revision="v2"),
    }
    return {"cache": cache, "local": local, "commits": commits}


def test_huggingface_hub_reads_the_cache_we_write(hub):
    """The layout is huggingface_hub's own: its functions resolve ids, branches and shas in it."""
    commits = hub["commits"]
    path = huggingface_hub.try_to_load_from_cache("org/ft", "model.safetensors")
    assert path == os.path.join(repo_folder(hub["cache"], "org/ft"), "snapshots", commits["ft"], "model.safetensors")
    assert huggingface_hub.try_to_load_from_cache("org/ft", "model.safetensors", revision="v2").endswith(
        os.path.join(commits["ft2"], "model.safetensors"))
    folder = huggingface_hub.snapshot_download("org/base", local_files_only=True)
    assert os.path.basename(folder) == commits["base"]
    assert huggingface_hub.hf_hub_download("org/ft", "config.json", revision=commits["ft2"],
                                           local_files_only=True).endswith("config.json")
    # the blob of a weights file is named by its sha256, as the Hub's LFS etag
    blob = os.path.basename(os.path.realpath(path))
    import hashlib
    assert blob == hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("text, repo, revision, path, is_file", [
    ("hf:org/name", "org/name", None, "", False),
    ("hf:org/name@v1", "org/name", "v1", "", False),
    ("hf:org/name@main/text_encoder", "org/name", "main", "text_encoder", False),
    ("hf:org/name@main/sub/model.safetensors", "org/name", "main", "sub/model.safetensors", True),
    ("hf:org/name/sub/dir", "org/name", None, "sub/dir", False),
    ("hf:org/name@refs%2Fpr%2F3", "org/name", "refs/pr/3", "", False),
    ("hf:gpt2", "gpt2", None, "", False),
])
def test_reference_syntax(text, repo, revision, path, is_file):
    ref = parse_reference(text)
    assert (ref.repo_id, ref.revision, ref.path, ref.is_file) == (repo, revision, path, is_file)


@pytest.mark.parametrize("text, why", [
    ("hf:org/name@", "nothing after '@'"),
    ("hf:", "is not a repository id"),
    ("hf:org/name@main/../x", "not a path inside the repository"),
])
def test_malformed_references(text, why):
    with pytest.raises(TvlangError, match="malformed Hub reference") as info:
        parse_reference(text)
    assert why in str(info.value) and text in str(info.value)


def test_resolve_by_id_branch_and_sha(hub):
    commits = hub["commits"]
    by_id = resolve("hf:org/ft")
    assert by_id.commit == commits["ft"] and by_id.files == ("model.safetensors",)
    assert by_id.pinned == f"hf:org/ft@{commits['ft']}"
    assert resolve("hf:org/ft@main").commit == commits["ft"]
    assert resolve("hf:org/ft@v2").commit == commits["ft2"]
    by_sha = resolve(f"hf:org/ft@{commits['ft2']}")
    assert by_sha.commit == commits["ft2"]
    with open(by_sha.local("model.safetensors"), "rb") as a, \
            open(hub["local"] / "ft2" / "model.safetensors", "rb") as b:
        assert a.read() == b.read()


def test_subfolder_file_and_shards(hub, tmp_path):
    sharded = model_dir(tmp_path / "sharded", 3, shards=60)
    assert os.path.exists(sharded / "model.safetensors.index.json")
    single = model_dir(tmp_path / "single", 4)
    commit = write_repo(hub["cache"], "org/multi", {**copy_model(sharded, "text/"),
                                                   "unet/diffusion.safetensors": single / "model.safetensors"})
    source = resolve("hf:org/multi@main/text")
    assert source.commit == commit
    assert source.files[0] == "text/model.safetensors.index.json" and len(source.files) == 4
    assert all(f.startswith("text/model-0000") for f in source.files[1:])
    expected = tvlang.compile("m").evaluate({"m": str(sharded)})
    got = tvlang.compile("m").evaluate({"m": "hf:org/multi/text"})
    assert all(torch.equal(expected[k], got[k]) for k in expected) and expected.keys() == got.keys()
    one = tvlang.compile("m").evaluate({"m": "hf:org/multi@main/unet/diffusion.safetensors"})
    assert torch.equal(one["a.weight"], tvlang.compile("m").evaluate({"m": str(single)})["a.weight"])


def test_offline_errors_name_the_id_and_say_what_is_missing(hub):
    with pytest.raises(TvlangError) as info:
        resolve("hf:org/absent")
    text = info.value.render()
    assert "hf:org/absent: org/absent is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in text
    assert hub["cache"] in text
    with pytest.raises(TvlangError, match="revision 'nope' of org/ft is not in the local Hugging Face cache"):
        resolve("hf:org/ft@nope")
    with pytest.raises(TvlangError, match=r"hf:org/ft@main/other.safetensors: file other.safetensors of commit"
                                          r" [0-9a-f]{12} is not in the local Hugging Face cache \(HF_HUB_OFFLINE"):
        resolve("hf:org/ft@main/other.safetensors")
    write_repo(hub["cache"], "org/empty", {"config.json": b"{}"})
    with pytest.raises(TvlangError, match="the repository holds no model weights at commit") as info:
        resolve("hf:org/empty")
    assert "the local cache holds: config.json" in info.value.render()


def test_cli_errors_are_one_message_exit_1(hub, tmp_path, capsys):
    code = main(["run", "-e", "pre + 0.5*(ft - pre)", "--bind", "pre=hf:org/base", "--bind", "ft=hf:org/gone",
                 "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: hf:org/gone: org/gone is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in err
    assert "Traceback" not in err


def test_without_huggingface_hub_a_clear_error(hub, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub" or name.startswith("huggingface_hub."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(TvlangError, match="needs huggingface_hub, which is not installed") as info:
        resolve("hf:org/ft")
    assert "pip install 'tvlang[hub]'" in info.value.render()


def weights_and_metadata(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_hub_run_equals_local_run(hub, tmp_path):
    """The same recipe over hf: ids and over the same files given as local paths: the same tensors and files."""
    local = hub["local"]
    recipe = "pre + 0.5*(ft - pre)"
    via_hub, via_local = tmp_path / "via-hub", tmp_path / "via-local"
    assert main(["run", "-e", recipe, "--bind", "pre=hf:org/base", "--bind", "ft=hf:org/ft@v2", "-o", str(via_hub),
                 "-q"]) == 0
    assert main(["run", "-e", recipe, "--bind", f"pre={local / 'base'}", "--bind", f"ft={local / 'ft2'}",
                 "-o", str(via_local), "-q"]) == 0
    a, meta_a = weights_and_metadata(via_hub / "model.safetensors")
    b, meta_b = weights_and_metadata(via_local / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (via_hub / "config.json").read_bytes() == (via_local / "config.json").read_bytes()
    assert json.loads(meta_a["tvlang.inputs"])["pre"].startswith(f"hf:org/base@{hub['commits']['base']}")
    # with both inputs the same kind of thing, every byte of the weights file is the same
    same_a, same_b = tmp_path / "same-a", tmp_path / "same-b"
    assert main(["run", "-e", recipe, "--bind", "pre=hf:org/base", "--bind", "ft=hf:org/ft@v2", "-o", str(same_a),
                 "-q"]) == 0
    assert main(["run", "-e", recipe, "--bind", f"pre=hf:org/base@{hub['commits']['base']}", "--bind",
                 f"ft=hf:org/ft@{hub['commits']['ft2']}", "-o", str(same_b), "-q"]) == 0
    assert (same_a / "model.safetensors").read_bytes() == (same_b / "model.safetensors").read_bytes()


def test_load_hf_in_a_recipe_and_in_api_bindings(hub, tmp_path):
    recipe = tmp_path / "merge.tv"
    recipe.write_text('pre = load("hf:org/base")\nft = load("hf:org/ft@v2") - pre\nparam lam = 0.5\n'
                      'out = pre + lam*ft\n')
    assert main(["run", str(recipe), "-o", str(tmp_path / "a"), "-q"]) == 0
    plan = tvlang.compile("pre + lam*(ft - pre)", lam=0.5)
    plan.run({"pre": "hf:org/base", "ft": "hf:org/ft@v2"}, tmp_path / "b")
    a, _ = weights_and_metadata(tmp_path / "a" / "model.safetensors")
    b, _ = weights_and_metadata(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    naive = {k: v if not v.is_floating_point() else v + 0.5 * (w - v)
             for (k, v), w in zip(weights_and_metadata(hub["local"] / "base" / "model.safetensors")[0].items(),
                                  weights_and_metadata(hub["local"] / "ft2" / "model.safetensors")[0].values())}
    assert all(torch.allclose(a[k], naive[k]) for k in naive)


def test_online_fetches_only_the_files_read(hub, tmp_path, monkeypatch):
    """With the Hub 'reachable' (model_info and downloads served from the cache, recorded), a run fetches
    the weights of the inputs it reads, in one format, and the base's config and tokenizer files only."""
    from types import SimpleNamespace

    import tvlang.io.hub as hub_module

    local = hub["local"]
    both = dict(copy_model(local / "base"))
    both["pytorch_model.bin"] = b"not read"
    both["tokenizer.json"] = b"{}"
    commits = {"org/both": write_repo(hub["cache"], "org/both", both), "org/ft": hub["commits"]["ft2"]}
    listings = {"org/both": sorted(both), "org/ft": ["config.json", "model.safetensors"]}
    asked, fetched = [], []
    real_download = huggingface_hub.hf_hub_download

    def model_info(self, repo_id, revision=None, **_):
        asked.append((repo_id, revision))
        return SimpleNamespace(sha=commits[repo_id], siblings=[SimpleNamespace(rfilename=f) for f in listings[repo_id]])

    def download(repo_id, filename, revision=None, local_files_only=False, **_):
        fetched.append((repo_id, filename))
        assert revision == commits[repo_id]  # every file at the commit the revision resolved to
        return real_download(repo_id, filename, revision=revision, local_files_only=True)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert hub_module.resolve("hf:org/both").local_only is False
    asked.clear(), fetched.clear()
    out = tmp_path / "out"
    tvlang.compile("pre + 0.5*(ft - pre)").run({"pre": "hf:org/both", "ft": "hf:org/ft@v2"}, out)
    assert set(fetched) == {("org/both", "model.safetensors"), ("org/ft", "model.safetensors"),
                            ("org/both", "config.json"), ("org/both", "tokenizer.json")}
    assert ("org/ft", "v2") in asked
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    # a task vector output copies no model files, so none are fetched
    fetched.clear()
    tvlang.compile("ft - pre").run({"pre": "hf:org/both", "ft": "hf:org/ft@v2"}, tmp_path / "tau")
    assert {f for _, f in fetched} == {"model.safetensors"}


def test_a_mergekit_config_naming_hub_models_imports_and_runs_from_the_cache(hub, tmp_path, capsys):
    """mergekit's configs name Hub models (org/name, org/name@revision): tvlang import reads a
    model reference that is not a local path as one, as mergekit does (issue 16)."""
    from safetensors.torch import load_file

    from tvlang.frontends.mergekit import to_recipe

    config = tmp_path / "merge.yml"
    config.write_text("models:\n  - model: org/ft@v2\n    parameters: {weight: 0.5}\n"
                      "base_model: org/base\nmerge_method: task_arithmetic\n")
    recipe = to_recipe(config)
    assert 'load("hf:org/base")' in recipe and 'load("hf:org/ft@v2")' in recipe
    out = tmp_path / "merged.safetensors"
    assert main(["run", str(config), "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    base = load_file(os.path.join(hub["local"], "base", "model.safetensors"))
    ft2 = load_file(os.path.join(hub["local"], "ft2", "model.safetensors"))
    got = load_file(str(out))
    for name in ("a.weight", "b.bias"):
        torch.testing.assert_close(got[name], base[name] + 0.5 * (ft2[name] - base[name]))


def test_a_stack_whose_first_part_is_on_the_hub_fetches_its_config(hub, tmp_path, monkeypatch):
    """A stack's output takes its first part's config.json (with the stack's layer count): when
    that part is a Hub model, its config is fetched like a Hub base's (it was not: the output
    had no config.json unless the cache already held one)."""
    from types import SimpleNamespace

    from test_lock import layered_model

    first = layered_model(tmp_path / "local" / "llama-a", 0)
    second = layered_model(tmp_path / "local" / "llama-b", 1)
    files = {name: open(local, "rb").read() for name, local in copy_model(first).items()}
    commit = write_repo(hub["cache"], "org/llama-a", {"model.safetensors": files["model.safetensors"]})
    fetched = []

    def model_info(self, repo_id, revision=None, **_):
        return SimpleNamespace(sha=commit, siblings=[SimpleNamespace(rfilename=f) for f in sorted(files)])

    def download(repo_id, filename, revision=None, local_files_only=False, **_):
        fetched.append(filename)
        assert revision == commit
        if filename != "model.safetensors":  # 'downloaded': written into the cache at the same commit
            write_repo(hub["cache"], repo_id, {filename: files[filename]}, commit=commit)
        return real_download(repo_id, filename, revision=revision, local_files_only=True)

    real_download = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    out = tmp_path / "stacked"
    tvlang.compile(f'stack(load("hf:org/llama-a", layers=[0, 2]), load({json.dumps(str(second))}, layers=[0, 2]))'
                   ).run({}, out)
    assert "config.json" in fetched
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4  # two layers of each part
    assert {k: v for k, v in config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in json.loads(files["config.json"]).items() if k != "num_hidden_layers"}
