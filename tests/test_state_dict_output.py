"""``-o x.pt|.pth|.bin``: an output written as a PyTorch state dict file (issue 13).

The file loads with ``torch.load(weights_only=True)`` and equals a naive eager
evaluation; it is written atomically (a failure or a crash leaves no file at the
target, and a replaced file intact); ``--force`` replaces only a file torch.save
wrote, never a directory; the Ray executor refuses it; ``.ckpt`` is refused.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

import tvlang
from naive import evaluate as naive_evaluate
from tvlang.errors import TvlangError
from tvlang.faces.cli import main
from tvlang.io import TensorInfo, state_dict_writer
from tvlang.io.state_dict_writer import StateDictWriter
from tvlang.run import chunked
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

SPEC = llama_spec(hidden=8, layers=1, vocab=16, intermediate=12)
EXPR = "pre + 0.5*(ft - pre)"
BIND = ["--bind", "pre=pre", "--bind", "ft=ft"]


@pytest.fixture()
def work(tmp_path, monkeypatch):
    pre = make_state_dict(SPEC, seed=0)
    ft = finetune_like(pre, seed=1)
    write_checkpoint(str(tmp_path / "pre"), pre)
    write_checkpoint(str(tmp_path / "ft"), ft)
    monkeypatch.chdir(tmp_path)
    return tmp_path, pre, ft


def leftovers(root) -> list[str]:
    return sorted(name for name in os.listdir(root) if ".tvtmp-" in name)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_a_state_dict_file_loads_weights_only_and_equals_a_naive_evaluation(work, capsys, suffix):
    root, pre, ft = work
    out = f"merged{suffix}"
    assert main(["run", "-e", EXPR, *BIND, "-o", out]) == 0
    assert capsys.readouterr().err.startswith(f"wrote {len(pre)} tensors ")
    got = torch.load(out, weights_only=True)
    assert type(got) is dict
    assert list(got) == list(pre)  # the base's order
    expected = naive_evaluate(EXPR, {"pre": pre, "ft": ft})["out"]
    for name, tensor in got.items():
        assert tensor.dtype == pre[name].dtype and tensor.shape == pre[name].shape
        if not tensor.is_floating_point():  # an integer buffer is the base's
            assert torch.equal(tensor, pre[name])
            continue
        torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-6, atol=1e-6)
    assert sorted(os.listdir(root)) == ["ft", out, "pre"]  # one file: no config, no model card, no temporary


def test_a_chunked_run_writes_the_same_file_as_a_whole_one(work, monkeypatch):
    _, pre, ft = work
    plan = tvlang.compile(EXPR)
    whole = plan.run({"pre": "pre", "ft": "ft"}, "whole.pt")
    monkeypatch.setattr(chunked, "CHUNK_MIN", 4)  # every tensor in pieces of 3 entries
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3)
    plan.run({"pre": "pre", "ft": "ft"}, "pieces.pt")
    assert whole.tensors == len(pre)
    a, b = torch.load("whole.pt", weights_only=True), torch.load("pieces.pt", weights_only=True)
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_pieces_of_any_size_assemble_the_tensor(tmp_path):
    w = torch.arange(35, dtype=torch.float32).reshape(5, 7)
    e = torch.empty(0, 3)
    layout = [TensorInfo("w", (5, 7), torch.float32, 140, ""), TensorInfo("e", (0, 3), torch.float32, 0, "")]
    out = str(tmp_path / "p.pth")
    with StateDictWriter(out, layout) as writer:
        flat = w.reshape(-1)
        for start, stop in ((0, 4), (4, 5), (5, 30), (30, 35)):
            writer.write_part("w", flat[start:stop])
        writer.write("e", e)
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["w"], w) and got["e"].shape == (0, 3)


def test_a_task_vector_file_binds_back_with_delta(work):
    _, pre, ft = work
    assert main(["run", "-e", "ft - pre", *BIND, "-o", "tau.bin", "-q"]) == 0
    assert main(["run", "-e", "pre + 2*tau", "--bind", "pre=pre", "--bind", "tau=delta:tau.bin",
                 "-o", "twice.safetensors", "-q"]) == 0
    got = tvlang.compile("x").evaluate({"x": "twice.safetensors"})
    for name in pre:
        torch.testing.assert_close(got[name], pre[name] + 2 * (ft[name] - pre[name]), rtol=1e-5, atol=1e-6)


def test_an_existing_file_needs_force_and_force_replaces_a_torch_save_file(work, capsys):
    _, pre, ft = work
    torch.save({"old": torch.zeros(1)}, "m.pt")
    assert main(["run", "-e", EXPR, *BIND, "-o", "m.pt", "-q"]) == 1
    assert "m.pt: output already exists" in capsys.readouterr().err
    assert list(torch.load("m.pt", weights_only=True)) == ["old"]
    assert main(["run", "-e", EXPR, *BIND, "-o", "m.pt", "-q", "--force"]) == 0
    assert list(torch.load("m.pt", weights_only=True)) == list(pre)


@pytest.mark.parametrize("what", ["directory", "model directory", "text", "safetensors", "symlink"])
def test_force_replaces_nothing_torch_save_did_not_write(work, capsys, what):
    root, _, _ = work
    if what == "directory":
        os.mkdir("m.pt")
    elif what == "model directory":  # what --force replaces for a directory output, but not for a .pt one
        os.mkdir("m.pt")
        (root / "m.pt" / "config.json").write_text("{}")
    elif what == "text":
        (root / "m.pt").write_text("my notes\n")
    elif what == "safetensors":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, "m.pt")
    else:
        torch.save({"w": torch.zeros(1)}, "real.pt")
        os.symlink("real.pt", "m.pt")
    before = sorted(os.listdir(root))
    assert main(["run", "-e", EXPR, *BIND, "-o", "m.pt", "-q", "--force"]) == 1
    err = capsys.readouterr().err
    reason = {"directory": "it is a directory, and a .pt/.pth/.bin output is one file",
              "model directory": "it is a directory, and a .pt/.pth/.bin output is one file",
              "text": "it is not a file that torch.save wrote",
              "safetensors": "it is not a file that torch.save wrote",
              "symlink": "it is a symbolic link"}[what]
    assert f"error: m.pt: refusing to replace it: {reason}" in err
    assert sorted(os.listdir(root)) == before
    if what == "text":
        assert (root / "m.pt").read_text() == "my notes\n"


def test_a_full_disk_while_saving_leaves_nothing(work, capsys, monkeypatch):
    root, _, _ = work
    real_save = torch.save

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_dict_writer.torch, "save", full_disk)
    assert main(["run", "-e", EXPR, *BIND, "-o", "m.pt", "-q"]) == 1
    assert "error: m.pt: write failed: the disk is full; nothing was written to the output" in capsys.readouterr().err
    assert not os.path.lexists("m.pt") and leftovers(root) == []
    # An older output replaced with --force is kept whole.
    real_save({"old": torch.ones(3)}, "m.pt")
    assert main(["run", "-e", EXPR, *BIND, "-o", "m.pt", "-q", "--force"]) == 1
    assert torch.equal(torch.load("m.pt", weights_only=True)["old"], torch.ones(3))
    assert leftovers(root) == []


def test_ctrl_c_while_collecting_leaves_nothing(work, capsys, monkeypatch):
    root, pre, _ = work
    seen = []
    real = StateDictWriter._write_piece

    def interrupted(self, info, piece):
        seen.append(info.name)
        if len(seen) == 3:
            raise KeyboardInterrupt
        real(self, info, piece)

    monkeypatch.setattr(StateDictWriter, "_write_piece", interrupted)
    assert main(["run", "-e", EXPR, *BIND, "-o", "m.pt", "-q"]) == 130
    assert capsys.readouterr().err == "tvlang: interrupted; nothing was written\n"
    assert len(seen) == 3 < len(pre)
    assert not os.path.lexists("m.pt") and leftovers(root) == []


CRASH = """
import os, signal, sys, torch
from tvlang.io import state_dict_writer
from tvlang.faces.cli import main

