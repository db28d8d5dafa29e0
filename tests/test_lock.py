"""The lockfile (tvlang lock, run --locked, check --locked) over a real huggingface_hub cache built offline.

Every test points the hash cache at its own folder (TVLANG_CACHE_DIR) and
huggingface_hub at an offline cache that tvlang.testing.hub writes in its layout.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tvlang
import tvlang.io.hashing as hashing
from test_hub import model_dir, offline_cache
from tvlang.errors import TvlangError
from tvlang.faces.cli import main
from tvlang.io.hashing import Hasher, cache_dir, lfs_sha256
from tvlang.run.lock import read_lock, write_lockfile
from tvlang.testing.hub import copy_model, repo_folder, write_repo

RECIPE = 'pre = load("hf:org/base")\nft = load("../local/ft") - pre\nparam lam = 0.5\nout = pre + lam*ft\n'


@pytest.fixture
def world(tmp_path, monkeypatch):
    """org/base in an offline Hub cache, a local fine-tune, a recipe in repo/ naming both; the hash cache in tmp."""
    monkeypatch.setenv("TVLANG_CACHE_DIR", str(tmp_path / "tvlang-cache"))
    cache = offline_cache(monkeypatch, tmp_path / "hub-cache")
    base = model_dir(tmp_path / "local" / "base", 0, readme="# the base's own card\n")
    ft = model_dir(tmp_path / "local" / "ft", 1)
    ft2 = model_dir(tmp_path / "local" / "ft2", 2)
    commit = write_repo(cache, "org/base", copy_model(base))
    (tmp_path / "repo").mkdir()
    recipe = tmp_path / "repo" / "merge.tv"
    recipe.write_text(RECIPE)
    return {"tmp": tmp_path, "cache": cache, "recipe": recipe, "lock": tmp_path / "repo" / "merge.tv.lock",
            "base": base, "ft": ft, "ft2": ft2, "commit": commit}


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def count_reads(monkeypatch) -> list[int]:
    """Every block the hasher reads, by size (tvlang.io.hashing._blocks is where it reads)."""
    seen: list[int] = []
    real = hashing._blocks

    def counted(path):
        for block in real(path):
            seen.append(len(block))
            yield block

    monkeypatch.setattr(hashing, "_blocks", counted)
    return seen


def test_lock_written_and_verified(world, capsys):
    assert main(["lock", str(world["recipe"])]) == 0
    err = capsys.readouterr().err
    assert f"wrote {world['lock']}: 2 inputs, 3 files; hashed 2 files" in err and "MiB/s" in err
    text = world["lock"].read_text()
    lock = json.loads(text)
    assert text == json.dumps(lock, indent=2, sort_keys=True) + "\n"  # sorted and indented: diffs line by line
    base_dir, ft_dir = world["base"], world["ft"]
    assert lock == {"format": 1, "inputs": {
        "pre": {"reference": "hf:org/base", "commit": world["commit"], "files": {
            "model.safetensors": {"sha256": sha256(base_dir / "model.safetensors"),
                                  "size": os.path.getsize(base_dir / "model.safetensors")},
            # the base's config: an output directory copies it (its README is not copied, so not locked)
            "config.json": {"sha256": sha256(base_dir / "config.json"),
                            "size": os.path.getsize(base_dir / "config.json")},
        }},
        'load("../local/ft")': {"path": "../local/ft", "files": {
            "model.safetensors": {"sha256": sha256(ft_dir / "model.safetensors"),
                                  "size": os.path.getsize(ft_dir / "model.safetensors")}}},
    }}
    assert main(["check", str(world["recipe"]), "--locked", "-q"]) == 0
    assert capsys.readouterr().out == f"{world['lock']} is current: 2 inputs, 3 files\n"
    out = world["tmp"] / "out"
    assert main(["run", str(world["recipe"]), "--locked", "-o", str(out), "-q"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        recorded = json.loads(f.metadata()["tvlang.lock"])
    assert recorded == {key: {name: entry["sha256"] for name, entry in value["files"].items()}
                        for key, value in lock["inputs"].items()}
    # the same recipe, unlocked, computes the same tensors
    plain = world["tmp"] / "plain"
    assert main(["run", str(world["recipe"]), "-o", str(plain), "-q"]) == 0
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(plain / "model.safetensors", "pt") as b:
        assert all((a.get_tensor(k) == b.get_tensor(k)).all() for k in a.keys())
        assert "tvlang.lock" not in b.metadata()


def test_a_tampered_byte_is_refused_naming_the_file(world, capsys):
    assert main(["lock", str(world["recipe"]), "-q"]) == 0
    weights = world["ft"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the header still parses
    weights.write_bytes(bytes(data))
    out = world["tmp"] / "out"
    assert main(["run", str(world["recipe"]), "--locked", "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{world['lock']}: error: the inputs do not match the lock" in err
    assert f"{os.path.normpath(weights)}: sha256 is {sha256(weights)}, the lock says" in err
    assert "run `tvlang lock` again" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in world["tmp"].iterdir() if ".tvtmp-" in p.name]  # nothing written
    assert main(["check", str(world["recipe"]), "--locked", "-q"]) == 1
    assert "sha256 is" in capsys.readouterr().err


def test_a_file_of_another_size_is_refused_without_hashing(world, capsys, monkeypatch):
    assert main(["lock", str(world["recipe"]), "-q"]) == 0
    weights = world["ft"] / "model.safetensors"
    locked = os.path.getsize(weights)
    tensors = load_file(weights)
    save_file(tensors, weights, metadata={"format": "pt", "note": "re-saved"})  # the same tensors, a longer header
    reads = count_reads(monkeypatch)
    assert main(["check", str(world["recipe"]), "--locked", "-q"]) == 1
    size = os.path.getsize(weights)
    assert f"{os.path.normpath(weights)}: size is {size} bytes, the lock says {locked}" in capsys.readouterr().err
    assert reads == []


def test_a_moved_revision_is_refused(world, capsys):
    assert main(["lock", str(world["recipe"]), "-q"]) == 0
    # main now points at a new commit, as after a download of a branch that moved
    moved = write_repo(world["cache"], "org/base", copy_model(world["ft2"]), revision="main")
    assert moved != world["commit"]
    assert main(["run", str(world["recipe"]), "--locked", "-o", str(world["tmp"] / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert (f"input 'pre': hf:org/base resolves to commit {moved} now, the lock says commit {world['commit']}"
            " (the revision moved)") in err
    assert not (world["tmp"] / "out").exists()
    # pinned to the locked commit, the recipe is current again
    world["recipe"].write_text(RECIPE.replace("hf:org/base", f"hf:org/base@{world['commit']}"))
    assert main(["lock", str(world["recipe"]), "-q"]) == 0
    write_repo(world["cache"], "org/base", copy_model(world["ft"]), revision="main")  # main moves again
    assert main(["check", str(world["recipe"]), "--locked", "-q"]) == 0


def test_a_recipe_whose_inputs_changed_is_refused(world, capsys):
    assert main(["lock", str(world["recipe"]), "-q"]) == 0
    world["recipe"].write_text(RECIPE.replace("../local/ft", "../local/ft2"))
    assert main(["run", str(world["recipe"]), "--locked", "-o", str(world["tmp"] / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert """input 'load("../local/ft2")' (../local/ft2) is not in the lock""" in err
    assert """the lock has input 'load("../local/ft")', which the recipe no longer has""" in err
    # a bound name given another path
    world["recipe"].write_text("out = pre + 0.5*(ft - pre)\n")
    bind = ["--bind", "pre=hf:org/base", "--bind", f"ft={world['ft']}"]
    assert main(["lock", str(world["recipe"]), *bind, "-q"]) == 0
    assert main(["check", str(world["recipe"]), "--locked", *bind, "-q"]) == 0
    capsys.readouterr()
    other = ["--bind", "pre=hf:org/base", "--bind", f"ft={world['ft2']}"]
    assert main(["check", str(world["recipe"]), "--locked", *other, "-q"]) == 1
    assert "input 'ft': it is ../local/ft2, the lock says ../local/ft" in capsys.readouterr().err


def test_the_hash_cache_is_reused(world, monkeypatch, capsys):
    reads = count_reads(monkeypatch)
    assert main(["lock", str(world["recipe"]), "-q"]) == 0
    local_weights = os.path.getsize(world["ft"] / "model.safetensors")
    # the ft weights and the base's config were read; the Hub weights not (the blob's name is its sha256)
    assert sum(reads) == local_weights + os.path.getsize(world["base"] / "config.json")
    assert json.loads((world["tmp"] / "tvlang-cache" / "hashes.json").read_text())["version"] == 1
    reads.clear()
    assert main(["lock", str(world["recipe"])]) == 0
    assert reads == []  # a second lock reads no byte of any file to hash it
    assert "hashed no file" in capsys.readouterr().err
    assert main(["run", str(world["recipe"]), "--locked", "-o", str(world["tmp"] / "out"), "-q"]) == 0
    assert reads == []
    # a file whose modification time changed is hashed again (its bytes are the same: still current)
    weights = world["ft"] / "model.safetensors"
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 1_000_000))
    assert main(["check", str(world["recipe"]), "--locked", "-q"]) == 0
    assert sum(reads) == local_weights


def test_hub_blobs_are_hashed_by_name(world):
    snapshot = os.path.join(repo_folder(world["cache"], "org/base"), "snapshots", world["commit"])
    weights = os.path.join(snapshot, "model.safetensors")
    assert lfs_sha256(weights) == sha256(weights)
    assert lfs_sha256(os.path.join(snapshot, "config.json")) is None  # a git blob sha1: not a sha256
    assert lfs_sha256(world["base"] / "model.safetensors") is None


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TVLANG_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("TVLANG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == os.path.join(str(tmp_path / "xdg"), "tvlang")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "tvlang")
    # an unreadable cache file is started afresh, not an error
    (tmp_path / "explicit").mkdir()
    (tmp_path / "explicit" / "hashes.json").write_text("{not json")
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert Hasher(directory=str(tmp_path / "explicit")).sha256(str(path)) == hashlib.sha256(b"abc").hexdigest()


def test_sharded_input_and_the_api(world):
    """A sharded local input locks its index and every shard; the API runs with lock=."""
    sharded = model_dir(world["tmp"] / "local" / "sharded", 3, shards=60)
    plan = tvlang.compile("pre + 0.5*(ft - pre)", filename=str(world["recipe"]))
    bindings = {"pre": "hf:org/base", "ft": str(sharded)}
    lock_file = str(world["tmp"] / "api.lock")
    lock = write_lockfile(plan, bindings, lock_file)
    files = lock["inputs"]["ft"]["files"]
    assert sorted(files) == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                             "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    assert all(files[name]["sha256"] == sha256(sharded / name) for name in files)
    assert read_lock(lock_file) == lock
    plan.run(bindings, world["tmp"] / "api-out", lock=lock_file)
    shard = sharded / "model-00002-of-00003.safetensors"
    save_file(load_file(shard), shard, metadata={"format": "pt", "note": "re-saved"})
    with pytest.raises(TvlangError, match=f"model-00002-of-00003.safetensors: size is {os.path.getsize(shard)} bytes"):
        plan.run(bindings, world["tmp"] / "api-out-2", lock=lock_file)
    assert not (world["tmp"] / "api-out-2").exists()


def test_usage_and_lockfile_errors(world, capsys):
    assert main(["lock", "-e", "pre + 0.5*(ft - pre)", "--bind", "pre=hf:org/base", "--bind",
                 f"ft={world['ft']}"]) == 2
    assert "give a RECIPE file" in capsys.readouterr().err
    assert main(["run", "-e", "pre", "--bind", "pre=hf:org/base", "--locked", "-o", str(world["tmp"] / "o")]) == 2
    assert "--locked needs a RECIPE file" in capsys.readouterr().err
    assert main(["check", str(world["recipe"]), "--locked"]) == 1
    err = capsys.readouterr().err
    assert f"{world['lock']}: error: no lockfile" in err and "tvlang lock RECIPE" in err
    world["lock"].write_text('{"format": 1, "inputs": {"pre": {"files": {"a": {"size": 1}}}}}')
    assert main(["check", str(world["recipe"]), "--locked"]) == 1
    assert "input 'pre' is malformed (each file needs sha256 and size)" in capsys.readouterr().err
    plan = tvlang.compile("pre + 0.5*(ft - pre)")
    import torch
    with pytest.raises(TvlangError, match="input 'ft' is bound to a dict, which a lockfile cannot pin"):
        write_lockfile(plan, {"pre": "hf:org/base", "ft": {"a.weight": torch.zeros(4, 3)}}, str(world["lock"]))


def layered_model(path, seed: int):
    """A tiny Llama-shaped checkpoint (2 layers): a stack's part needs layer indices."""
    from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

    spec = {k: v for k, v in llama_spec(8, 2, 16, 12).items() if k != "model.position_ids"}
    base = make_state_dict(spec, seed=0)
    write_checkpoint(path, base if seed == 0 else finetune_like(base, seed=seed))
    return path


