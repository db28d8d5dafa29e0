"""``tvlang extract-lora``: the adapter it writes loads in PEFT and, merged, equals
``pre + lowrank(d, r)`` (and ``pre + d`` at full rank); the kept-energy figure is the
kept squared singular values over the squared Frobenius norm."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import tvlang  # noqa: E402
from lora_models import load_base, make_adapter, tiny_gpt2, tiny_llama  # noqa: E402
from tvlang.faces.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama and a 'full fine-tune' of it (every float tensor moved)."""
    root = tmp_path_factory.mktemp("extract")
    base = tiny_llama(str(root / "base"))
    sd = load_file(os.path.join(base, "model.safetensors"))
    generator = torch.Generator().manual_seed(5)
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=generator) if v.dtype.is_floating_point else v
          for k, v in sd.items()}
    os.makedirs(root / "ft")
    save_file(ft, str(root / "ft" / "model.safetensors"), metadata={"format": "pt"})
    return base, str(root / "ft")


def peft_merged(base: str, adapter: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base), adapter)
        merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_close(got: dict, want: dict, tol: float) -> None:
    for name, tensor in want.items():
        if not tensor.dtype.is_floating_point:
            continue
        error = (got[name] - tensor).abs().max().item()
        assert error <= tol, (name, error)