def crash(obj, f):
    f.write(b"PK\\x03\\x04 half a zip")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

state_dict_writer.torch.save = crash
main(sys.argv[1:])
"""


def test_a_killed_process_leaves_no_file_at_the_target(work):
    root, _, _ = work
    torch.save({"old": torch.ones(2)}, "old.pt")
    for target, extra in (("m.pt", []), ("old.pt", ["--force"])):
        proc = subprocess.run([sys.executable, "-c", CRASH, "run", "-e", EXPR, *BIND, "-o", target, "-q", *extra],
                              capture_output=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not os.path.lexists("m.pt")
    assert torch.equal(torch.load("old.pt", weights_only=True)["old"], torch.ones(2))
    # What the crash left is a temporary, never a file at an output's name (the next run removes it).
    assert all(name.startswith((".m.pt.tvtmp-", ".old.pt.tvtmp-")) for name in leftovers(root))


def test_the_ray_executor_refuses_a_state_dict_file_before_anything_runs(work, capsys):
    _, _, _ = work
    plan = tvlang.compile(EXPR)
    with pytest.raises(TvlangError) as caught:
        plan.run({"pre": "pre", "ft": "ft"}, {"out": "m.pt"}, executor="ray")
    assert caught.value.message.startswith("m.pt: the Ray executor cannot write a PyTorch state dict file")
    assert main(["run", "-e", EXPR, *BIND, "-o", "m.pth", "--executor", "ray"]) == 1
    err = capsys.readouterr().err
    assert "error: m.pth: the Ray executor cannot write a PyTorch state dict file" in err
    assert "run with --executor local (the default) to write a .pt file" in err
    assert not os.path.lexists("m.pt") and not os.path.lexists("m.pth")


def test_a_ckpt_output_is_refused(work, capsys):
    root, _, _ = work
    assert main(["run", "-e", EXPR, *BIND, "-o", "m.ckpt"]) == 1
    assert "error: m.ckpt: cannot write this output: a .ckpt file is a training checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(root)) == ["ft", "pre"]
