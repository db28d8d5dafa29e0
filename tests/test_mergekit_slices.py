"""Layer surgery: mergekit's ``slices`` (several slices, part of a model's layers, stacking,
a merge per slice) translated by ``tvlang import`` into ``stack(...)`` recipes, and checked
against ``mergekit-yaml`` itself on tiny 4-layer Llama-shaped checkpoints: every tensor within
1e-6 (float32 and bfloat16 inputs), the same tensor names, and the same layer count in the
output's config.json. Skipped when mergekit is not installed (the translation tests run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from tvlang.errors import TvlangError
from tvlang.faces.cli import main
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

yaml = pytest.importorskip("yaml")

from tvlang.frontends.mergekit import to_recipe, translate  # noqa: E402  (needs PyYAML)

HIDDEN, LAYERS, VOCAB, INTERMEDIATE = 16, 4, 32, 24
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
    "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 32,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def source(model: str, start: int, end: int, extra: str = "") -> str:
    return f"      - model: {model}\n        layer_range: [{start}, {end}]\n{extra}"


def slices(*rows: list[str]) -> str:
    return "slices:\n" + "".join("  - sources:\n" + "".join(row) for row in rows)


# name -> (config, layers of the output). Each is mergekit YAML as a user writes it.
CONFIGS = {
    # mergekit's orcamini-platy-44layer.yml, scaled down: two models' overlapping layer ranges stacked.
    "stack": (slices([source("ft1", 0, 3)], [source("ft2", 1, 4)])
              + "merge_method: passthrough\ndtype: float32\n", 6),
    "stack_bf16": (slices([source("ft1_bf16", 0, 3)], [source("ft2_bf16", 1, 4)])
                   + "merge_method: passthrough\ndtype: bfloat16\n", 6),
    # three slices that come back to the first model
    "stack_three": (slices([source("ft1", 0, 2)], [source("ft2", 1, 3)], [source("ft1", 2, 4)])
                    + "merge_method: passthrough\n", 6),
    # a merge per slice: slerp of each slice's two sources; the base's ranges make the whole base
    "slerp_slices": (slices([source("ft1", 0, 2), source("base", 0, 2)], [source("ft2", 2, 4), source("base", 2, 4)])
                     + "merge_method: slerp\nbase_model: base\nparameters:\n  t: 0.3\ndtype: float32\n", 4),
    # part of the layers, with a gradient: mergekit spreads it over the slice's layers
    "slerp_partial_gradient": (slices([source("ft1", 1, 4), source("base", 1, 4)])
                               + "merge_method: slerp\nbase_model: base\nparameters:\n  t:\n"
                                 "    - filter: self_attn\n      value: [0, 0.5, 1]\n    - value: 0.4\n", 3),
    # TIES per slice over overlapping ranges, with per-source weights and densities
    "ties_slices": (slices([source("ft1", 0, 3, "        parameters: {weight: 0.7, density: 0.5}\n"),
                            source("ft2", 0, 3, "        parameters: {weight: 0.4, density: 0.6}\n"),
                            source("base", 0, 3)],
                           [source("ft2", 2, 4, "        parameters: {weight: 0.7, density: 0.5}\n"),
                            source("ft1", 1, 3, "        parameters: {weight: 0.4, density: 0.6}\n"),
                            source("base", 2, 4)])
                    + "merge_method: ties\nbase_model: base\nparameters:\n  normalize: true\n", 5),
    # linear, positions swapped in the second slice; the base_model is not a source (linear ignores it)
    "linear_swapped": (slices([source("ft1", 0, 2, "        parameters: {weight: 0.6}\n"),
                               source("ft2", 0, 2, "        parameters: {weight: 0.4}\n")],
                              [source("ft2", 2, 4, "        parameters: {weight: 0.6}\n"),
                               source("ft1", 2, 4, "        parameters: {weight: 0.4}\n")])
                       + "merge_method: linear\nbase_model: base\n", 4),
    # a slice's own parameters: t per slice (slerp reads t from the global parameters only)
    "slerp_per_slice_t": (slices([source("ft1", 0, 2), source("base", 0, 2)],
                                 [source("ft2", 2, 3), source("base", 2, 3)],
                                 [source("ft1", 3, 4), source("base", 3, 4)])
                          .replace("  - sources:\n      - model: ft2", "  - parameters: {t: 0.8}\n    sources:\n"
                                   "      - model: ft2")
                          + "merge_method: slerp\nbase_model: base\nparameters:\n  t: 0.2\n", 4),
    # per-slice weights of a position (a source's own), and a slice's density
    "ties_per_slice": (slices([source("ft1", 0, 2, "        parameters: {weight: 0.7}\n"),
                               source("ft2", 0, 2, "        parameters: {weight: 0.4}\n"), source("base", 0, 2)],
                              [source("ft1", 2, 4, "        parameters: {weight: 0.2}\n"),
                               source("ft2", 2, 4, "        parameters: {weight: 0.4}\n"), source("base", 2, 4)])
                       .replace("  - sources:\n      - model: ft1\n        layer_range: [2, 4]",
                                "  - parameters: {density: 0.3}\n    sources:\n      - model: ft1\n"
                                "        layer_range: [2, 4]")
                       + "merge_method: ties\nbase_model: base\nparameters:\n  density: 0.6\n", 4),
    # a slice's own base_model: the base position stacks base's layers 0-1 and ft1's layers 2-3
    "task_arithmetic_slice_base": (slices([source("ft1", 0, 2, "        parameters: {weight: 0.5}\n"),
                                           source("base", 0, 2)],
                                          [source("ft2", 2, 4, "        parameters: {weight: 0.5}\n"),
                                           source("ft1", 2, 4)])
                                   .replace("  - sources:\n      - model: ft2",
                                            "  - base_model: ft1\n    sources:\n      - model: ft2")
                                   + "merge_method: task_arithmetic\nbase_model: base\n", 4),
    # gradients over several slices: mergekit restarts a gradient at each slice (its layer i of n at
    # t = i/(n-1), t = 1 for a one-layer slice); a filter list of gradients; a slice's own gradient
    "slerp_gradient_slices": (slices([source("ft1", 0, 2), source("base", 0, 2)],
                                     [source("ft2", 2, 3), source("base", 2, 3)],
                                     [source("ft1", 1, 4), source("base", 1, 4)])
                              .replace("  - sources:\n      - model: ft1\n        layer_range: [1, 4]",
                                       "  - parameters: {t: [0.9, 0.2]}\n    sources:\n      - model: ft1\n"
                                       "        layer_range: [1, 4]")
                              + "merge_method: slerp\nbase_model: base\nparameters:\n  t:\n"
                                "    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                                "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n", 6),
    # weight and density gradients (global, a source's own, a filter list that falls through to the
    # global gradient); density 0.5 at the middle of a 3-layer slice keeps exactly half
    "ties_gradient_slices": (slices([source("ft1", 0, 3, "        parameters: {weight: [0.2, 0.8]}\n"),
                                     source("ft2", 0, 3, "        parameters:\n          density:\n"
                                                         "            - filter: mlp\n"
                                                         "              value: [1, 0.3]\n"),
                                     source("base", 0, 3)],
                                    [source("ft2", 1, 4, "        parameters: {weight: [0.2, 0.8]}\n"),
                                     source("ft1", 2, 4, "").replace("[2, 4]", "[1, 4]"),
                                     source("base", 1, 4)])
                             + "merge_method: ties\nbase_model: base\nparameters:\n  weight: [1, 0.5]\n"
                               "  density: [0.1, 0.5, 1]\n  normalize: true\n", 6),
    # a slice's own weight gradient, a global one, one slice of one layer (t = 1: the last value)
    "task_arithmetic_gradient_slices": (slices([source("ft1", 0, 2), source("ft2", 0, 2), source("base", 0, 2)],
                                               [source("ft1", 3, 4), source("ft2", 3, 4), source("base", 3, 4)],
                                               [source("ft2", 0, 4), source("ft1", 0, 4), source("base", 0, 4)])
                                        .replace("  - sources:\n      - model: ft1\n        layer_range: [3, 4]",
                                                 "  - parameters: {weight: [0.3, -0.4]}\n    sources:\n"
                                                 "      - model: ft1\n        layer_range: [3, 4]")
                                        + "merge_method: task_arithmetic\nbase_model: base\nparameters:\n"
                                          "  weight: [0.1, 0.7, 0.4]\n  lambda: 0.9\n", 7),
}


def write_models(root: Path) -> None:
    spec = {k: v for k, v in llama_spec(HIDDEN, LAYERS, VOCAB, INTERMEDIATE).items() if k != "model.position_ids"}
    base = make_state_dict(spec, seed=0)
    models = {"base": base, "ft1": finetune_like(base, seed=1, scale=0.01),
              "ft2": finetune_like(base, seed=2, scale=0.01)}
    for name in ("ft1", "ft2"):
        models[f"{name}_bf16"] = {k: v.to(torch.bfloat16) for k, v in models[name].items()}
    for name, state in models.items():
        dtype = "bfloat16" if name.endswith("_bf16") else "float32"
        write_checkpoint(root / name, state, config={**LLAMA_CONFIG, "torch_dtype": dtype})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slices")
    write_models(root)
    for name, (text, _) in CONFIGS.items():
        (root / f"{name}.yml").write_text(text)
    return root


RUN_MERGEKIT = textwrap.dedent("""
    import os, sys
    from mergekit.scripts.run_yaml import main
    pairs = sys.argv[1:]
    for config, out in zip(pairs[::2], pairs[1::2]):
        os.chdir(os.path.dirname(config))
        main([config, out, "--no-write-model-card", "--no-copy-tokenizer", "--quiet"], standalone_mode=False)
