"""``tvlang check`` and the bad-recipe fixtures (tests/fixtures/bad/NAME.tv + NAME.expected)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tvlang.faces.cli import main
from tvlang.errors import TvlangError
from tvlang.language.syntax import parse
from tvlang.language.checker import check

from tvlang.plan.ir import build

BAD = Path(__file__).parent / "fixtures" / "bad"
ROOT = Path(__file__).resolve().parent.parent


def _directives(text: str) -> tuple[dict[str, str] | None, dict[str, float]]:
    """``# bind: a=model b=delta`` makes the check strict; ``# set: x=1`` overrides params."""
    sources: dict[str, str] | None = None
    params: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# bind:"):
            sources = dict(item.split("=") for item in line[len("# bind:"):].split())
        elif line.startswith("# set:"):
            params.update({k: float(v) for k, v in (item.split("=") for item in line[len("# set:"):].split())})
    return sources, params


def render_bad(path: Path) -> str:
    """The rendered error of one bad recipe (checked leniently unless it says ``# bind:``)."""
    text = path.read_text(encoding="utf-8")
    sources, params = _directives(text)
    try:
        checked = check(parse(text, filename=path.name), source=text, filename=path.name, sources=sources, params=params)
        build(checked)  # what `tvlang check` does next: constant options the kernels would reject
    except TvlangError as err:
        return err.render()
    raise AssertionError(f"{path.name} has no error")


BAD_CASES = sorted(BAD.glob("*.tv"))


def test_there_are_enough_bad_recipes():
    assert len(BAD_CASES) >= 40
    for path in BAD_CASES:
        assert path.with_suffix(".expected").exists(), path.name


@pytest.mark.parametrize("path", BAD_CASES, ids=[p.stem for p in BAD_CASES])
def test_bad_recipe(path):
    expected = path.with_suffix(".expected").read_text(encoding="utf-8")
    assert render_bad(path) + "\n" == expected


# -- the command line ----------------------------------------------------------------

