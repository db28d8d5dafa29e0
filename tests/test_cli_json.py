"""``--json`` on run, check and explain: the documented schema (docs/cli-json.md), key for key,
and errors as JSON objects on stdout with the usual exit status (issue 13)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvlang.faces.cli import main

EXPR = "pre + 0.5*(ft - pre)"


@pytest.fixture()
def files(tmp_path, monkeypatch):
    """A base, and a DDP-style fine-tune ('module.' prefix) lacking one tensor and adding a head."""
    pre = {"embed.w": torch.zeros(2, 3), "layer.0.w": torch.ones(3, 3), "layer.1.w": torch.ones(3, 3),
           "steps": torch.zeros(1, dtype=torch.int64)}
    ft = {"module.embed.w": torch.ones(2, 3), "module.layer.0.w": torch.full((3, 3), 3.0),
          "module.head.w": torch.ones(4)}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


BIND = ["--bind", "pre=pre.safetensors", "--bind", "ft=ft.safetensors"]


def run_json(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


BASE_REPORT = {"name": "pre", "path": "pre.safetensors", "base": True, "rules": [], "matched": 3, "renamed": 0,
               "missing": 0, "from_base": 0, "skipped": 0, "left_out": 0, "tied": 0,
               "examples": {"missing": [], "left_out": [], "tied": []}}


def ft_report(policy: str) -> dict:
    return {"name": "ft", "path": "ft.safetensors", "base": False, "rules": ["removed the prefix 'module.'"],
            "matched": 2, "renamed": 2, "missing": 1, "from_base": 1 if policy == "base" else 0,
            "skipped": 1 if policy == "skip" else 0, "left_out": 1, "tied": 0,
            "examples": {"missing": ["layer.1.w"], "left_out": ["head.w"], "tied": []}}


@pytest.mark.parametrize("policy", ["base", "skip"])
def test_run_json_reports_outputs_inputs_and_counts(files, capsys, policy):
    code, data, err = run_json(capsys, "run", "-e", EXPR, *BIND, "-o", "m.safetensors", "--missing", policy,
                               "--json")
    assert code == 0 and err == ""  # the summary line is replaced by the object; no bar off a terminal
    assert list(data) == ["ok", "outputs", "inputs", "missing_policy", "tensors", "bytes", "passes", "seconds",
                          "notes"]
    # base: embed.w (24 B) and layer.0.w (36 B) computed, layer.1.w (36 B) copied or skipped, steps (8 B) copied
    tensors, nbytes = (4, 104) if policy == "base" else (3, 68)
    assert data["outputs"] == [{"name": "out", "path": "m.safetensors", "kind": "model", "format": "safetensors",
                                "tensors": tensors, "bytes": nbytes}]
    assert data["inputs"] == [BASE_REPORT, ft_report(policy)]
    assert (data["ok"], data["missing_policy"], data["tensors"], data["bytes"], data["passes"]) == \
        (True, policy, tensors, nbytes, 1)
    assert isinstance(data["seconds"], float) and data["seconds"] > 0
    assert data["notes"][0].startswith("ft (ft.safetensors): 2 tensors matched after removed the prefix 'module.'")
    written = load_file("m.safetensors")
    assert sorted(written) == sorted(["embed.w", "layer.0.w", "steps"] + (["layer.1.w"] if policy == "base" else []))
    torch.testing.assert_close(written["layer.0.w"], torch.full((3, 3), 2.0))


def test_run_json_of_several_outputs_and_a_state_dict_file(files, capsys):
    (files / "two.tv").write_text("tau = ft - pre\nout merged = pre + 0.5*tau\nout tau_only = tau\n")
    code, data, _ = run_json(capsys, "run", "two.tv", *BIND, "--missing", "skip", "-o", "merged=m.pt",
                             "-o", "tau_only=tau/", "--json", "-q")
    assert code == 0
    assert data["outputs"] == [
        {"name": "merged", "path": "m.pt", "kind": "model", "format": "torch", "tensors": 3, "bytes": 68},
        {"name": "tau_only", "path": "tau/", "kind": "delta", "format": "directory", "tensors": 2, "bytes": 60},
    ]
    assert data["tensors"] == 5 and data["bytes"] == 128


def test_run_json_error_is_an_object_on_stdout_and_exit_1(files, capsys):
    code, data, err = run_json(capsys, "run", "-e", EXPR, *BIND, "-o", "m.safetensors", "--json")
    assert code == 1
    assert data == {"ok": False, "exit": 1, "errors": [{
        "message": "tensor 'layer.1.w' is in pre.safetensors but missing from ft.safetensors",
        "file": None, "line": None, "column": None, "end_line": None, "end_column": None,
        "tensor": "layer.1.w", "notes": ["choose a policy with --missing base|skip"]}]}
    assert err.startswith("error: tensor 'layer.1.w' is in pre.safetensors but missing from ft.safetensors")


def test_a_recipe_error_places_itself(files, capsys):
    (files / "r.tv").write_text("tau = ft - pre\nout = pre + 0.4*ft\n")
    code, data, err = run_json(capsys, "run", "r.tv", *BIND, "-o", "m.safetensors", "--json")
    assert code == 1
    [error] = data["errors"]
    assert error["message"].startswith("model coefficients sum to 1.4")
    assert (error["file"], error["line"], error["column"], error["end_line"]) == ("r.tv", 2, 7, 2)
    assert err.startswith("r.tv:2:7: error: model coefficients sum to 1.4")


def test_a_usage_error_is_an_object_too_and_exit_2(files, capsys):
    code, data, err = run_json(capsys, "run", "-e", EXPR, *BIND, "--bind", "extra=pre.safetensors",
                               "-o", "m.safetensors", "--json")
    assert code == 2
    message = "--bind extra: the recipe does not use 'extra' (it reads pre, ft)"
    assert data == {"ok": False, "exit": 2, "errors": [{"message": message, "file": None, "line": None,
                                                         "column": None, "end_line": None, "end_column": None,
                                                         "tensor": None, "notes": []}]}
    assert err == f"tvlang run: error: {message}\n"


def test_check_json_ok_lists_inputs_outputs_and_the_files_report(files, capsys):
    code, data, err = run_json(capsys, "check", "-e", EXPR, *BIND, "--missing", "base", "--json")
    assert code == 0 and err == ""
    assert data == {"ok": True, "errors": [],
                    "inputs": [{"name": "pre", "kind": "model", "path": "pre.safetensors"},
                               {"name": "ft", "kind": "model", "path": "ft.safetensors"}],
                    "outputs": [{"name": "out", "kind": "model", "layers": None}],
                    "files": [BASE_REPORT, ft_report("base")], "lock": None}


def test_check_json_of_kinds_opens_no_file(capsys):
    code, data, _ = run_json(capsys, "check", "-e", "pre + 0.5*tau", "--bind", "pre=model", "--bind", "tau=delta",
                             "--json")
    assert code == 0
    assert data == {"ok": True, "errors": [],
                    "inputs": [{"name": "pre", "kind": "model", "path": None},
                               {"name": "tau", "kind": "delta", "path": None}],
                    "outputs": [{"name": "out", "kind": "model", "layers": None}], "files": None, "lock": None}


def test_check_json_lists_every_error_with_its_place(files, capsys):
    (files / "bad.tv").write_text("tau = pre + 0.4*ft\nout = pre + 0.5*tua\n")
    code, data, err = run_json(capsys, "check", "bad.tv", "--bind", "pre=model", "--bind", "ft=model", "--json")
    assert code == 1
    assert list(data) == ["ok", "exit", "errors", "inputs"]
    assert data["ok"] is False and data["exit"] == 1
    assert data["inputs"] == [{"name": "pre", "kind": "model", "path": None}, {"name": "ft", "kind": "model",
                                                                               "path": None}]
    places = [(e["file"], e["line"], e["column"]) for e in data["errors"]]
    assert places == [("bad.tv", 1, 7), ("bad.tv", 2, 17)]  # both errors, in order
    assert data["errors"][0]["message"].startswith("model coefficients sum to 1.4")
    assert data["errors"][1]["message"] == "unknown name 'tua'; did you mean 'tau'?"
    assert "bad.tv:2:17: error: unknown name 'tua'; did you mean 'tau'?" in err


def test_explain_json_has_the_plan_sections(capsys):
    code, data, _ = run_json(capsys, "explain", "-e", "pre + (1/norm(ft - pre))*(ft - pre)", "--json")
    assert code == 0
    assert data == {
        "ok": True,
        "as_written": "out = pre + 1/norm(ft - pre)*(ft - pre)",
        "optimized": "out = (1 + 1/norm(ft - pre)*-1)*pre + 1/norm(ft - pre)*ft",
        "outputs": [{"name": "out", "kind": "model", "reads": ["ft", "pre"]}],
        "passes": 2,
        "reductions": [{"pass": 1, "scalars": [{"name": "r0", "expr": "norm(ft - pre)"}],
                        "steps": ["b0 = read(ft)", "b1 = read(pre)", "b0 -= b1", "r0 <- b0"]}],
        "main": {"pass": 2, "buffers": 3, "steps": ["b0 = read(pre)", "b1 = read(ft)",
                                                    "b2 = (1 + 1/r0*-1) * b0 + 1/r0 * b1", "write(out, b2)"]},
        "scalar_outputs": [],
        "renamed": [],
    }


def test_explain_json_of_scalar_outputs_has_no_main_pass(capsys):
    code, data, _ = run_json(capsys, "explain", "-e", "cos(a - pre, b - pre)", "--json")
    assert code == 0
    assert data["main"] is None and data["passes"] == 1
    assert data["scalar_outputs"] == [{"name": "out", "expr": "r0"}]
    assert data["reductions"][0]["scalars"] == [{"name": "r0", "expr": "cos(a - pre, b - pre)"}]


def test_explain_text_is_rendered_from_the_same_sections(capsys):
    assert main(["explain", "-e", "pre + (1/norm(ft - pre))*(ft - pre)"]) == 0
    assert capsys.readouterr().out.splitlines()[-12:] == [
        "# plan: 2 streaming passes over the inputs",
        "# pass 1: whole-model scalars",
        "r0 = norm(ft - pre)",
        "  b0 = read(ft)", "  b1 = read(pre)", "  b0 -= b1", "  r0 <- b0",
        "# pass 2: per tensor (3 buffers)",
        "  b0 = read(pre)", "  b1 = read(ft)", "  b2 = (1 + 1/r0*-1) * b0 + 1/r0 * b1", "  write(out, b2)",
    ]


def test_similarity_json_errors_follow_the_same_style(files, capsys):
    code, data, err = run_json(capsys, "similarity", "a=nope.safetensors", "b=ft.safetensors", "--base",
                               "pre.safetensors", "--json")
    assert code == 1
    assert data["ok"] is False and data["exit"] == 1 and len(data["errors"]) == 1
    assert "nope.safetensors" in data["errors"][0]["message"]
    assert "nope.safetensors" in err