def test_a_stack_locks_every_part(world, capsys):
    first = layered_model(world["tmp"] / "local" / "llama-a", 0)
    second = layered_model(world["tmp"] / "local" / "llama-b", 1)
    commit = write_repo(world["cache"], "org/llama-a", copy_model(first))
    recipe = world["tmp"] / "repo" / "stack.tv"
    recipe.write_text('merged = stack(load("hf:org/llama-a", layers=[0, 2]), load("../local/llama-b", layers=[1, 2]))\n'
                      "out = merged\n")
    lock_file = world["tmp"] / "repo" / "stack.tv.lock"
    assert main(["lock", str(recipe), "-q"]) == 0
    lock = json.loads(lock_file.read_text())

    def pinned(path) -> dict:
        return {"sha256": sha256(path), "size": os.path.getsize(path)}

    assert lock == {"format": 1, "inputs": {"merged": {
        "stack": [{"reference": "hf:org/llama-a", "commit": commit}, {"path": "../local/llama-b"}],
        "files": {
            "hf:org/llama-a/model.safetensors": pinned(first / "model.safetensors"),
            # the output's config.json is the first part's (with the stack's layer count)
            "hf:org/llama-a/config.json": pinned(first / "config.json"),
            "../local/llama-b/model.safetensors": pinned(second / "model.safetensors"),
        }}}}
    assert main(["check", str(recipe), "--locked", "-q"]) == 0
    assert capsys.readouterr().out == f"{lock_file} is current: 1 inputs, 3 files\n"
    out = world["tmp"] / "stacked"
    assert main(["run", str(recipe), "--locked", "-o", str(out), "-q"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["tvlang.lock"]) == {
            "merged": {name: entry["sha256"] for name, entry in lock["inputs"]["merged"]["files"].items()}}
    # the second part's bytes are checked too
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["check", str(recipe), "--locked", "-q"]) == 1
    assert f"{os.path.normpath(weights)}: sha256 is {sha256(weights)}, the lock says" in capsys.readouterr().err
    # and the first part's revision
    weights.write_bytes(bytes(data[:-1] + bytearray([data[-1] ^ 0x01])))
    moved = write_repo(world["cache"], "org/llama-a", copy_model(second), revision="main")
    assert main(["check", str(recipe), "--locked", "-q"]) == 1
    assert (f"input 'merged', part 0: hf:org/llama-a resolves to commit {moved} now, the lock says commit {commit}"
            " (the revision moved)") in capsys.readouterr().err
    # a part replaced by another model
    recipe.write_text(recipe.read_text().replace("llama-b", "llama-c"))
    layered_model(world["tmp"] / "local" / "llama-c", 2)
    write_repo(world["cache"], "org/llama-a", copy_model(first), revision="main")
    assert main(["check", str(recipe), "--locked", "-q"]) == 1
    assert ("input 'merged', part 1: it is ../local/llama-c, the lock says ../local/llama-b"
            in capsys.readouterr().err)


def test_a_layer_range_of_a_hub_model_locks_its_files(world, capsys):
    first = layered_model(world["tmp"] / "local" / "llama-a", 0)
    commit = write_repo(world["cache"], "org/llama-a", copy_model(first))
    recipe = world["tmp"] / "repo" / "range.tv"
    recipe.write_text('part = load("hf:org/llama-a", layers=[1, 2])\nout = part\n')
    assert main(["lock", str(recipe), "-q"]) == 0
    lock = json.loads((world["tmp"] / "repo" / "range.tv.lock").read_text())
    assert lock["inputs"]["part"] == {"reference": "hf:org/llama-a", "commit": commit, "files": {
        "model.safetensors": {"sha256": sha256(first / "model.safetensors"),
                              "size": os.path.getsize(first / "model.safetensors")},
        "config.json": {"sha256": sha256(first / "config.json"), "size": os.path.getsize(first / "config.json")}}}
