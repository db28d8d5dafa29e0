"""tvlang import: mergekit configs translated into recipes, checked against mergekit itself.

The differential tests run mergekit-yaml's entry point (``mergekit.scripts.run_yaml.main``,
what the ``mergekit-yaml`` command runs) on every config in tests/fixtures/mergekit/, all in
one subprocess (importing mergekit takes about 20 s), over tiny Llama-shaped checkpoints,
and compare each tensor with ``tvlang.compile(to_recipe(config), filename=config).run(...)``.
They are skipped when mergekit is not installed. A fixture's first line says how it compares
(docs/mergekit.md explains each difference):

- ``# compare: exact``: every tensor within 1e-6 (float32).
- ``# compare: stock-clamp``: model_stock where some tensors' fine-tunes have a negative mean
  cosine: tvlang returns the base there, and equals mergekit elsewhere.
- ``# compare: bf16``: bfloat16 inputs and output, within one bfloat16 rounding.
- ``# compare: stochastic``: random pruning (DARE, DELLA): the same kept fraction and the
  same rescaling, in expectation.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tvlang
from tvlang.errors import TvlangError
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

yaml = pytest.importorskip("yaml")

from tvlang.frontends.mergekit import to_recipe, translate  # noqa: E402  (needs PyYAML)

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"
CONFIGS = sorted(FIXTURES.glob("*.yml"))
MODELS = ("base", "ft1", "ft2", "ft3", "st1", "st2", "st3", "ft1_bf16", "ft2_bf16")

# A tiny Llama that transformers (and so mergekit) accepts; no integer buffers, which mergekit
# does not know for Llama and would not write.
HIDDEN, LAYERS, VOCAB, INTERMEDIATE = 16, 2, 32, 24
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
    "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 32,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def compare_mode(config: Path) -> str:
    first = config.read_text().splitlines()[0]
    assert first.startswith("# compare: "), f"{config.name}: the first line says how it compares"
    return first.removeprefix("# compare: ").strip()


def write_models(root: Path) -> None:
    """base; ft1..ft3 (independent noise); st1..st3 (a shared direction, plus noise); bf16 copies."""
    spec = {k: v for k, v in llama_spec(HIDDEN, LAYERS, VOCAB, INTERMEDIATE).items() if k != "model.position_ids"}
    base = make_state_dict(spec, seed=0)
    shared = finetune_like(base, seed=10, scale=0.01)
    models = {"base": base}
    for i in (1, 2, 3):
        models[f"ft{i}"] = finetune_like(base, seed=i, scale=0.01)
        noise = finetune_like(base, seed=20 + i, scale=0.01)
        models[f"st{i}"] = {k: shared[k] + noise[k] - base[k] for k in base}
    for name in ("ft1", "ft2"):
        models[f"{name}_bf16"] = {k: v.to(torch.bfloat16) for k, v in models[name].items()}
    for name, state in models.items():
        dtype = "bfloat16" if name.endswith("_bf16") else "float32"
        write_checkpoint(root / name, state, config={**LLAMA_CONFIG, "torch_dtype": dtype})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit")
    write_models(root)
    for config in CONFIGS:
        shutil.copy(config, root / config.name)
    return root


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def run_tvlang(workdir: Path, name: str) -> dict[str, torch.Tensor]:
    config = workdir / f"{name}.yml"
    translation = translate(config)
    out = workdir / f"tvlang-{name}"
    if not out.exists():
        tvlang.compile(translation.recipe, filename=str(config)).run({}, str(out), **translation.options)
    return load(out)


# Runs mergekit-yaml's command for each (config, output) pair, from the config's directory
# (mergekit reads model paths relative to the working directory).
RUN_MERGEKIT = textwrap.dedent("""
    import os, sys
    from mergekit.scripts.run_yaml import main
    pairs = sys.argv[1:]
    for config, out in zip(pairs[::2], pairs[1::2]):
        os.chdir(os.path.dirname(config))
        main([config, out, "--no-write-model-card", "--no-copy-tokenizer", "--random-seed", "0", "--quiet"],
             standalone_mode=False)