""")


@pytest.fixture(scope="module")
def mergekit_outputs(workdir) -> Path:
    pytest.importorskip("mergekit")
    pairs = []
    for name in CONFIGS:
        pairs += [str(workdir / f"{name}.yml"), str(workdir / f"mergekit-{name}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", RUN_MERGEKIT, *pairs], capture_output=True, text=True, env=env,
                          timeout=900)
    if done.returncode != 0:
        pytest.fail(f"mergekit-yaml failed:\n{done.stderr[-4000:]}")
    return workdir


def layer_count(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tvlang_run_equals_mergekit_yaml(mergekit_outputs, name, capsys):
    config = mergekit_outputs / f"{name}.yml"
    ours = mergekit_outputs / f"tvlang-{name}"
    assert main(["run", str(config), "-o", str(ours), "-q"]) == 0
    theirs = mergekit_outputs / f"mergekit-{name}"
    mine, expected = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert sorted(mine) == sorted(expected)
    for tensor, value in expected.items():
        assert mine[tensor].dtype == value.dtype, tensor
        torch.testing.assert_close(mine[tensor].float(), value.float(), rtol=0, atol=1e-6, msg=tensor)
    assert layer_count(ours) == layer_count(theirs) == CONFIGS[name][1]
    assert sum(f".layers.{CONFIGS[name][1] - 1}." in t for t in mine) == 9  # the last layer, every tensor


@pytest.mark.slow
def test_the_stacked_output_loads_with_from_pretrained(mergekit_outputs):
    transformers = pytest.importorskip("transformers")
    ours = mergekit_outputs / "tvlang-stack-loaded"
    assert main(["run", str(mergekit_outputs / "stack.yml"), "-o", str(ours), "-q"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ours))
    assert model.config.num_hidden_layers == len(model.model.layers) == 6
    ft2 = load_file(str(mergekit_outputs / "ft2" / "model.safetensors"))
    # output layer 5 is ft2's layer 3 (slice 2 takes ft2's layers 1..3 as layers 3..5)
    assert torch.equal(model.model.layers[5].mlp.up_proj.weight, ft2["model.layers.3.mlp.up_proj.weight"])


# -- the translation ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_config_imports_as_a_recipe_that_check_accepts(workdir, name, capsys):
    recipe = workdir / f"{name}.tv"
    assert main(["import", str(workdir / f"{name}.yml")]) == 0
    recipe.write_text(capsys.readouterr().out)
    assert main(["check", str(recipe)]) == 0
    assert "slices:" in recipe.read_text()


def per_tensor_values(workdir: Path, name: str) -> dict:
    """Each model's resolved values of a translated config, per output tensor name of a layer
    (``layer.N``), the embeddings and the final norm."""
    from tvlang.frontends.mergekit.config import _Merge
    from tvlang.frontends.mergekit.source import _read, _Source
    from tvlang.ops.context import TensorContext
    from tvlang.ops.pertensor import value_for

    merge = _Merge.from_config(_Source(*_read(workdir / f"{name}.yml")))
    layers = CONFIGS[name][1]
    names = {f"layer.{i}": f"model.layers.{i}.mlp.up_proj.weight" for i in range(layers)}
    names |= {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    values = {}
    for item in merge.inputs:
        for param, value in item.values.items():
            values[item.name, param] = {key: value_for(value, TensorContext(tensor, num_layers=layers))
                                        for key, tensor in names.items()}
    return values


def test_a_gradient_restarts_at_each_slice(workdir):
    values = per_tensor_values(workdir, "task_arithmetic_gradient_slices")
    # weight [0.1, 0.7, 0.4] over slice 0 (2 layers: t = 0, 1), slice 1's own [0.3, -0.4] over its one
    # layer (t = 1), [0.1, 0.7, 0.4] again over slice 2 (4 layers: t = 0, 1/3, 2/3, 1), as mergekit's
    # evaluate_setting computes it; the embeddings and the final norm at t = 0
    expected = {"layer.0": 0.1, "layer.1": 0.4, "layer.2": -0.4, "layer.3": 0.1,
                "layer.4": (1 - 2 / 3) * 0.1 + 2 / 3 * 0.7, "layer.5": (1 - 1 / 3) * 0.7 + 1 / 3 * 0.4,
                "layer.6": 0.4, "embed": 0.1, "norm": 0.1}
    assert values["ft1_ft2", "weight"] == values["ft2_ft1", "weight"] == expected
    assert ("base", "weight") not in values  # task_arithmetic takes no weight for the base
    recipe = to_recipe(workdir / "task_arithmetic_gradient_slices.yml")
    assert "# models[0]: weight per tensor (see the call below) (per slice: the source's, the slice's or the\n" \
        "#   global parameters)\nft1_ft2 = stack(\n" in recipe
    weight = ("        where(\"*.layers.1.* | *.layers.6.*\", 0.4,\n"
              "        where(\"*.layers.2.*\", -0.4,\n"
              "        where(\"*.layers.4.*\", 0.49999999999999994,\n"
              "        where(\"*.layers.5.*\", 0.6,\n"
              "        0.1)))),\n")
    assert recipe.endswith(f"    weights=[\n{weight}{weight}    ],\n)\n")
    assert "base_model; mergekit ignores it" not in recipe  # no weight note for the base's position


def test_a_filter_list_of_gradients_falls_through_per_slice(workdir):
    values = per_tensor_values(workdir, "ties_gradient_slices")
    # position 1 is ft2 (layers 0-2, its own density: mlp [1, 0.3], else the global [0.1, 0.5, 1]),
    # then ft1 (layers 1-3, the global density); every name here is an mlp tensor but the embeddings'
    # and the norm's; the norm is merged with the last slice's parameters, at t = 0
    assert values["ft2_ft1", "density"] == {
        "layer.0": 1.0, "layer.1": 0.65, "layer.2": 0.3, "layer.3": 0.1, "layer.4": 0.5, "layer.5": 1.0,
        "embed": 0.1, "norm": 0.1}
    assert values["ft1_ft2", "weight"] == {
        "layer.0": 0.2, "layer.1": 0.5, "layer.2": 0.8, "layer.3": 0.2, "layer.4": 0.5, "layer.5": 0.8,
        "embed": 0.2, "norm": 0.2}
    assert values["ft2_ft1", "weight"] == {
        "layer.0": 1.0, "layer.1": 0.75, "layer.2": 0.5, "layer.3": 1.0, "layer.4": 0.75, "layer.5": 0.5,
        "embed": 1.0, "norm": 1.0}


def test_a_slice_s_own_gradient_gives_the_final_norm_its_first_value(workdir):
    from tvlang.frontends.mergekit.config import _Merge
    from tvlang.frontends.mergekit.source import _read, _Source
    from tvlang.ops.context import TensorContext
    from tvlang.ops.pertensor import value_for

    t = _Merge.from_config(_Source(*_read(workdir / "slerp_gradient_slices.yml"))).shared["t"]

    def at(tensor: str) -> float:
        return value_for(t, TensorContext(tensor, num_layers=6))  # type: ignore[return-value]

    # slices of 2, 1 and 3 layers; the global filter list over slices 0 and 1 (a one-layer slice sits
    # at t = 1), slice 2's own [0.9, 0.2]
    attention = [at(f"model.layers.{i}.self_attn.q_proj.weight") for i in range(6)]
    mlp = [at(f"model.layers.{i}.mlp.up_proj.weight") for i in range(6)]
    other = [at(f"model.layers.{i}.input_layernorm.weight") for i in range(6)]
    assert attention == [0.0, 1.0, 1.0, 0.9, 0.55, 0.2]
    assert mlp == [1.0, 0.0, 0.0, 0.9, 0.55, 0.2]
    assert other == [0.5, 0.5, 0.5, 0.9, 0.55, 0.2]
    assert (at("model.embed_tokens.weight"), at("model.norm.weight"), at("lm_head.weight")) == (0.5, 0.9, 0.9)
    text = to_recipe(workdir / "slerp_gradient_slices.yml")
    assert "A gradient or filter list restarts at each slice, as in mergekit" in text
    assert all(len(line) <= 96 for line in text.splitlines())
    assert text.split("\n\n")[-1] == (
        "# t per tensor (see the call below) (parameters): t = 0 gives the base, t = 1 ft1_ft2; linear\n"
        "#   where a tensor's two values are nearly colinear (|cos| > 0.9995), as mergekit.\n"
        "out = slerp(\n"
        "    base,\n"
        "    ft1_ft2,\n"
        "    where(\"*.layers.0.* | *embed*\", where(\"*self_attn*\", 0, where(\"*mlp*\", 1, 0.5)),\n"
        "    where(\"*.layers.1.* | *.layers.2.*\", where(\"*self_attn*\", 1, where(\"*mlp*\", 0, 0.5)),\n"
        "    where(\"*.layers.4.*\", 0.55,\n"
        "    where(\"*.layers.5.*\", 0.2,\n"
        "    0.9)))),\n"
        ")\n")


def test_the_stack_recipe_reads_as_written(workdir):
    assert to_recipe(workdir / "stack.yml").split("\n\n", 1)[1] == (
        'ft1_ft2 = stack(load("ft1", layers=[0, 3]), load("ft2", layers=[1, 4]))  # models[0]\n'
        "\n"
        "# passthrough: the model as it is.\n"
        "out = ft1_ft2\n"
    )


def test_a_position_over_every_layer_of_one_model_is_that_model(workdir):
    recipe = to_recipe(workdir / "slerp_slices.yml")
    assert 'base = load("base")' in recipe
    assert 'ft1_ft2 = stack(load("ft1", layers=[0, 2]), load("ft2", layers=[2, 4]))' in recipe
    assert "out = slerp(base, ft1_ft2, 0.3)" in recipe


def test_the_explain_of_a_stack_names_its_parts(workdir):
    translation = translate(workdir / "stack_three.yml")
    text = tvlang.compile(translation.recipe, filename=translation.filename).explain()
    assert "# layer surgery (stack)\nft1_ft2: layers 0-1 of load(\"ft1\"), then layers 1-2 of load(\"ft2\"), then " \
        "layers 2-3 of load(\"ft1\"), renumbered from 0 (6 layers); embeddings from the first part, the other " \
        "tensors outside the layers from the last\n" in text


ERRORS = [
    (slices([source("ft1", 0, 2)], [source("ft2", 0, 2), source("base", 0, 2)]) + "merge_method: linear\n",
     "slices[1] has 2 sources and slices[0] 1", 6),
    (slices([source("ft1", 0, 2), source("ft2", 0, 3)]) + "merge_method: linear\n",
     "the sources of slices[0] take different numbers of layers (2, 3)", 3),
    (slices([source("ft1", 0, 2, "        parameters: {t: 0.1}\n"), source("base", 0, 2)],
            [source("ft2", 2, 4), source("base", 2, 4)]) + "merge_method: nearswap\nbase_model: base\n",
     "t is set for some slices only, and there is no global value for the others", 5),
    (slices([source("ft1", 0, 2, "        parameters: {scale: 0.5}\n")],
            [source("ft2", 2, 4, "        parameters: {scale: 2}\n")]) + "merge_method: passthrough\n",
     "scale differs between slices, and per-slice values of it are not supported", 5),
    # gradients over several slices: a filter list with no value for some tensors, a slice with no value
    (slices([source("ft1", 0, 2), source("base", 0, 2)], [source("ft2", 2, 4), source("base", 2, 4)])
     + "merge_method: slerp\nbase_model: base\nparameters:\n  t:\n    - filter: mlp\n      value: [0, 1]\n",
     "t: no filter matches some tensors of slices[0], and there is no other value for them", 16),
    (slices([source("ft1", 0, 2), source("base", 0, 2)], [source("ft2", 2, 4), source("base", 2, 4)])
     .replace("  - sources:\n      - model: ft2", "  - parameters: {t: [0, 1]}\n    sources:\n      - model: ft2")
     + "merge_method: slerp\nbase_model: base\n",
     "t has no value for slices[0] (neither its sources', its own nor the global parameters give one)", 2),
    (slices([source("ft1", 0, 1)], [source("ft2", 0, 1)]) + "merge_method: passthrough\nparameters:\n"
     "  scale: [0, 1]\n",
     "scale: per-layer values (a gradient) and filter lists are not supported", 10),
    (slices([source("ft1", 0, 2), source("base", 0, 2)], [source("ft2", 2, 4), source("ft1", 2, 4)])
     + "merge_method: slerp\nbase_model: base\nparameters:\n  t: 0.5\n",
     "the base_model of slices[1] is not its sources[1], as it is in slices[0]", 13),
    (slices([source("ft1", 0, 2), source("ft2", 0, 2)]) + "merge_method: task_arithmetic\nbase_model: base\n",
     "task_arithmetic merges each slice with its base_model, and 'base' is not a source of the slices", 8),
    (slices([source("ft1", 0, 2, "        parameters: {scale: 0.5}\n")],
            [source("ft2", 2, 4, "        parameters: {scale: 0.5}\n")]) + "merge_method: passthrough\n",
     "a scaled model (passthrough's scale, linear weights that do not sum to 1) over slices' layer ranges", 3),
    (slices([source("ft1", 2, 6)]) + "merge_method: passthrough\n",
     "layer_range [2, 6] goes beyond the 4 layers of 'ft1'", 4),
    (slices([source("ft1", 2, 2)]) + "merge_method: passthrough\n",
     "layer_range is [START, END], two whole numbers with 0 <= START < END", 4),
]


@pytest.mark.parametrize("config, message, line", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_what_surgery_cannot_express_is_an_error_at_its_line(workdir, config, message, line):
    path = workdir / "bad.yml"
    path.write_text(config)
    with pytest.raises(TvlangError) as caught:
        translate(path)
    assert message in caught.value.message
    assert caught.value.line == line, caught.value.render()