def _write(tmp_path, text, name="recipe.tv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_good_recipe_prints_nothing(tmp_path, capsys):
    path = _write(tmp_path, 'pre = load("base")\nparam lm = 0.4\nout = pre + lm*(ft - pre)\n')
    assert main(["check", str(path), "--bind", "ft=model", "--set", "lm=0.5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_bad_recipe_exit_1_with_the_rendered_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, 'pre = load("base")\nout = pre + 0.4*ft\n')
    assert main(["check", "recipe.tv", "--bind", "ft=model"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "recipe.tv:2:7: error: model coefficients sum to 1.4; a model needs 1 and a task vector 0\n"
        "  out = pre + 0.4*ft\n"
        "        ^^^^^^^^^^^^\n"
        "  note: scale task vectors, not models: pre + 0.4*(ft - pre)\n"
    )


def test_recipe_path_is_shown_as_given(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "out = a +\n", name="sub/r.tv")
    assert main(["check", "./sub/r.tv"]) == 1
    assert capsys.readouterr().err.startswith("./sub/r.tv:1:10: error: unexpected end of input")


def test_expression_with_binds(capsys):
    assert main(["check", "-e", "pre + 0.4*(ft - pre)", "--bind", "pre=model", "--bind", "ft=ft.safetensors"]) == 0
    assert main(["check", "-e", "pre + tau", "--bind", "pre=model", "--bind", "tau=delta"]) == 0
    assert capsys.readouterr().err == ""


def test_expression_errors_name_the_expression(capsys):
    assert main(["check", "-e", "pre + 0.4*ft", "--bind", "pre=model", "--bind", "ft=model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("<expr>:1:1: error: model coefficients sum to 1.4;")
    assert "note: scale task vectors, not models: pre + 0.4*(ft - pre)" in err


def test_unbound_names_are_models_and_near_misses_are_typos(tmp_path, capsys):
    """As explain does, and so that a repository's CI can check recipes whose inputs are
    bound at run time (issue 13); 0.2 called every unbound name unknown."""
    assert main(["check", "-e", "pre + 0.4*(ft - pre)", "--bind", "pre=model"]) == 0
    assert main(["check", "-e", "pre + 0.4*(ft - pre)"]) == 0
    assert main(["check", "-e", "pre + 0.4*tau"]) == 1  # a model unless bound as a task vector
    assert "model coefficients sum to 1.4" in capsys.readouterr().err
    assert main(["check", "-e", "pre + 0.4*tau", "--bind", "tau=delta"]) == 0
    path = _write(tmp_path, "tau = ft - pre\nout = pre + 0.5*tua\n")
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:2:17: error: unknown name 'tua'; did you mean 'tau'?\n")


def test_delta_binding_changes_the_kind(capsys):
    # ft bound as a task vector: pre + 0.4*ft is a model, and ft - pre is not affine-valid
    assert main(["check", "-e", "pre + 0.4*ft", "--bind", "pre=model", "--bind", "ft=delta"]) == 0
    assert main(["check", "-e", "ft - pre", "--bind", "pre=model", "--bind", "ft=delta"]) == 1
    assert "model coefficients sum to -1;" in capsys.readouterr().err


def test_set_of_undeclared_param_is_a_usage_error(tmp_path, capsys):
    """A --set mistake is a command-line mistake: exit 2, as every usage error (issue 13)."""
    path = _write(tmp_path, "param lm = 0.4\nout = pre + lm*(ft - pre)\n")
    assert main(["check", str(path), "--bind", "pre=m", "--bind", "ft=m", "--set", "lam=1"]) == 2
    assert capsys.readouterr().err == f"{path}: error: the recipe has no param 'lam' to set; did you mean 'lm'?\n"
    assert main(["run", str(path), "--bind", "pre=m", "--bind", "ft=m", "--set", "lam=1", "-o", "x"]) == 2
    capsys.readouterr()
    # with a recipe error besides, the recipe's error decides: exit 1
    bad = _write(tmp_path, "param lm = 0.4\nout = pre + lm*ft\n", name="bad.tv")
    assert main(["check", str(bad), "--set", "lam=1"]) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check"], "give a RECIPE file or -e EXPR"),
        (["check", "r.tv", "-e", "a"], "not both"),
        (["check", "-e", "a", "--bind", "a"], "--bind expects NAME=PATH"),
        (["check", "-e", "a", "--bind", "=model"], "--bind expects NAME=PATH"),
        (["check", "-e", "a", "--bind", "a=model", "--bind", "a=delta"], "--bind a is given twice"),
        (["check", "-e", "a", "--set", "x"], "--set expects NAME=NUMBER"),
        (["check", "-e", "a", "--set", "x=abc"], "--set x: 'abc' is not a number"),
        (["check", "-e", "a", "--set", "x=nan"], "not a finite number"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tvlang check: error: ") and message in err


def test_unreadable_recipe_exit_1(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.tv")]) == 1
    assert capsys.readouterr().err == f"error: cannot read recipe {tmp_path / 'missing.tv'}: no such file\n"
    assert main(["check", str(tmp_path)]) == 1
    assert "it is a directory" in capsys.readouterr().err
    binary = tmp_path / "bin.tv"
    binary.write_bytes(b"out = \xff\n")
    assert main(["check", str(binary)]) == 1
    assert "not UTF-8 text" in capsys.readouterr().err


def test_help_has_an_example():
    result = subprocess.run(
        [sys.executable, "-m", "tvlang", "check", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0
    assert "tvlang check recipe.tv --bind pre=base/" in result.stdout


def test_subprocess_exit_codes_and_streams(tmp_path):
    good = _write(tmp_path, "out = pre + 0.5*(ft - pre)\n", "good.tv")
    bad = _write(tmp_path, "out = pre + 0.5*ft\n", "bad.tv")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "tvlang", "check", *args], capture_output=True, text=True, env=env, timeout=60
    )
    ok = run(str(good), "--bind", "pre=model", "--bind", "ft=model")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    failed = run(str(bad), "--bind", "pre=model", "--bind", "ft=model")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith(f"{bad}:1:7: error: model coefficients sum to 1.5;")
    assert "Traceback" not in failed.stderr
    usage = run()
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


# -- checking the checkpoints (headers only) -------------------------------------------


def _checkpoint(path, tensors):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return str(path)


def test_bound_paths_are_checked_like_run(tmp_path, capsys):
    pre = _checkpoint(tmp_path / "pre.safetensors", {"w": (2, 3), "b": (3,)})
    good = _checkpoint(tmp_path / "ft.safetensors", {"w": (2, 3), "b": (3,)})
    bad = _checkpoint(tmp_path / "bad.safetensors", {"w": (3, 2), "b": (3,)})
    expr = "pre + 0.4*(ft - pre)"
    assert main(["check", "-e", expr, "--bind", f"pre={pre}", "--bind", f"ft={good}"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["check", "-e", expr, "--bind", f"pre={pre}", "--bind", f"ft={bad}"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: tensor 'w' has shape (2, 3) in {pre} but (3, 2) in {bad}\n"


def test_recipe_loads_are_checked_only_with_files(tmp_path, capsys):
    _checkpoint(tmp_path / "pre.safetensors", {"w": (2, 3)})
    recipe = tmp_path / "r.tv"
    recipe.write_text('pre = load("pre.safetensors")\nft = load("ft.safetensors")\nout = pre + 0.5*(ft - pre)\n')
    assert main(["check", str(recipe)]) == 0  # no weights needed to check a recipe
    assert main(["check", str(recipe), "--files"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{recipe}:2:6: error: {tmp_path / 'ft.safetensors'}: no such file or directory")