""")


@pytest.fixture(scope="module")
def mergekit_outputs(workdir) -> Path:
    pytest.importorskip("mergekit")
    pairs = []
    for config in CONFIGS:
        pairs += [str(workdir / config.name), str(workdir / f"mergekit-{config.stem}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", RUN_MERGEKIT, *pairs], capture_output=True, text=True, env=env,
                          timeout=900)
    if done.returncode != 0:
        pytest.fail(f"mergekit-yaml failed:\n{done.stderr[-4000:]}")
    return workdir


def by_mode(mode: str) -> list[str]:
    return [c.stem for c in CONFIGS if compare_mode(c) == mode]


# -- against mergekit -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", by_mode("exact"))
def test_equals_mergekit(mergekit_outputs, name):
    ours = run_tvlang(mergekit_outputs, name)
    theirs = load(mergekit_outputs / f"mergekit-{name}")
    assert sorted(ours) == sorted(theirs)
    for tensor, expected in theirs.items():
        assert ours[tensor].dtype == expected.dtype == torch.float32, tensor
        torch.testing.assert_close(ours[tensor], expected, rtol=0, atol=1e-6, msg=tensor)


def mean_pairwise_cosine(deltas: list[torch.Tensor]) -> float:
    pairs = list(itertools.combinations([d.flatten().double() for d in deltas], 2))
    return sum(float(a @ b / (a.norm() * b.norm())) for a, b in pairs) / len(pairs)


@pytest.mark.slow
def test_model_stock_negative_cosine_gives_the_base(mergekit_outputs):
    """docs/mergekit.md: tvlang clamps model_stock's mean cosine to [0, 1]."""
    ours = run_tvlang(mergekit_outputs, "model_stock_negative")
    theirs = load(mergekit_outputs / "mergekit-model_stock_negative")
    base = load(mergekit_outputs / "base")
    fts = [load(mergekit_outputs / f"ft{i}") for i in (1, 2, 3)]
    signs = set()
    for tensor, expected in theirs.items():
        cos = mean_pairwise_cosine([ft[tensor] - base[tensor] for ft in fts])
        signs.add(cos >= 0)
        if cos >= 0:
            torch.testing.assert_close(ours[tensor], expected, rtol=0, atol=1e-6, msg=tensor)
        else:
            assert torch.equal(ours[tensor], base[tensor]), tensor
            assert not torch.allclose(expected, base[tensor]), tensor
    assert signs == {True, False}, "the fixture covers both cases"


@pytest.mark.slow
def test_bf16_linear_within_one_rounding(mergekit_outputs):
    ours = run_tvlang(mergekit_outputs, "linear_bf16")
    theirs = load(mergekit_outputs / "mergekit-linear_bf16")
    for tensor, expected in theirs.items():
        assert ours[tensor].dtype == expected.dtype == torch.bfloat16, tensor
        torch.testing.assert_close(ours[tensor].float(), expected.float(), rtol=2**-8, atol=1e-6, msg=tensor)


def task_vector(model: dict, base: dict) -> dict:
    return {k: model[k].double() - base[k].double() for k in base}


def kept_fraction(delta: dict) -> float:
    return sum(int((d != 0).sum()) for d in delta.values()) / sum(d.numel() for d in delta.values())


