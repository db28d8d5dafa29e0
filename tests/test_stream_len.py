"""``stream()`` knows its length without reading weights, and ``-q`` silences every command
that prints progress or summaries (issue 13)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tvlang
from tvlang.errors import TvlangError
from tvlang.faces.cli import main
from tvlang.io import open_reader
from tvlang.io.safetensors_file import SafetensorsReader

PRE = {"a.w": torch.zeros(2, 3), "b.w": torch.ones(4), "c.w": torch.ones(2, 2),
       "steps": torch.arange(3, dtype=torch.int64)}
FT = {"a.w": torch.ones(2, 3), "b.w": torch.full((4,), 3.0), "c.w": torch.zeros(2, 2)}


@pytest.fixture()
def files(tmp_path, monkeypatch):
    save_file(PRE, str(tmp_path / "pre.safetensors"))
    save_file(FT, str(tmp_path / "ft.safetensors"))
    save_file({k: v for k, v in FT.items() if k != "c.w"}, str(tmp_path / "partial.safetensors"))
    save_file({k: -v for k, v in FT.items()}, str(tmp_path / "ft2.safetensors"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("expr, ft, missing, count", [
    ("pre + 0.5*(ft - pre)", "ft.safetensors", "error", 4),      # a model: 3 floats and the integer buffer
    ("ft - pre", "ft.safetensors", "error", 3),                  # a task vector: floats only
    ("pre + 0.5*(ft - pre)", "partial.safetensors", "skip", 3),  # c.w left out
    ("pre + 0.5*(ft - pre)", "partial.safetensors", "base", 4),  # c.w copied from the base
])
def test_len_is_the_number_of_pairs_and_reads_no_weights(files, monkeypatch, expr, ft, missing, count):
    plan = tvlang.compile(expr)
    bindings = {"pre": "pre.safetensors", "ft": ft}

    def no_reads(self, name):
        raise AssertionError(f"len() read the weights of {name}")

    with monkeypatch.context() as patch:
        patch.setattr(SafetensorsReader, "read", no_reads)
        stream = plan.stream(bindings, missing=missing)
        assert len(stream) == count
    pairs = list(stream)  # the same stream, bound once, now computed
    assert len(pairs) == count == len(stream)
    order = open_reader("pre.safetensors").names()  # the base's file order (safetensors puts 'steps' first)
    assert [name for name, _ in pairs] == [n for n in order if n in dict(pairs)]
    got = dict(pairs)
    for name, tensor in got.items():  # against a hand computation
        base, tuned = PRE[name], (FT if ft == "ft.safetensors" else {k: v for k, v in FT.items() if k != "c.w"})
        if not base.is_floating_point():
            assert torch.equal(tensor, base)
        elif name not in tuned:
            assert missing == "base" and torch.equal(tensor, base)
        elif expr == "ft - pre":
            assert torch.equal(tensor, tuned[name] - base)
        else:
            assert torch.equal(tensor, base + 0.5 * (tuned[name] - base))


def test_len_during_iteration_and_after_the_end(files):
    stream = tvlang.compile("pre + 0.5*(ft - pre)").stream({"pre": "pre.safetensors", "ft": "ft.safetensors"})
    first = next(stream)
    assert first[0] == "steps" and torch.equal(first[1], PRE["steps"])
    assert len(stream) == 4
    rest = list(stream)
    assert [name for name, _ in rest] == ["a.w", "b.w", "c.w"]
    assert len(stream) == 4 and list(stream) == []  # exhausted: closed, still the same length


def test_len_of_one_output_of_several_and_of_in_memory_inputs():
    plan = tvlang.compile("tau = ft - pre\nout merged = pre + 0.5*tau\nout t = tau\n")
    bindings = {"pre": PRE, "ft": FT}
    assert len(plan.stream(bindings, output="merged")) == 4
    assert len(plan.stream(bindings, output="t")) == 3
    with pytest.raises(TvlangError, match="say which one with output="):
        len(plan.stream(bindings))


def test_a_delta_binding_and_a_pending_plan_have_a_length_too():
    plan = tvlang.compile("pre + 0.5*tau")  # typed when it meets its bindings
    tau = tvlang.delta({k: v for k, v in FT.items()})
    stream = plan.stream({"pre": PRE, "tau": tau})
    assert len(stream) == 4
    assert torch.equal(dict(stream)["b.w"], torch.full((4,), 2.5))  # 1 + 0.5*3


def test_len_reports_a_data_error_in_the_recipe_and_closes(files, monkeypatch):
    closed = []
    real_close = SafetensorsReader.close
    monkeypatch.setattr(SafetensorsReader, "close", lambda self: (closed.append(self.label), real_close(self))[1])
    stream = tvlang.compile("pre + 0.5*(ft - pre)").stream({"pre": "pre.safetensors", "ft": "partial.safetensors"})
    with pytest.raises(TvlangError) as caught:
        len(stream)
    assert caught.value.message == "tensor 'c.w' is in pre.safetensors but missing from partial.safetensors"
    assert sorted(closed) == ["partial.safetensors", "pre.safetensors"]
    assert list(stream) == []


def test_close_and_with_close_the_inputs(files, monkeypatch):
    closed = []
    real_close = SafetensorsReader.close
    monkeypatch.setattr(SafetensorsReader, "close", lambda self: (closed.append(self.label), real_close(self))[1])
    with tvlang.compile("ft - pre").stream({"pre": "pre.safetensors", "ft": "ft.safetensors"}) as stream:
        assert len(stream) == 3
        next(stream)
    assert sorted(closed) == ["ft.safetensors", "pre.safetensors"]
    assert list(stream) == []


# -- -q on every command that prints progress or summaries ---------------------------------


@pytest.mark.parametrize("command", ["run", "similarity", "bases", "extract-lora", "lock", "check", "repl"])
def test_every_command_that_reports_takes_q(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "-q, --quiet" in capsys.readouterr().out


def test_similarity_quiet_prints_the_table_alone(files, capsys):
    argv = ["similarity", "a=ft.safetensors", "b=ft2.safetensors", "--base", "pre.safetensors"]
    assert main(argv) == 0
    loud = capsys.readouterr().out.splitlines()
    assert loud[-1].startswith("# 3 tensors, 14 parameters per task vector; norms: a ")
    assert main([*argv, "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == loud[:-1] and captured.err == ""
    assert [line.split()[0] for line in loud[:-1]] == ["a", "a", "b"]  # header row, then a row per vector


def test_bases_q_prints_nothing(files, capsys):
    pytest.importorskip("sklearn")
    assert main(["bases", "a=ft.safetensors", "b=ft2.safetensors", "--base", "pre.safetensors", "-o", "bases",
                 "-q", "--k", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (files / "bases" / "manifest.json").is_file()


@pytest.mark.parametrize("quiet", [False, True])
def test_repl_q_saves_without_a_progress_bar(files, monkeypatch, quiet):
    import io

    from tvlang.faces.repl import Repl
    from tvlang.run import driver

    asked = []
    real = driver.progress_for
    monkeypatch.setattr(driver, "progress_for", lambda progress: (asked.append(progress), real(False))[1])
    out = io.StringIO()
    repl = Repl({"pre": "pre.safetensors", "ft": "ft.safetensors"}, stdout=out, stderr=out, quiet=quiet)
    assert repl.feed(":save ft - pre to tau.safetensors")
    assert asked == [not quiet]
    assert out.getvalue().startswith("wrote 3 tensors ")
    assert (files / "tau.safetensors").is_file()