@pytest.mark.parametrize("rank", [2, 8])
def test_extracted_adapter_loads_in_peft_and_equals_pre_plus_lowrank(models, tmp_path, rank):
    base, ft = models
    out = str(tmp_path / "adapter")
    result = tvlang.extract_lora("ft - pre", {"pre": base, "ft": ft}, out, rank=rank)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["r"] == rank and config["lora_alpha"] == rank and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == os.path.realpath(base)
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert "model.embed_tokens" in config["target_modules"] and "lm_head" in config["target_modules"]
    assert set(config["modules_to_save"]) == {"model.norm", "model.layers.0.input_layernorm",
                                              "model.layers.0.post_attention_layernorm",
                                              "model.layers.1.input_layernorm",
                                              "model.layers.1.post_attention_layernorm"}
    merged = peft_merged(base, out)
    want = tvlang.compile(f"pre + lowrank(ft - pre, {rank})").evaluate({"pre": base, "ft": ft})
    assert_close(merged, want, 1e-5)
    # tvlang reads its own adapter back the same way
    again = tvlang.compile(f'pre + lora("{out}")').evaluate({"pre": base})
    assert_close(again, want, 1e-5)
    # kept energy: the kept squared singular values over the squared Frobenius norm
    pre, tuned = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(ft, "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    s = torch.linalg.svdvals((tuned[name] - pre[name]).double())
    assert result.kept[name] == pytest.approx(float(s[:rank].square().sum() / s.square().sum()), rel=1e-9)
    total = sum(float((tuned[n] - pre[n]).double().square().sum()) for n in pre if pre[n].dtype.is_floating_point)
    assert result.total == pytest.approx(total, rel=1e-9)
    assert 0 < result.share < 1 and result.left_out == {}


def test_full_rank_extraction_equals_pre_plus_d(models, tmp_path):
    base, ft = models
    out = str(tmp_path / "adapter")
    result = tvlang.extract_lora("ft - pre", {"pre": base, "ft": ft}, out, rank=64)  # >= every matrix's rank
    assert result.share == pytest.approx(1.0, abs=1e-9)
    merged = peft_merged(base, out)
    assert_close(merged, load_file(os.path.join(ft, "model.safetensors")), 1e-5)


def test_other_skip_leaves_norms_out_and_says_so(models, tmp_path, capsys):
    base, ft = models
    out = tmp_path / "adapter"
    code = main(["extract-lora", "-e", "ft - pre", "--bind", f"pre={base}", "--bind", f"ft={ft}", "--rank", "4",
                 "-o", str(out), "--other", "skip", "--per-tensor"])
    assert code == 0
    err = capsys.readouterr().err
    assert "model.norm.weight: left out" in err and "model.layers.0.mlp.up_proj.weight: 0." in err
    assert "wrote a rank-4 adapter of 16 tensors (0 saved whole, 5 left out, 0 zero)" in err
    config = json.load(open(out / "adapter_config.json"))
    assert config["modules_to_save"] is None
    merged = peft_merged(base, str(out))
    pre = load_file(os.path.join(base, "model.safetensors"))
    assert torch.equal(merged["model.norm.weight"], pre["model.norm.weight"])


def test_merging_three_adapters_with_ties_into_one(tmp_path):
    root = tmp_path
    base = tiny_llama(str(root / "base"))
    for seed, name in enumerate("abc", start=1):
        make_adapter(base, str(root / name), seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    expr = "ties(a, b, c, density=0.5)"
    bindings = {"pre": base, **{n: tvlang.lora(str(root / n)) for n in "abc"}}
    out = str(root / "abc")
    # no base in the expression: the names are the adapters', the base name the first adapter's
    code = main(["extract-lora", "-e", expr, *[f"--bind={n}=lora:{root / n}" for n in "abc"], "--rank", "12",
                 "-o", out, "-q"])
    assert code == 0
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["base_model_name_or_path"] == json.load(open(root / "a" / "adapter_config.json"))[
        "base_model_name_or_path"]
    # only the modules the adapters change: every other tensor of the merge is zero
    assert sorted(config["target_modules"]) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert config["modules_to_save"] is None
    merged = peft_merged(base, out)
    want = tvlang.compile(f"pre + lowrank({expr}, 12)").evaluate(bindings)
    assert_close(merged, want, 1e-5)


def test_negated_adapter_round_trip(tmp_path):
    base = tiny_llama(str(tmp_path / "base"))
    merged_a = make_adapter(base, str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj"])
    out = str(tmp_path / "neg")
    tvlang.extract_lora("-tau", {"tau": tvlang.lora(str(tmp_path / "a"))}, out, rank=4)
    merged = peft_merged(base, out)
    pre = load_file(os.path.join(base, "model.safetensors"))
    for name, tensor in pre.items():
        assert (merged[name] - (2 * tensor - merged_a[name])).abs().max() <= 1e-5, name


def test_gpt2_fan_in_fan_out_extraction(tmp_path):
    base = tiny_gpt2(str(tmp_path / "base"))
    make_adapter(base, str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                 fan_in_fan_out=True)
    out = str(tmp_path / "again")
    tvlang.extract_lora("tau", {"tau": tvlang.lora(str(tmp_path / "a"))}, out, rank=4,
                        fan_in_fan_out=True)
    want = tvlang.compile(f'pre + lora("{tmp_path / "a"}")').evaluate({"pre": base})
    assert_close(peft_merged(base, out), want, 1e-5)


def test_outputs_are_atomic_and_never_replace_inputs(models, tmp_path):
    base, ft = models
    out = tmp_path / "adapter"
    tvlang.extract_lora("ft - pre", {"pre": base, "ft": ft}, str(out), rank=2)
    with pytest.raises(tvlang.TvlangError, match="exists"):
        tvlang.extract_lora("ft - pre", {"pre": base, "ft": ft}, str(out), rank=2)
    tvlang.extract_lora("ft - pre", {"pre": base, "ft": ft}, str(out), rank=3, force=True)
    assert json.load(open(out / "adapter_config.json"))["r"] == 3
    with pytest.raises(tvlang.TvlangError, match="input"):
        tvlang.extract_lora("ft - pre", {"pre": base, "ft": ft}, ft, rank=2, force=True)
    with pytest.raises(tvlang.TvlangError, match="is a model, and an adapter holds a task vector"):
        tvlang.extract_lora("ft", {"ft": ft}, str(tmp_path / "x"), rank=2)
    assert not (tmp_path / "x").exists()
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporaries left
    code = main(["extract-lora", "-e", "ft - pre", "--bind", f"pre={base}", "--bind", f"ft={ft}", "--rank", "0",
                 "-o", str(tmp_path / "y")])
    assert code == 2


def test_extraction_through_the_gram_path_equals_the_svd_one(models, tmp_path, monkeypatch):
    import tvlang.ops.lowrank as module

    base, ft = models
    exact = tvlang.compile("pre + lowrank(ft - pre, 6)").evaluate({"pre": base, "ft": ft})
    monkeypatch.setattr(module, "GRAM_ELEMENTS", 100)  # every matrix through X Xᵀ
    out = str(tmp_path / "adapter")
    tvlang.extract_lora("ft - pre", {"pre": base, "ft": ft}, out, rank=6)
    assert_close(peft_merged(base, out), exact, 1e-5)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_a_large_matrix_is_streamed_twice_and_equals_pre_plus_lowrank(tmp_path, monkeypatch, model):
    """With tiny thresholds every matrix counts as large: a tall one's Gram matrix is built from its
    pieces (row blocks that cut across pieces), its U from a second computation of them, and the
    delta is never put together; the factors go to a scratch file as they are made. The result is
    the one of the whole-matrix path (PEFT merges both alike) and equals pre + lowrank(d, r) computed
    unpatched."""
    import tvlang.ops.lowrank as lowrank
    import tvlang.run.chunked as chunked
    import tvlang.run.extract as extract
    from tvlang.run.session import Session

    base = (tiny_llama if model == "llama" else tiny_gpt2)(str(tmp_path / "base"))
    sd = load_file(os.path.join(base, "model.safetensors"))
    generator = torch.Generator().manual_seed(9)
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=generator) if v.dtype.is_floating_point else v
          for k, v in sd.items()}
    os.makedirs(tmp_path / "ft")
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    bindings = {"pre": base, "ft": str(tmp_path / "ft")}
    want = tvlang.compile("pre + lowrank(ft - pre, 5)").evaluate(bindings)
    whole = str(tmp_path / "whole")
    whole_result = tvlang.extract_lora("ft - pre", bindings, whole, rank=5, fan_in_fan_out=model == "gpt2")

    monkeypatch.setattr(lowrank, "GRAM_ELEMENTS", 100)
    monkeypatch.setattr(chunked, "CHUNK_MIN", 100)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 200)  # pieces of 200 entries: rows of 32 cut across them
    streamed, put_together, spooled = [], [], []
    recompute, whole_of, add = Session.recompute, extract._whole, extract.SpooledSafetensors.add
    monkeypatch.setattr(Session, "recompute", lambda self, output, name: (streamed.append(name),
                                                                          recompute(self, output, name))[1])
    monkeypatch.setattr(extract, "_whole", lambda results, shape: (put_together.append(shape),
                                                                   whole_of(results, shape))[1])
    monkeypatch.setattr(extract.SpooledSafetensors, "add", lambda self, key, tensor: (
        spooled.append((key, os.path.getsize(self.scratch))), add(self, key, tensor))[1])
    out = str(tmp_path / "adapter")
    result = tvlang.extract_lora("ft - pre", bindings, out, rank=5, fan_in_fan_out=model == "gpt2")

    tall = [n for n, t in sd.items() if t.dim() == 2 and n.endswith(".weight") and t.shape[0] >= t.shape[1]]
    assert sorted(streamed) == sorted(tall)
    assert all(len(shape) != 2 or shape[0] < shape[1] for shape in put_together)  # wide matrices only
    assert [size for _, size in spooled] == sorted(size for _, size in spooled) and spooled[-1][1] > 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]  # no scratch file
    merged = peft_merged(base, out)
    assert_close(merged, peft_merged(base, whole), 1e-6)
    if model == "llama":  # GPT-2's biases of adapted modules (c_attn.bias) are left out, lowrank keeps them
        assert_close(merged, want, 1e-5)
    assert result.kept == pytest.approx(whole_result.kept, rel=1e-9)
    assert result.share == pytest.approx(whole_result.share, rel=1e-9)
    name = tall[0]
    s = torch.linalg.svdvals((ft[name] - sd[name]).double())
    assert result.kept[name] == pytest.approx(float(s[:5].square().sum() / s.square().sum()), rel=1e-9)
    if model == "llama":  # zero outside the attention: zero tall matrices streamed, not written
        expr = 'select(ft - pre, "*self_attn*")'
        some = tvlang.extract_lora(expr, bindings, str(tmp_path / "attn"), rank=5)
        config = json.load(open(tmp_path / "attn" / "adapter_config.json"))
        assert sorted(config["target_modules"]) == sorted(
            f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert config["modules_to_save"] is None
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"} <= set(some.zero)
        assert_close(peft_merged(base, str(tmp_path / "attn")),
                     tvlang.compile(f"pre + lowrank({expr}, 5)").evaluate(bindings), 1e-5)


def test_a_recipe_output_written_as_an_adapter(models, tmp_path, capsys):
    """``out name = adapter(d, rank)``: tvlang run writes that output as a PEFT adapter directory (its
    rank a param here), in the same commit as the recipe's other outputs; its value is d."""
    base, ft = models
    recipe = tmp_path / "recipe.tv"
    recipe.write_text("param r = 4\ntau = ft - pre\nout half = pre + 0.5*tau\nout small = adapter(tau, r)\n")
    merged_out, adapter_out = tmp_path / "half", tmp_path / "small"
    code = main(["run", str(recipe), "--bind", f"pre={base}", "--bind", f"ft={ft}", "--set", "r=3",
                 "-o", f"half={merged_out}", "-o", f"small={adapter_out}", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["passes"] == 2  # the merged output's pass, then the adapter's own
    assert sorted(os.listdir(adapter_out)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.load(open(adapter_out / "adapter_config.json"))
    assert config["r"] == 3 and config["lora_alpha"] == 3
    assert config["base_model_name_or_path"] == os.path.realpath(base)
    bindings = {"pre": base, "ft": ft}
    assert_close(peft_merged(base, str(adapter_out)),
                 tvlang.compile("pre + lowrank(ft - pre, 3)").evaluate(bindings), 1e-5)
    pre, tuned = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(ft, "model.safetensors"))
    half = load_file(str(merged_out / "model.safetensors"))
    assert_close(half, {k: pre[k] + 0.5 * (tuned[k] - pre[k]) for k in pre}, 1e-6)
    # the output's value is the task vector itself; explain shows the call
    plan = tvlang.compile(recipe.read_text())
    values = plan.evaluate(bindings, output="small")
    assert_close(values, {k: tuned[k] - pre[k] for k in pre if pre[k].dtype.is_floating_point}, 1e-6)
    assert "adapter(tau, r)" in plan.explain()


def test_adapter_outputs_are_checked_before_anything_is_computed(models, tmp_path, capsys):
    base, ft = models
    binds = ["--bind", f"pre={base}", "--bind", f"ft={ft}"]
    code = main(["run", "-e", "adapter(ft - pre, 4)", *binds, "-o", str(tmp_path / "a.safetensors")])
    assert code == 1
    err = capsys.readouterr().err
    assert "a.safetensors: output 'out' is an adapter, which is a directory" in err
    assert "-o out=adapters/out" in err
    recipe = tmp_path / "inside.tv"
    recipe.write_text("tau = ft - pre\nout m = pre + 0.5*adapter(tau, 4)\n")
    code = main(["run", str(recipe), *binds, "-o", str(tmp_path / "m")])
    assert code == 1
    err = capsys.readouterr().err
    assert "inside.tv:2:19: error: output 'm' computes with adapter(...), which is a form of output" in err
    # refused when the recipe is compiled: by tvlang check and the API too, before any binding
    assert main(["check", str(recipe)]) == 1
    assert "inside.tv:2:19: error: output 'm' computes with adapter(...)" in capsys.readouterr().err
    with pytest.raises(tvlang.TvlangError, match=r"only be the whole expression of an out"):
        tvlang.compile("t = adapter(ft - pre, 4)\nout = pre + t\n")
    assert tvlang.compile("t = adapter(ft - pre, 4)\nout a = t\n").output_kind("a") == "delta"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code = main(["run", "-e", "adapter(ft - pre, 4)", *binds, "-o", str(tmp_path / "taken"), "--force"])
    assert code == 1 and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(tvlang.TvlangError, match="output 'out' is an adapter, which the local executor writes"):
        tvlang.compile("adapter(ft - pre, 4)").run({"pre": base, "ft": ft}, tmp_path / "r", executor="ray")
    with pytest.raises(tvlang.TvlangError, match="an adapter holds a task vector: out a = adapter"):
        tvlang.compile("adapter(ft, 4)").run({"ft": ft}, tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["inside.tv", "taken"]  # nothing written, no temporaries
