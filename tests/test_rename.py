"""Explicit renaming in the language: load(PATH, strip_prefix=..., add_prefix=...) (issue 13).

The checkpoints carry prefixes four components deep (an EMA checkpoint's
``ckpt.ema.shadow.params.``), which automatic alignment does not match; the
renamed recipe's result equals an eager hand computation, explain shows the
renaming, and the run's report counts the renamed tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tvlang
from tvlang import TvlangError
from tvlang.faces.cli import main

DEEP = "ckpt.ema.shadow.params."


@pytest.fixture()
def files(tmp_path):
    torch.manual_seed(0)
    pre = {"embeddings.weight": torch.randn(4, 3), "encoder.0.weight": torch.randn(3, 3),
           "encoder.0.bias": torch.randn(3)}
    ft = {name: value + torch.randn_like(value) for name, value in pre.items()}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file({DEEP + name: value for name, value in ft.items()}, str(tmp_path / "ft.safetensors"))
    return tmp_path, pre, ft


def recipe(tmp_path, text: str) -> str:
    path = tmp_path / "merge.tv"
    path.write_text(text)
    return str(path)


def test_automatic_alignment_does_not_match_a_deep_prefix(files):
    tmp_path, _, _ = files
    plan = tvlang.compile('pre = load("pre.safetensors")\nft = load("ft.safetensors")\nout = pre + 0.5*(ft - pre)\n',
                          filename=recipe(tmp_path, ""))
    with pytest.raises(TvlangError, match="contributes nothing") as info:
        plan.run({}, str(tmp_path / "never.safetensors"))
    assert any("rename them on the binding or in the recipe" in note for note in info.value.notes)


def test_strip_prefix_renames_the_input_and_equals_a_hand_computation(files, capsys):
    tmp_path, pre, ft = files
    text = (f'pre = load("pre.safetensors")\nft = load("ft.safetensors", strip_prefix="{DEEP}")\n'
            "out = pre + 0.3*(ft - pre)\n")
    path = recipe(tmp_path, text)
    out = tmp_path / "merged.safetensors"
    assert main(["run", path, "-o", str(out), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    ft_report = next(entry for entry in report["inputs"] if entry["name"] == "ft")
    assert (ft_report["matched"], ft_report["renamed"], ft_report["missing"]) == (3, 3, 0)
    merged = load_file(str(out))
    assert sorted(merged) == sorted(pre)
    for name, value in pre.items():
        assert torch.allclose(merged[name], value + 0.3 * (ft[name] - value), atol=1e-6), name
    summary = tvlang.compile(text, filename=path).run({}, str(tmp_path / "again.safetensors"))
    assert f"3 tensors matched after removed the prefix '{DEEP}' (strip_prefix)" in "\n".join(summary.notes)


def test_explain_shows_the_renaming(files, capsys):
    tmp_path, _, _ = files
    text = (f'pre = load("pre.safetensors", add_prefix="m.")\nft = load("ft.safetensors", strip_prefix="{DEEP}",'
            ' add_prefix="m.")\nout = pre + 0.3*(ft - pre)\n')
    path = recipe(tmp_path, text)
    assert main(["explain", path]) == 0
    shown = capsys.readouterr().out
    assert ("# renamed\n"
            "pre: tensor names get the prefix 'm.', before automatic alignment\n"
            f"ft: tensor names lose the prefix '{DEEP}' then get the prefix 'm.',"
            " before automatic alignment\n") in shown
    assert main(["explain", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["renamed"] == [
        {"source": "pre", "strip_prefix": None, "add_prefix": "m."},
        {"source": "ft", "strip_prefix": DEEP, "add_prefix": "m."}]


def test_add_prefix_on_the_base_renames_the_output(files):
    tmp_path, pre, ft = files
    text = (f'pre = load("pre.safetensors", add_prefix="{DEEP}")\nft = load("ft.safetensors")\n'
            "out = pre + 0.5*(ft - pre)\n")
    out = tmp_path / "merged.safetensors"
    tvlang.compile(text, filename=recipe(tmp_path, text)).run({}, str(out))
    merged = load_file(str(out))
    assert sorted(merged) == sorted(DEEP + name for name in pre)
    for name, value in pre.items():
        assert torch.allclose(merged[DEEP + name], (value + ft[name]) / 2, atol=1e-6), name


def test_renaming_mistakes_are_errors_naming_them(files):
    tmp_path, _, _ = files
    path = recipe(tmp_path, "")
    plan = tvlang.compile('pre = load("pre.safetensors")\nft = load("ft.safetensors", strip_prefix="model.")\n'
                          "out = pre + 0.5*(ft - pre)\n", filename=path)
    with pytest.raises(TvlangError, match="strip_prefix='model.': no tensor of .*ft.safetensors starts") as info:
        plan.run({}, str(tmp_path / "never.safetensors"))
    assert info.value.notes == (f"its names look like '{DEEP}embeddings.weight'",)
    save_file({"a.w": torch.zeros(1), "b.a.w": torch.zeros(1)}, str(tmp_path / "clash.safetensors"))
    plan = tvlang.compile('pre = load("pre.safetensors")\nft = load("clash.safetensors", strip_prefix="b.")\n'
                          "out = pre + 0.5*(ft - pre)\n", filename=path)
    with pytest.raises(TvlangError, match="removed the prefix 'b.' \\(strip_prefix\\) makes 'a.w' and 'b.a.w' of"
                                          " .*clash.safetensors one name, 'a.w'"):
        plan.run({}, str(tmp_path / "never.safetensors"))
    with pytest.raises(TvlangError, match="strip_prefix is a non-empty string of the prefix"):
        tvlang.compile('load("pre.safetensors", strip_prefix="")')
    with pytest.raises(TvlangError, match="a part of stack cannot rename its tensors"):
        tvlang.compile('stack(load("a", layers=[0, 1], strip_prefix="x."))')
    assert not list(tmp_path.glob("never*"))