def l1(delta: dict) -> float:
    return sum(float(d.abs().sum()) for d in delta.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", by_mode("stochastic"))
def test_random_pruning_statistics_match(mergekit_outputs, name):
    """Random masks differ (mergekit draws from torch's global generator, tvlang from seeded
    per-tensor streams); the kept fraction and the rescaled L1 norm match in expectation."""
    config = yaml.safe_load((mergekit_outputs / f"{name}.yml").read_text())
    params = config["parameters"]
    base = load(mergekit_outputs / "base")
    ours = task_vector(run_tvlang(mergekit_outputs, name), base)
    theirs = task_vector(load(mergekit_outputs / f"mergekit-{name}"), base)
    # About 5400 entries: the binomial standard deviation of a kept fraction is under 0.007.
    assert abs(kept_fraction(ours) - kept_fraction(theirs)) < 0.04
    if len(config["models"]) == 1:
        weight = config["models"][0]["parameters"]["weight"]
        full = {k: weight * v for k, v in task_vector(load(mergekit_outputs / "ft1"), base).items()}
        for delta in (ours, theirs):
            assert abs(kept_fraction(delta) - params["density"]) < 0.04
            if params.get("rescale", True):
                assert abs(l1(delta) / l1(full) - 1) < 0.06
                # mergekit 0.1.5 and the translation (rescale_by="l1") restore each tensor's L1 norm
                for k, d in delta.items():
                    assert abs(float(d.abs().sum()) / float(full[k].abs().sum()) - 1) < 1e-4, k
            else:  # the kept entries are unchanged
                for k, d in delta.items():
                    kept = d != 0
                    torch.testing.assert_close(d[kept], full[k][kept], rtol=1e-5, atol=1e-7)
    assert abs(l1(ours) / l1(theirs) - 1) < 0.06


# -- the translation ----------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_fixture_translates_to_a_checked_recipe_that_reads_the_base_first(workdir, config):
    translation = translate(workdir / config.name)
    plan = tvlang.compile(translation.recipe, filename=translation.filename)
    data = yaml.safe_load(config.read_text())
    first = data.get("base_model") or data["models"][0]["model"]
    # The output's config.json (and tokenizer) come from the first model read, as mergekit's
    # come from base_model (or the first model).
    sources = {s: spec.path for s, spec in plan.optimized.sources.items()}
    assert os.path.basename(sources[plan.sources_read()[0]]) == first
    assert f"merge_method: {data['merge_method']}" in translation.recipe


def test_ties_recipe_reads_as_written(workdir):
    assert to_recipe(workdir / "ties.yml") == (FIXTURES / "ties.tv").read_text()


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_the_recipe_fits_the_line_and_loads_only_what_it_uses(workdir, config):
    recipe = to_recipe(workdir / config.name)
    code = [line.split("  # ")[0] for line in recipe.splitlines() if not line.startswith("#")]
    assert all(len(line) <= 96 for line in code), [line for line in code if len(line) > 96]
    body = "\n".join(line for line in code if " = load" not in line)
    names = [line.split(" = ")[0] for line in code if " = load" in line]
    assert all(re.search(rf"\b{name}\b", body) for name in names), names


def test_long_della_calls_break_one_option_per_line(workdir):
    assert to_recipe(workdir / "della_gradient.yml").endswith(
        "out = base + della(\n"
        "    ft1 - base,\n"
        "    ft2 - base,\n"
        "    density=1,\n"
        "    epsilon=where(\"*mlp*\", 0.2, 0.1),\n"
        "    weights=[layers(0.3, 0.9), 0.6],\n"
        "    merge=\"weighted_mean\",\n"
        "    rescale_by=\"l1\",\n"
        ")\n")


def test_a_model_read_only_as_plain_numbers_is_not_loaded_as_a_model(workdir):
    recipe = to_recipe(workdir / "linear_unnormalized_gradient.yml")
    assert 'load("ft2")' not in recipe
    assert recipe.split("\n\n")[1] == (
        'ft1 = load("ft1")            # models[0]: weight layers(0.2, 0.9) (models[0].parameters)\n'
        'ft1_raw = load_delta("ft1")  # ft1\'s tensors as plain numbers\n'
        'ft2_raw = load_delta("ft2")  # models[1]: weight where("*mlp*", 0.5, 0.3) (models[1].parameters): read as '
        'plain numbers')


def test_text_input_resolves_paths_from_the_working_directory(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    text = "models:\n  - model: ft1\n  - model: ft2\nmerge_method: linear\nparameters:\n  weight: 1\n"
    recipe = to_recipe(text)
    assert "out = (ft1 + ft2)/2" in recipe
    assert "# A mergekit config as a tvlang recipe" in recipe
    result = tvlang.compile(recipe).evaluate({})
    ft1, ft2 = load(workdir / "ft1"), load(workdir / "ft2")
    torch.testing.assert_close(result["lm_head.weight"], (ft1["lm_head.weight"] + ft2["lm_head.weight"]) / 2)


def test_dtypes_become_run_options_and_comments(workdir):
    def options(extra: str) -> tuple[dict, str]:
        translation = translate(f"models:\n  - model: {workdir / 'ft1'}\nmerge_method: passthrough\n{extra}")
        return translation.options, translation.recipe

    assert options("")[0] == {}
    got, recipe = options("dtype: bfloat16\n")
    assert got == {"out_dtype": "bfloat16"} and "--out-dtype bfloat16" in recipe
    assert options("dtype: float16\nout_dtype: float32\n")[0] == {"out_dtype": "float32"}
    assert options("dtype: torch.float64\n")[0] == {"dtype": "float64", "out_dtype": "float64"}


def test_ignored_parameters_are_said_in_the_recipe(workdir):
    recipe = to_recipe(textwrap.dedent(f"""\
        models:
          - model: {workdir / 'ft1'}
            parameters:
              t: 0.5
          - model: {workdir / 'base'}
        base_model: {workdir / 'base'}
        merge_method: slerp
        parameters:
          t: 0.3
          weight: 0.7
    """))
    assert "models[0].parameters.t: mergekit reads 't' from the global parameters only" in recipe
    assert "parameters.weight: 'weight' has no effect on slerp" in recipe
    assert recipe.rstrip().endswith("out = slerp(base, ft1, 0.3)")


def test_tokenizer_source_base_takes_the_base_files(workdir):
    recipe = to_recipe(textwrap.dedent(f"""\
        models:
          - model: {workdir / 'ft1'}
            parameters: {{weight: 1}}
        base_model: {workdir / 'base'}
        merge_method: task_arithmetic
        tokenizer_source: base
    """))
    assert "tokenizer_source: base -> the output takes" in recipe


# Configs tvlang cannot express (yet), or that are wrong: (config, message, line of the caret).
# {root} is the directory of the test checkpoints.
ERRORS = [
    ("models:\n  - model: {root}/ft1\nmerge_method: linear\nslices: []\n",
     "give models or slices, not both", 4),
    ("slices:\n  - sources:\n      - model: {root}/ft1\n        layer_range: [0, 3]\nmerge_method: passthrough\n",
     "layer_range [0, 3] goes beyond the 2 layers of", 4),
    ("slices:\n  - sources:\n      - model: {root}/ft1\n        layer_range: [0, 2]\n"
     "  - sources:\n      - model: {root}/ft2\n        layer_range: [0, 2]\n      - model: {root}/base\n"
     "        layer_range: [0, 2]\nmerge_method: linear\n",
     "slices[1] has 2 sources and slices[0] 1", 6),
    ("slices:\n  - sources:\n      - model: {root}/ft1\n        layer_range: [0, 1]\n"
     "  - sources:\n      - model: {root}/ft2\n        layer_range: [0, 1]\nmerge_method: passthrough\n"
     "parameters:\n  scale: [0, 1]\n",
     "scale: per-layer values (a gradient) and filter lists are not supported", 10),
    ("slices:\n  - sources:\n      - model: {root}/ft1\n        layer_range: [0, 2]\n    weight: 1\n"
     "merge_method: passthrough\n",
     "unknown key 'weight' in a slice", 5),
    ("modules: {{}}\nmerge_method: linear\nmodels:\n  - model: {root}/ft1\n",
     "modules: per-module merges are not supported", 1),
    ("models:\n  - model: {root}/ft1\n    parameters:\n      weight: [0.1, 0.5, 1]\n"
     "  - model: {root}/ft2\n    parameters:\n      weight: 0.5\n"
     "base_model: {root}/base\nmerge_method: nuslerp\n",
     "weight: per-layer values (a gradient) and filter lists are not supported", 4),
    ("models:\n  - model: {root}/ft1\nbase_model: {root}/base\nmerge_method: task_arithmetic\nparameters:\n"
     "  lambda: [0.5, 1]\n",
     "lambda: per-layer values (a gradient) and filter lists are not supported", 6),
    ("models:\n  - model: {root}/ft1\n    parameters:\n      weight: {{filter: mlp, value: 0.5}}\n"
     "base_model: {root}/base\nmerge_method: task_arithmetic\n",
     "weight: no filter matches some tensors, and there is no other value for them", 4),
    ("models:\n  - model: {root}/ft1\nmerge_method: linear\ntokenizer_source: union\nparameters: {{weight: 1}}\n",
     "a union of the models' vocabularies is not supported", 4),
    ("models:\n  - model: {root}/ft1\nmerge_method: passthrough\ntokenizer:\n  source: base\n  tokens: {{}}\n",
     "tokenizer.tokens is not supported", 6),
    ("models:\n  - model: {root}/ft1\nmerge_method: passthrough\ntokenizer_source: base\n",
     "tokenizer_source: base needs a base_model", 4),
    ("models:\n  - model: {root}/ft1\nmerge_method: passthrough\ntokenizer_source: {root}/ft2\n",
     "copying the tokenizer of", 4),
    ("models:\n  - model: {root}/ft1\nmerge_method: passthrough\nchat_template: chatml\n",
     "chat_template: setting a chat template is not supported", 4),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/ft2\nbase_model: {root}/base\nmerge_method: arcee_fusion\n",
     "arcee_fusion merges exactly 2 models (base_model counts as one); this config gives 3", 2),
    ("models:\n  - model: {root}/ft1\nmerge_method: sce\n",
     "sce needs a base_model", 3),
    ("models:\n  - model: {root}/ft1\nbase_model: {root}/base\nmerge_method: tie\n",
     "unknown merge_method 'tie'", 4),
    ("models:\n  - model: ./not/here\nmerge_method: passthrough\n",
     "model './not/here' is neither a local path", 2),
    ("models:\n  - model: {root}/ft1+{root}/lora\nmerge_method: passthrough\n",
     "a LoRA adapter (model+lora) is not supported", 2),
    ("models:\n  - model: {root}/ft1\n    parameters: {{densty: 0.5, weight: 1}}\nbase_model: {root}/base\n"
     "merge_method: ties\n",
     "unknown parameter 'densty' in models[0].parameters", 3),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/ft2\n    parameters: {{weight: 1}}\n"
     "base_model: {root}/base\nmerge_method: ties\n",
     "ties needs parameter 'weight' for models[0]", 2),
    ("models:\n  - model: {root}/ft1\n    parameters: {{weight: 1}}\nmerge_method: ties\n",
     "ties needs a base_model", 4),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/ft1\nmerge_method: linear\n",
     "is merged twice (models[0] and models[1])", 3),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/ft2\n  - model: {root}/ft3\nbase_model: {root}/base\n"
     "merge_method: nuslerp\nparameters: {{weight: 1}}\n",
     "nuslerp merges at most 3 models (base_model counts as one); this config gives 4", 2),
    ("models:\n  - model: {root}/ft1\n    parameters: {{weight: 1}}\n  - model: {root}/ft2\n"
     "    parameters: {{weight: -1}}\nmerge_method: multislerp\n",
     "multislerp with normalize_weights: true needs weights whose sum is not 0", 2),
    ("models:\n  - model: {root}/base\nbase_model: {root}/base\nmerge_method: multislerp\n",
     "multislerp needs at least one model besides the base_model", 2),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/ft2\nmerge_method: karcher\nparameters: {{max_iter: 2.5}}\n",
     "max_iter must be a whole number, got 2.5", 5),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/base\nbase_model: {root}/base\nmerge_method: nearswap\n"
     "parameters: {{t: -0.1}}\n",
     "nearswap's t must be at least 0, got -0.1", 6),
    ("models:\n  - model: {root}/ft1\nbase_model: {root}/base\nmerge_method: nearswap\n",
     "nearswap needs parameter 't'", 4),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/base\nbase_model: {root}/base\nmerge_method: slerp\n"
     "parameters:\n  t:\n    - filter: mlp\n      value: 0.5\n",
     "t: no filter matches some tensors, and there is no other value for them", 8),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/base\nbase_model: {root}/base\nmerge_method: slerp\n"
     "parameters:\n  t:\n    - filter: mlp|attn\n      value: 0.5\n    - value: 1\n",
     "t: a filter is the text a tensor name contains (without '|')", 8),
    ("models:\n  - model: {root}/ft1\n    parameters: {{weight: 1, density: 0.4}}\n  - model: {root}/ft2\n"
     "base_model: {root}/base\nmerge_method: della\nparameters: {{weight: 1, density: 0.5}}\n",
     "della with a different density per model is not supported", 7),
    ("models:\n  - model: {root}/ft1\n    parameters: {{weight: 1, density: 1.5}}\nbase_model: {root}/base\n"
     "merge_method: ties\n",
     "density must be in [0, 1], got 1.5", 3),
    ("models:\n  - model: {root}/ft1\n  - model: {root}/ft2\n  - model: {root}/ft3\nbase_model: {root}/base\n"
     "merge_method: slerp\nparameters: {{t: 0.5}}\n",
     "slerp merges exactly 2 models (base_model counts as one); this config gives 4", 2),
    ("models:\n  - model: {root}/ft1\nbase_model: {root}/base\nmerge_method: slerp\n",
     "slerp needs parameter 't'", 4),
    ("models:\n  - model: {root}/ft1\nmerge_method: passthrough\ndtype: int8\n",
     "dtype must be float32, float16, bfloat16 or float64, got 'int8'", 4),
    ("models:\n  - model: {root}/ft1\nmerge_method: passthrough\nbase_modle: {root}/base\n",
     "unknown key 'base_modle' in a mergekit config", 4),
    ("models:\n  - {root}/ft1\nmerge_method: passthrough\n",
     "a models entry is a mapping: '- model: PATH'", 2),
    ("models:\n  - model: {root}/ft1\n    parameters: {{scale: yes please}}\nmerge_method: passthrough\n",
     "scale must be a number, got 'yes please'", 3),
    ("models:\n  - model: {root}/ft1\n   parameters: {{}}\nmerge_method: passthrough\n",
     "not valid YAML", 3),
    ("merge_method: linear\n", "the config has no models", 1),
]


