"""examples/surgery/: the layer-surgery recipe runs as its README says, on the checkpoints its
generator writes, and every tensor is the layer of the model it takes (computed here from the
generator's state dicts); the output's config.json has the stack's layer count and
``transformers`` loads it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvlang.faces.cli import main

SURGERY = Path(__file__).resolve().parent.parent / "examples" / "surgery"


def _generator():
    spec = importlib.util.spec_from_file_location("tvlang_example_surgery", SURGERY / "make_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def franken(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("surgery")
    shutil.copy(SURGERY / "frankenmerge.tv", root / "frankenmerge.tv")
    assert _generator().main(["--out", str(root / "checkpoints"), "-q"]) == 0
    assert main(["run", str(root / "frankenmerge.tv"), "-o", str(root / "franken"), "-q"]) == 0
    return root / "franken"


def expected() -> dict[str, torch.Tensor]:
    """chat's layers 0..2, then code's layers 1..3 renumbered 3..5; the embeddings from chat
    (the first part), the final norm and lm_head from code (the last)."""
    models = _generator().build()
    chat, code = models["llama-chat"], models["llama-code"]
    out = {"model.embed_tokens.weight": chat["model.embed_tokens.weight"],
           "model.norm.weight": code["model.norm.weight"], "lm_head.weight": code["lm_head.weight"]}
    for new, (model, old) in enumerate([(chat, 0), (chat, 1), (chat, 2), (code, 1), (code, 2), (code, 3)]):
        prefix = f"model.layers.{old}."
        out |= {f"model.layers.{new}.{k[len(prefix):]}": v for k, v in model.items() if k.startswith(prefix)}
    return out


def test_every_tensor_is_the_layer_it_takes(franken):
    got = load_file(franken / "model.safetensors")
    want = expected()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the parts differ, so a wrong layer or model would show
    assert not torch.equal(got["model.layers.3.mlp.up_proj.weight"], got["model.layers.2.mlp.up_proj.weight"])


def test_the_output_has_six_layers_and_loads(franken):
    config = json.loads((franken / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(franken))
    assert len(model.model.layers) == 6
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 32) and torch.isfinite(logits).all()


def test_the_generator_is_deterministic():
    one, two = _generator().build(), _generator().build()
    assert all(torch.equal(one[m][k], two[m][k]) for m in one for k in one[m])
    assert not torch.equal(one["llama-chat"]["lm_head.weight"], one["llama-code"]["lm_head.weight"])
