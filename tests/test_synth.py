"""Synthetic checkpoints: shapes, determinism, the fine-tune relation, files on disk."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from tvlang.io import open_reader
from tvlang.testing.synth import (
    finetune_like,
    llama_bytes,
    llama_spec,
    llama_spec_for_bytes,
    make_state_dict,
    make_tensor,
    write_checkpoint,
    write_synthetic,
)

SPEC = llama_spec(hidden=16, layers=2, vocab=32, intermediate=24)


def spec_bytes(spec, itemsize=4) -> int:
    total = 0
    for entry in spec.values():
        if len(entry) == 2 and isinstance(entry[1], torch.dtype):
            total += math.prod(entry[0]) * torch.empty((), dtype=entry[1]).element_size()
        else:
            total += math.prod(entry) * itemsize
    return total


def test_llama_spec_names_and_shapes():
    assert list(SPEC)[:3] == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ]
    assert SPEC["model.embed_tokens.weight"] == (32, 16)
    assert SPEC["model.layers.1.mlp.gate_proj.weight"] == (24, 16)
    assert SPEC["model.layers.1.mlp.down_proj.weight"] == (16, 24)
    assert SPEC["model.layers.0.input_layernorm.weight"] == (16,)
    assert SPEC["model.norm.weight"] == (16,)
    assert SPEC["lm_head.weight"] == (32, 16)
    assert SPEC["model.position_ids"] == ((1, 32), torch.int64)
    assert len(SPEC) == 1 + 2 * 9 + 3
    assert spec_bytes(SPEC) == llama_bytes(16, 2, 32, 24)


def test_make_state_dict_values():
    sd = make_state_dict(SPEC, seed=3)
    assert sd["model.position_ids"].tolist() == [list(range(32))]
    norm = sd["model.norm.weight"]
    assert norm.dtype == torch.float32 and (norm - 1).abs().max() < 0.2
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert 0.01 < q.std().item() < 0.03


def test_make_state_dict_is_deterministic_and_per_name():
    a = make_state_dict(SPEC, seed=1)
    b = make_state_dict(SPEC, seed=1)
    c = make_state_dict(SPEC, seed=2)
    name = "lm_head.weight"
    assert all(torch.equal(a[n], b[n]) for n in SPEC)
    assert not torch.equal(a[name], c[name])
    # A tensor does not depend on what else is in the spec.
    alone = make_state_dict({name: SPEC[name]}, seed=1)
    assert torch.equal(alone[name], a[name])
    assert torch.equal(make_tensor(name, (32, 16), torch.float32, 1), a[name])


def test_make_state_dict_dtype():
    sd = make_state_dict(SPEC, seed=0, dtype=torch.bfloat16)
    assert sd["lm_head.weight"].dtype == torch.bfloat16
    assert sd["model.position_ids"].dtype == torch.int64
    assert torch.equal(sd["lm_head.weight"], make_state_dict(SPEC, seed=0)["lm_head.weight"].bfloat16())


def test_finetune_like():
    base = make_state_dict(SPEC, seed=0)
    ft = finetune_like(base, seed=1, scale=0.01)
    assert torch.equal(ft["model.position_ids"], base["model.position_ids"])
    diff = ft["lm_head.weight"] - base["lm_head.weight"]
    assert 0.005 < diff.std().item() < 0.015
    assert not torch.equal(finetune_like(base, seed=2, scale=0.01)["lm_head.weight"], ft["lm_head.weight"])
    assert torch.equal(finetune_like(base, seed=1, scale=0.0)["lm_head.weight"], base["lm_head.weight"])


def test_write_checkpoint_directory_with_config(tmp_path):
    sd = make_state_dict(SPEC, seed=0)
    out = write_checkpoint(tmp_path / "base", sd, metadata={"origin": "synth"})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], config["intermediate_size"]) == (16, 2, 32, 24)
    assert config["torch_dtype"] == "float32"
    loaded = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(loaded[n], sd[n]) for n in sd)
    reader = open_reader(out)
    assert reader.metadata["origin"] == "synth"
    assert reader.root == os.path.realpath(out)


def test_write_checkpoint_sharded_single_and_no_config(tmp_path):
    sd = make_state_dict(SPEC, seed=0)
    sharded = write_checkpoint(tmp_path / "sharded", sd, shard_size=4096, config=False)
    files = os.listdir(sharded)
    assert "config.json" not in files and "model.safetensors.index.json" in files
    reader = open_reader(sharded)
    assert reader.names() == list(sd)
    assert all(torch.equal(reader.read(n), sd[n]) for n in sd)

    single = write_checkpoint(tmp_path / "one.safetensors", sd)
    assert not os.path.exists(tmp_path / "config.json")
    assert all(torch.equal(t, sd[n]) for n, t in load_file(single).items())

    custom = write_checkpoint(tmp_path / "custom", {"w": torch.ones(1)}, config={"model_type": "bert"})
    assert json.loads(open(os.path.join(custom, "config.json")).read()) == {"model_type": "bert"}


def test_write_synthetic_matches_the_in_memory_helpers(tmp_path):
    base = write_synthetic(tmp_path / "base", SPEC, seed=0, dtype=torch.float16)
    ft = write_synthetic(tmp_path / "ft", SPEC, seed=5, finetune_of=0, scale=0.02, dtype=torch.float16)
    expected_base = make_state_dict(SPEC, seed=0, dtype=torch.float16)
    expected_ft = finetune_like(expected_base, seed=5, scale=0.02)
    rb, rf = open_reader(base), open_reader(ft)
    for name in SPEC:
        assert torch.equal(rb.read(name), expected_base[name]), name
        assert torch.equal(rf.read(name), expected_ft[name]), name
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["torch_dtype"] == "float16"


@pytest.mark.parametrize("target", [2_000_000, 50_000_000, 1_500_000_000])
def test_llama_spec_for_bytes_hits_the_target(target):
    spec = llama_spec_for_bytes(target)
    assert abs(spec_bytes(spec) - target) / target < 0.02
    assert spec["model.position_ids"][1] == torch.int64


def test_llama_spec_for_bytes_with_half_precision():
    spec = llama_spec_for_bytes(10_000_000, dtype=torch.float16, layers=4)
    assert abs(spec_bytes(spec, itemsize=2) - 10_000_000) / 10_000_000 < 0.02
    assert "model.layers.3.mlp.up_proj.weight" in spec and "model.layers.4.mlp.up_proj.weight" not in spec
