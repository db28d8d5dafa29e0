"""-o/--out FILE on the commands that print a report: check, explain, show, import, similarity (issue 13).

Each writes to FILE exactly what it prints to stdout without -o, and prints nothing there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvlang.faces.cli import main


@pytest.fixture()
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    pre = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    for name, shift in (("pre", 0.0), ("a", 1.0), ("b", -0.5)):
        save_file({k: v + shift * torch.randn_like(v) for k, v in pre.items()}, f"{name}.safetensors")
    (tmp_path / "merge.tv").write_text("out = pre + 0.5*(a - pre)\n")
    return tmp_path


def same_as_stdout(capsys, argv: list[str], path: str) -> str:
    """Run ``argv`` with and without ``-o path``: the file holds what stdout had, and stdout is empty."""
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert main([*argv, "-o", path]) == 0
    assert capsys.readouterr().out == ""
    with open(path, encoding="utf-8") as handle:
        written = handle.read()
    assert written == printed and written
    assert not [name for name in os.listdir(os.path.dirname(os.path.abspath(path))) if ".tvtmp" in name]
    return written


def test_explain_and_check_write_their_report_to_the_file(work, capsys):
    text = same_as_stdout(capsys, ["explain", "merge.tv"], "plan.txt")
    assert text.startswith("# as written\nout = pre + 0.5*(a - pre)\n")
    data = json.loads(same_as_stdout(capsys, ["explain", "merge.tv", "--json"], "plan.json"))
    assert data["ok"] is True
    data = json.loads(same_as_stdout(capsys, ["check", "merge.tv", "--bind", "pre=pre.safetensors", "--bind",
                                              "a=a.safetensors", "--json"], "check.json"))
    assert data["ok"] is True and [entry["name"] for entry in data["inputs"]] == ["pre", "a"]


def test_show_and_similarity_write_their_report_to_the_file(work, capsys):
    assert main(["run", "merge.tv", "--bind", "pre=pre.safetensors", "--bind", "a=a.safetensors",
                 "-o", "merged.safetensors", "-q"]) == 0
    capsys.readouterr()
    assert "recipe:" in same_as_stdout(capsys, ["show", "merged.safetensors"], "show.txt")
    assert same_as_stdout(capsys, ["show", "merged.safetensors", "--recipe"], "recipe.tv") == \
        "out = pre + 0.5*(a - pre)\n"
    data = json.loads(same_as_stdout(capsys, ["similarity", "a=a.safetensors", "b=b.safetensors", "--base",
                                              "pre.safetensors", "--json", "-q"], "sim.json"))
    assert data["names"] == ["a", "b"]


def test_import_writes_the_recipe_to_the_file(work, capsys):
    from tvlang.frontends.mergekit import translate

    os.mkdir("ft1")
    os.mkdir("ft2")
    Path("merge.yml").write_text("models:\n  - model: ft1\n  - model: ft2\nmerge_method: linear\n"
                                 "parameters:\n  weight: 1\n")
    assert same_as_stdout(capsys, ["import", "merge.yml"], "imported.tv") == translate(Path("merge.yml")).recipe


def test_an_existing_report_is_replaced_and_a_failure_leaves_it_unless_json(work, capsys):
    (work / "plan.txt").write_text("old\n")
    assert main(["explain", "merge.tv", "-o", "plan.txt"]) == 0
    assert Path("plan.txt").read_text().startswith("# as written")
    (work / "plan.txt").write_text("old\n")
    assert main(["explain", "-e", "pre + 0.4*ft", "-o", "plan.txt"]) == 1  # the error is on stderr only
    assert Path("plan.txt").read_text() == "old\n"
    assert main(["check", "-e", "pre + 0.4*ft", "--json", "-o", "plan.txt"]) == 1
    data = json.loads(Path("plan.txt").read_text())  # with --json the failure's object is the report
    assert data["ok"] is False and data["exit"] == 1
    assert "model coefficients sum to 1.4" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["explain", "merge.tv", "-o", "merge.tv"], "-o merge.tv: the command reads this file"),
    (["check", "merge.tv", "--bind", "pre=pre.safetensors", "--bind", "a=a.safetensors", "-o", "a.safetensors"],
     "-o a.safetensors: the command reads this file"),
    (["similarity", "a=a.safetensors", "b=b.safetensors", "--base", "pre.safetensors", "-o", "pre.safetensors"],
     "-o pre.safetensors: the command reads this file"),
    (["explain", "merge.tv", "-o", "."], "-o .: a directory; give the name of a file"),
    (["explain", "merge.tv", "-o", "nowhere/plan.txt"], "-o nowhere/plan.txt: no directory nowhere"),
])
def test_an_input_or_a_directory_is_refused_before_anything_runs(work, capsys, argv, message):
    before = {name: os.path.getmtime(name) for name in os.listdir(".")}
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert {name: os.path.getmtime(name) for name in os.listdir(".")} == before