@pytest.mark.parametrize("config, message, line", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_what_tvlang_cannot_express_is_an_error_at_its_line(workdir, tmp_path, config, message, line):
    path = tmp_path / "merge.yml"
    path.write_text(config.format(root=workdir))
    with pytest.raises(TvlangError) as caught:
        to_recipe(path)
    error = caught.value
    assert message in error.message
    assert error.line == line
    assert error.render().startswith(f"{path}:{line}:")


def test_a_config_file_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(TvlangError, match="cannot read the config"):
        to_recipe(tmp_path / "nothing.yml")


def test_the_front_end_imports_no_torch():
    code = ("import sys, tvlang.frontends.mergekit as m; "
            "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if 'torch' in k)[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)



# -- the command line ---------------------------------------------------------------------------

def test_tvlang_import_prints_the_recipe(workdir, capsys):
    from tvlang.faces.cli import main

    assert main(["import", str(workdir / "ties.yml")]) == 0
    assert capsys.readouterr().out == to_recipe(workdir / "ties.yml")


def test_tvlang_import_reports_errors_at_the_config_line(tmp_path, capsys):
    from tvlang.faces.cli import main

    config = tmp_path / "merge.yml"
    config.write_text("models:\n  - model: ft1\nmerge_method: linear\nslices: []\n")
    assert main(["import", str(config)]) == 1
    assert capsys.readouterr().err == (
        f"{config}:4:1: error: give models or slices, not both\n"
        "  slices: []\n"
        "  ^^^^^^\n"
    )


def test_tvlang_run_runs_a_config_with_its_dtype(workdir, tmp_path, capsys):
    from tvlang.faces.cli import main

    config = tmp_path / "merge.yml"  # float32 models, merged and written in bfloat16
    config.write_text(f"models:\n  - model: {workdir / 'ft1'}\n    parameters: {{weight: 0.7}}\n"
                      f"  - model: {workdir / 'ft2'}\n    parameters: {{weight: 0.3}}\n"
                      "merge_method: linear\ndtype: bfloat16\n")
    assert main(["run", str(config), "-o", str(tmp_path / "merged"), "-q"]) == 0
    merged = load(tmp_path / "merged")
    expected = tvlang.compile(to_recipe(config), filename=str(config)).evaluate({}, out_dtype="bfloat16")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert main(["run", str(config), "-o", str(tmp_path / "as_f32"), "-q", "--out-dtype", "float32"]) == 0
    assert {t.dtype for t in load(tmp_path / "as_f32").values()} == {torch.float32}
    assert main(["check", str(config)]) == 0
