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
    (slices([source("ft1", 0, 2)], [source("ft2", 2, 4)]) + "merge_method: slerp\nbase_model: base\n"
     "parameters:\n  t: [0, 1]\n",
     "t: a gradient over several slices is not supported", 11),
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
