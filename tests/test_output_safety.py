"""Outputs never lose data: ``--force`` replaces only what tvlang writes, outputs are distinct
from each other and from every input the recipe names (issue 18, cases 1-3 and 15).

Each test snapshots the files around the run and asserts that nothing but the intended
output changed, byte for byte.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tvlang.faces.cli import main
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

SPEC = llama_spec(hidden=8, layers=1, vocab=16, intermediate=12)


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """A working directory with a recipe's inputs in it and an unrelated document."""
    pre = make_state_dict(SPEC, seed=0)
    ft = finetune_like(pre, seed=1)
    write_checkpoint(str(tmp_path / "pre"), pre)
    write_checkpoint(str(tmp_path / "ft"), ft)
    (tmp_path / "notes.txt").write_text("my notes\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path, pre, ft


def snapshot(root) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), symlinks by their target."""
    files = {}
    for directory, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                files[rel] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    files[rel] = hashlib.sha256(f.read()).hexdigest()
    return files


BIND = ["--bind", "pre=pre", "--bind", "ft=ft"]


def test_empty_output_with_force_is_refused_and_nothing_changes(work, capsys):
    root, _, _ = work
    before = snapshot(root)
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", "", "--force"]) == 1
    err = capsys.readouterr().err
    assert "error: the output path is empty" in err
    assert "Traceback" not in err
    assert snapshot(root) == before


@pytest.mark.parametrize("out", [".", "./", ".."])
def test_working_directory_and_above_are_never_outputs(work, capsys, out):
    root, _, _ = work
    before = snapshot(root)
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", out, "--force"]) == 1
    err = capsys.readouterr().err
    assert "refusing to write: the output" in err and "the working directory" in err
    assert snapshot(root) == before


def test_force_refuses_a_directory_with_other_files(work, capsys):
    root, _, _ = work
    docs = root / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work\n")
    (docs / "config.json").write_text("{}\n")
    before = snapshot(root)
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", "docs", "--force"]) == 1
    err = capsys.readouterr().err
    assert "docs: refusing to replace it: it is a directory that holds 'thesis.tex'" in err
    assert snapshot(root) == before


def test_force_refuses_a_file_that_is_not_safetensors(work, capsys):
    root, _, _ = work
    before = snapshot(root)
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", "notes.txt", "--force"]) == 1
    assert "refusing to replace it: it is a file that is not a safetensors file" in capsys.readouterr().err
    assert snapshot(root) == before


def test_force_refuses_a_symlink_and_leaves_its_target(work, capsys):
    root, _, _ = work
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"x")
    os.symlink("elsewhere", root / "link")
    before = snapshot(root)
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", "link", "--force"]) == 1
    assert "refusing to replace it: it is a symbolic link" in capsys.readouterr().err
    assert snapshot(root) == before


def test_force_refuses_a_device(work, capsys):
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", "/dev/null", "--force"]) == 1
    assert "/dev/null: refusing to replace it: it is not a regular file or a directory" in capsys.readouterr().err
    assert os.path.exists("/dev/null")


def test_force_replaces_a_previous_output_and_nothing_else(work, capsys):
    root, pre, ft = work
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", "merged"]) == 0
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", "merged.safetensors"]) == 0
    before = snapshot(root)
    assert main(["run", "-e", "pre + 0.25*(ft - pre)", *BIND, "-o", "merged", "--force"]) == 0
    assert main(["run", "-e", "pre + 0.25*(ft - pre)", *BIND, "-o", "merged.safetensors", "--force"]) == 0
    after = snapshot(root)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"merged/model.safetensors", "merged/README.md", "merged.safetensors"}  # the card's recipe
    for out in ("merged/model.safetensors", "merged.safetensors"):
        got = load_file(str(root / out))
        torch.testing.assert_close(got["lm_head.weight"], pre["lm_head.weight"] + 0.25 * (ft["lm_head.weight"] - pre["lm_head.weight"]))


@pytest.mark.parametrize("second", ["./K", "out/../K", "K/"])
def test_one_output_named_twice_is_refused_before_compute(work, capsys, second):
    root, _, _ = work
    (root / "out").mkdir()
    recipe = root / "two.tv"
    recipe.write_text("out x = pre + 0.5*(ft - pre)\nout y = pre + 0.25*(ft - pre)\n")
    # an old output at K must survive the refused run
    assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", "K"]) == 0
    capsys.readouterr()
    before = snapshot(root)
    assert main(["run", str(recipe), *BIND, "-o", "x=K", "-o", f"y={second}", "--force"]) == 1
    err = capsys.readouterr().err
    assert "error: outputs 'x' and 'y' are both written to" in err
    assert "Traceback" not in err
    assert snapshot(root) == before


def test_one_output_inside_another_is_refused(work, capsys):
    root, _, _ = work
    recipe = root / "two.tv"
    recipe.write_text("out x = pre + 0.5*(ft - pre)\nout y = pre + 0.25*(ft - pre)\n")
    before = snapshot(root)
    assert main(["run", str(recipe), *BIND, "-o", "x=K", "-o", "y=K/inner"]) == 1
    assert "outputs 'x' and 'y' are written one inside the other" in capsys.readouterr().err
    assert snapshot(root) == before


def test_duplicate_output_without_force_fails_before_compute(work, capsys, monkeypatch):
    root, _, _ = work
    recipe = root / "two.tv"
    recipe.write_text("out x = pre + 0.5*(ft - pre)\nout y = pre + 0.25*(ft - pre)\n")
    from tvlang.run import evaluate

    def no_compute(*args, **kwargs):  # pragma: no cover - reached only if the check is late
        raise AssertionError("computed before refusing the duplicate output")

    monkeypatch.setattr(evaluate.Session, "reduce", no_compute)
    assert main(["run", str(recipe), *BIND, "-o", "x=K", "-o", "y=K"]) == 1
    assert "outputs 'x' and 'y' are both written to K" in capsys.readouterr().err
    assert not os.path.exists(root / "K")


@pytest.mark.parametrize("expr", ["pre + (ft - pre)", "ft + 0*(pre - ft)", "0.5*pre + 0.5*ft + 0.5*(ft - pre)"])
def test_a_cancelled_input_is_still_never_an_output(work, capsys, expr):
    root, _, _ = work
    before = snapshot(root)
    assert main(["run", "-e", expr, *BIND, "-o", "pre", "--force"]) == 1
    err = capsys.readouterr().err
    assert "pre: refusing to write: the output is an input" in err
    assert snapshot(root) == before


def test_a_cancelled_load_in_a_recipe_is_never_an_output(work, capsys):
    root, _, _ = work
    recipe = root / "cancel.tv"
    recipe.write_text('pre = load("pre")\nft = load("ft")\nout = pre + (ft - pre)\n')
    before = snapshot(root)
    for out in ("pre", "pre/model.safetensors"):
        assert main(["run", str(recipe), "-o", out, "--force"]) == 1
        assert "refusing to write: the output is an input" in capsys.readouterr().err
    assert snapshot(root) == before


def test_a_hard_link_to_an_input_is_never_an_output(work, capsys):
    root, _, _ = work
    os.link(root / "pre" / "model.safetensors", root / "alias.safetensors")
    before = snapshot(root)
    assert main(["run", "-e", "pre + (ft - pre)", *BIND, "-o", "alias.safetensors", "--force"]) == 1
    assert "refusing to write: the output is an input" in capsys.readouterr().err
    assert snapshot(root) == before


def test_bases_refuses_the_working_directory(work, capsys):
    root, _, _ = work
    before = snapshot(root)
    assert main(["bases", "--base", "pre", "a=ft", "b=ft", "-o", ".", "--force"]) == 1
    assert "refusing to write: the output is the working directory" in capsys.readouterr().err
    assert snapshot(root) == before


def test_bases_force_refuses_a_folder_it_did_not_write(work, capsys):
    root, _, _ = work
    (root / "keep").mkdir()
    (root / "keep" / "data.csv").write_text("1,2\n")
    before = snapshot(root)
    assert main(["bases", "--base", "pre", "a=ft", "b=ft", "-o", "keep", "--force"]) == 1
    assert "keep: refusing to replace it: it is a directory that holds 'data.csv'" in capsys.readouterr().err
    assert snapshot(root) == before


# -- an output folder that cannot be written (issue 18, case 13) ----------------------------

# Runs the CLI in a fresh interpreter where every write inside the folder READONLY fails
# with errno CODE, as in a read-only folder (EACCES) or file system (EROFS), even for
# root: mkdir, file creation, unlink and rename there all raise. What the interpreter
# prints at exit (a failing __del__, say) reaches stderr too.
READ_ONLY_RUN = """
import builtins, os, sys
READONLY, CODE = os.path.realpath(sys.argv[1]), int(sys.argv[2])

def inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(READONLY + os.sep)
    except (TypeError, ValueError):
        return False

def refuse(path):
    raise OSError(CODE, os.strerror(CODE), os.fsdecode(path))

def guarded(real):
    def call(path, *args, **kwargs):
        if inside(path):
            refuse(path)
        return real(path, *args, **kwargs)
    return call

for name in ("mkdir", "unlink", "remove", "rmdir", "rename", "replace", "link"):
    setattr(os, name, guarded(getattr(os, name)))
real_open, real_os_open = builtins.open, os.open

def open_(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and inside(file):
        refuse(file)
    return real_open(file, mode, *args, **kwargs)

def os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
        refuse(path)
    return real_os_open(path, flags, *args, **kwargs)

builtins.open, os.open = open_, os_open
from tvlang.faces.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("out, code", [("RO/out", errno.EACCES), ("RO/out.safetensors", errno.EROFS),
                                       ("RO/out", errno.EROFS), ("RO/sub/out", errno.EACCES)])
def test_an_unwritable_output_folder_is_one_clear_error(work, out, code):
    root, _, _ = work
    (root / "RO").mkdir()
    before = snapshot(root)
    args = ["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", out, "-q"]
    proc = subprocess.run([sys.executable, "-c", READ_ONLY_RUN, "RO", str(code), *args],
                          capture_output=True, text=True, timeout=300)
    where = "cannot create directory RO/sub" if "sub" in out else "cannot create the output"
    assert proc.returncode == 1
    assert proc.stderr == f"error: {out}: {'cannot write: ' if 'sub' in out else ''}{where}: {os.strerror(code)}\n"
    assert snapshot(root) == before


def test_bases_into_an_unwritable_folder_is_one_clear_error(work):
    root, _, _ = work
    (root / "RO").mkdir()
    before = snapshot(root)
    args = ["bases", "--base", "pre", "a=ft", "b=ft", "--k", "1", "-o", "RO/bases", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", READ_ONLY_RUN, "RO", str(errno.EROFS), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr == "error: RO/bases: cannot create the output: Read-only file system\n"
    assert snapshot(root) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into a folder of mode 0o555 (the test above fakes it instead)")
def test_a_read_only_output_folder_is_one_clear_error(work, capsys):
    root, _, _ = work
    (root / "RO").mkdir()
    os.chmod(root / "RO", 0o555)
    try:
        for out in ("RO/out", "RO/out.safetensors"):
            assert main(["run", "-e", "pre + 0.5*(ft - pre)", *BIND, "-o", out, "-q"]) == 1
            gc.collect()  # a writer's __del__ would print here
            err = capsys.readouterr().err
            assert err == f"error: {out}: cannot create the output: Permission denied\n"
        assert os.listdir(root / "RO") == []
    finally:
        os.chmod(root / "RO", 0o755)
