"""Progress: one tqdm bar per pass on a terminal, or ``progress=`` a callback (issue 13)."""

from __future__ import annotations

import torch

import tvlang
from tvlang.run.progress import ProgressEvent


def models():
    pre = {"a.w": torch.zeros(3, 4), "b.w": torch.zeros(5), "n": torch.tensor([1])}
    ft = {"a.w": torch.ones(3, 4), "b.w": torch.full((5,), 2.0), "n": torch.tensor([1])}
    return {"pre": pre, "ft": ft}


def test_a_callback_sees_every_pass_by_name_and_counts_bytes(tmp_path):
    events: list[ProgressEvent] = []
    plan = tvlang.compile("pre + (1/norm(ft - pre))*(ft - pre)")
    plan.run(models(), str(tmp_path / "o.safetensors"), progress=events.append)
    labels = list(dict.fromkeys(e.label for e in events))
    assert labels == ["pass 1 of 2: norm", "pass 2 (main)"]
    first = [e for e in events if e.label == labels[0]]
    # the norm pass reads pre and ft: 2 x (12 + 5) float32 entries
    assert [e.tensor for e in first] == ["a.w", "b.w"]
    assert first[-1].bytes_done == first[-1].bytes_total == 2 * 17 * 4
    main = [e for e in events if e.label == labels[1]]
    assert [e.tensor for e in main] == ["a.w", "b.w", "n"]
    assert main[-1].tensors_done == main[-1].tensors_total == 3
    assert main[-1].bytes_done == main[-1].bytes_total == 17 * 4 + 8


def test_no_progress_is_drawn_off_a_terminal(tmp_path, capsys):
    tvlang.compile("pre + 0.5*(ft - pre)").run(models(), str(tmp_path / "o.safetensors"), progress=True)
    assert capsys.readouterr().err == ""


def test_a_scalar_reports_its_passes_to_a_callback():
    """Plan.scalar takes progress= as run does (the REPL shows a bar while a scalar's passes stream)."""
    events: list[ProgressEvent] = []
    value = tvlang.compile("norm(ft - pre)").scalar(models(), progress=events.append)
    assert value == (12 + 5 * 4) ** 0.5
    assert [(e.label, e.tensor) for e in events] == [("pass 1 of 1: norm", "a.w"), ("pass 1 of 1: norm", "b.w")]


def test_similarity_draws_a_tqdm_bar_of_tensors_on_a_terminal(tmp_path, capsys, monkeypatch):
    """tvlang similarity (and bases) count tensors with tqdm on a terminal, instead of 0.2's hand-written
    '\\r tensor i/n' line, and clear the bar at the end."""
    from safetensors.torch import save_file

    from tvlang.faces.cli import main

    for name, state in models().items():
        save_file({k: v for k, v in state.items() if v.is_floating_point()}, str(tmp_path / f"{name}.safetensors"))
    save_file({"a.w": torch.rand(3, 4), "b.w": torch.rand(5)}, str(tmp_path / "other.safetensors"))
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main(["similarity", f"ft={tmp_path / 'ft.safetensors'}", f"other={tmp_path / 'other.safetensors'}",
                 "--base", str(tmp_path / "pre.safetensors"), "--json"]) == 0
    err = capsys.readouterr().err
    assert "similarity: " in err and "/2 [" in err and "tensor/s" in err  # tqdm: counts of 2 tensors
    assert "similarity: tensor 2/2" not in err
    assert main(["similarity", f"ft={tmp_path / 'ft.safetensors'}", f"other={tmp_path / 'other.safetensors'}",
                 "--base", str(tmp_path / "pre.safetensors"), "--json", "-q"]) == 0
    assert capsys.readouterr().err == ""
