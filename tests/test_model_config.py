"""An in-memory base given a config source, so that from_pretrained loads the output (issue 13).

A real transformers model (a tiny BertModel built from a BertConfig, no download):
its module, or its state dict with ``config=``, is the base of a merge written as a
model directory, and ``AutoModel.from_pretrained`` of that directory holds exactly the
hand-computed merge.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import tvlang
from tvlang import TvlangError

transformers = pytest.importorskip("transformers")

RECIPE = "pre + 0.5*(ft - pre)"


def tiny_bert(seed: int):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, type_vocab_size=2)
    return transformers.BertModel(config).eval()


@pytest.fixture()
def models():
    pre, ft = tiny_bert(0), tiny_bert(1)
    expected = {}
    fine = ft.state_dict()
    for name, value in pre.state_dict().items():
        # the hand-computed merge; integer buffers (position ids) are the base's
        expected[name] = value + 0.5 * (fine[name] - value) if value.is_floating_point() else value
    return pre, ft, expected


def loads_as(path, expected):
    loaded = transformers.AutoModel.from_pretrained(path)
    assert type(loaded).__name__ == "BertModel"
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(state[name], value, atol=1e-6), name
    return loaded


def test_a_module_with_its_config_as_the_base_writes_a_directory_from_pretrained_loads(tmp_path, models):
    pre, ft, expected = models
    out = tmp_path / "merged"
    summary = tvlang.compile(RECIPE).run({"pre": pre, "ft": ft.state_dict()}, str(out))
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 8
    loads_as(out, expected)
    assert summary.tensors == len(expected)


@pytest.mark.parametrize("source", ["config", "model", "directory"])
def test_a_state_dict_base_takes_config_from_a_config_a_model_or_a_directory(tmp_path, models, source):
    pre, ft, expected = models
    given = {"config": pre.config, "model": pre, "directory": str(tmp_path / "saved")}[source]
    if source == "directory":
        pre.config.save_pretrained(given)
    out = tmp_path / "merged"
    tvlang.compile(RECIPE).run({"pre": pre.state_dict(), "ft": ft.state_dict()}, str(out), config=given)
    loads_as(out, expected)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("tvlang-config")]


def test_without_a_config_a_state_dict_base_writes_weights_only(tmp_path, models):
    pre, ft, _ = models
    out = tmp_path / "merged"
    tvlang.compile(RECIPE).run({"pre": pre.state_dict(), "ft": ft.state_dict()}, str(out))
    assert not (out / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # transformers: no config.json with a model_type
        transformers.AutoModel.from_pretrained(out)


def test_a_config_that_is_not_one_is_an_error_naming_it(tmp_path, models):
    pre, ft, _ = models
    bindings = {"pre": pre.state_dict(), "ft": ft.state_dict()}
    plan = tvlang.compile(RECIPE)
    with pytest.raises(TvlangError, match="config= expects a directory, a transformers config or a model with"
                                          " .config; got dict"):
        plan.run(bindings, str(tmp_path / "a"), config={"hidden_size": 8})
    with pytest.raises(TvlangError, match="is not a directory: give the folder that holds config.json"):
        plan.run(bindings, str(tmp_path / "b"), config=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TvlangError, match="holds no config.json"):
        plan.run(bindings, str(tmp_path / "c"), config=str(tmp_path / "empty"))
    assert sorted(os.listdir(tmp_path)) == ["empty"]
