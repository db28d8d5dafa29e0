"""``tvlang run``: summary line, quiet mode, several outputs, exit codes, progress bar."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from tvlang.faces.cli import main
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

SPEC = llama_spec(hidden=16, layers=2, vocab=32, intermediate=24)
N_TENSORS = len(SPEC)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_cli")
    pre = make_state_dict(SPEC, seed=0)
    a = finetune_like(pre, seed=1)
    paths = {"pre": write_checkpoint(str(root / "pre"), pre), "a": write_checkpoint(str(root / "a"), a)}
    return paths, pre, a


def binds(paths):
    return [arg for name, path in paths.items() for arg in ("--bind", f"{name}={path}")]


SUMMARY = re.compile(
    r"^wrote (\d+) tensors \((\d+\.\d) MiB\) to (.+) in (\d+\.\d\d) s \((\d+) MiB/s, (\d+) pass(?:es)?\)$"
)


def test_summary_line(ckpt, tmp_path, capsys):
    paths, pre, a = ckpt
    out = tmp_path / "merged"
    assert main(["run", "-e", "pre + 0.5*(a - pre)", *binds(paths), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1  # no progress bar: stderr is not a terminal here
    match = SUMMARY.match(lines[0])
    assert match, lines[0]
    nbytes = sum(t.numel() * t.element_size() for t in pre.values())
    assert int(match.group(1)) == N_TENSORS
    assert match.group(2) == f"{nbytes / 2**20:.1f}"
    assert match.group(3) == str(out)
    assert match.group(6) == "1"
    got = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(got["lm_head.weight"], 0.5 * pre["lm_head.weight"] + 0.5 * a["lm_head.weight"])


def test_summary_counts_passes(ckpt, tmp_path, capsys):
    paths, _, _ = ckpt
    assert main(["run", "-e", "pre + (1/norm(a - pre))*(a - pre)", *binds(paths), "-o", str(tmp_path / "o")]) == 0
    line = capsys.readouterr().err.strip()
    assert SUMMARY.match(line).group(6) == "2"
    assert line.endswith("2 passes)")


def test_quiet_prints_nothing(ckpt, tmp_path, capsys):
    paths, _, _ = ckpt
    out = tmp_path / "o.safetensors"
    assert main(["run", "-e", "pre + 0.5*(a - pre)", *binds(paths), "-o", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert out.is_file()


def test_several_outputs_with_names(ckpt, tmp_path, capsys):
    paths, pre, a = ckpt
    recipe = tmp_path / "two.tv"
    recipe.write_text("tau = a - pre\nout merged = pre + 0.5*tau\nout tau_a = tau\n")
    merged, tau = tmp_path / "merged", tmp_path / "tau.safetensors"
    code = main(["run", str(recipe), *binds(paths), "-o", f"merged={merged}", "-o", f"tau_a={tau}"])
    assert code == 0
    line = capsys.readouterr().err.strip()
    assert SUMMARY.match(line).group(3) == f"{merged}, {tau}"
    assert int(SUMMARY.match(line).group(1)) == 2 * N_TENSORS - 1  # no integer buffer in the task vector
    got_tau = load_file(str(tau))
    assert "model.position_ids" not in got_tau
    torch.testing.assert_close(got_tau["lm_head.weight"], a["lm_head.weight"] - pre["lm_head.weight"])
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()


def test_several_outputs_need_names(ckpt, tmp_path, capsys):
    paths, _, _ = ckpt
    recipe = tmp_path / "two.tv"
    recipe.write_text("tau = a - pre\nout merged = pre + 0.5*tau\nout tau_a = tau\n")
    assert main(["run", str(recipe), *binds(paths), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "this recipe has outputs merged, tau_a: give -o NAME=PATH for each" in err
    assert main(["run", str(recipe), *binds(paths), "-o", f"merged={tmp_path / 'm'}"]) == 1
    assert "no path given for output 'tau_a' (-o tau_a=PATH)" in capsys.readouterr().err
    outs = ["-o", f"merged={tmp_path / 'm'}", "-o", f"other={tmp_path / 'o'}"]
    assert main(["run", str(recipe), *binds(paths), *outs]) == 1
    assert "no output named 'other'; the outputs are merged, tau_a" in capsys.readouterr().err
    outs = ["-o", f"merged={tmp_path / 'm'}", "-o", f"merged={tmp_path / 'n'}"]
    assert main(["run", str(recipe), *binds(paths), *outs]) == 2
    assert "-o merged is given twice" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f != "two.tv"]


@pytest.mark.parametrize("argv,code,message", [
    (["run", "-e", "pre"], 2, "tvlang run: error: give an output path with -o PATH"),
    (["run", "-o", "x"], 2, "tvlang run: error: give a RECIPE file or -e EXPR"),
    (["run", "-e", "pre", "--bind", "pre", "-o", "x"], 2, "--bind expects NAME=PATH"),
    (["run", "-e", "pre + ", "-o", "x"], 1, "error:"),
    (["run", "nowhere.tv", "-o", "x"], 1, "cannot read recipe nowhere.tv: no such file"),
    (["run", "-e", "pre", "--shard-size", "lots", "-o", "x"], 2, "--shard-size expects a size"),
])
def test_exit_codes(argv, code, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "x")


def test_missing_policy_choices(ckpt, tmp_path, capsys):
    paths, _, _ = ckpt
    with pytest.raises(SystemExit) as info:
        main(["run", "-e", "pre + 0.5*(a - pre)", *binds(paths), "-o", str(tmp_path / "o"), "--missing", "maybe"])
    assert info.value.code == 2
    assert "invalid choice: 'maybe'" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(ckpt, tmp_path, monkeypatch, capsys):
    paths, _, _ = ckpt
    # Not a terminal (pytest captures stderr): no bar, only the summary line.
    assert main(["run", "-e", "pre + 0.5*(a - pre)", *binds(paths), "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "main pass" not in err
    # A terminal: the bar is drawn on one line, then erased before the summary.
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["run", "-e", "pre + 0.5*(a - pre)", *binds(paths), "-o", str(tmp_path / "b")]) == 0
    text = terminal.getvalue()
    # tqdm's bar, named after the pass, counting bytes; cleared before the summary line
    assert "main pass" in text and "\r" in text and "B/s" in text
    assert SUMMARY.match(text.rsplit("\r", 1)[-1].strip())
    # --quiet: no bar on a terminal either.
    terminal2 = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal2)
    assert main(["run", "-e", "pre + 0.5*(a - pre)", *binds(paths), "-o", str(tmp_path / "c"), "-q"]) == 0
    assert terminal2.getvalue() == ""


# -- the console script's exit (tvlang.faces.cli.entry) ---------------------------------


def _entry(tmp_path, argv: list[str], *, before: str = "", call: str = "entry()", env: dict | None = None):
    """``entry()`` (or ``call``) in a fresh interpreter with ``argv``, an atexit function that
    prints, and a thread pool left open (its idle worker must not keep the process alive);
    ``before``: lines run first."""
    import subprocess

    script = ("import atexit, sys\n"
              "from concurrent.futures import ThreadPoolExecutor\n"
              f"{before}"
              "atexit.register(lambda: print('atexit ran', flush=True))\n"
              "pool = ThreadPoolExecutor(1); pool.submit(int).result()  # an idle worker, never shut down\n"
              f"sys.argv = ['tvlang', *{argv!r}]\n"
              "from tvlang.faces.cli import entry, main\n"
              f"{call}\n"
              "print('not reached')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**(os.environ if env is None else env), "PYTHONPATH": root}, cwd=tmp_path)


def test_entry_after_a_run_flushes_runs_atexit_and_keeps_the_status(ckpt, tmp_path):
    """entry() leaves by os._exit: the JSON summary on stdout is whole,
    atexit functions ran, the status is main()'s, and the output is complete on disk."""
    import json

    out = tmp_path / "merged"
    ok = _entry(tmp_path, ["run", "-e", "pre + 0.5*(a - pre)", *binds(ckpt[0]), "-o", str(out), "--json"])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith("}\natexit ran\n")
    summary = json.loads(ok.stdout[:-len("atexit ran\n")])
    assert summary["tensors"] == len(load_file(str(out / "model.safetensors"))) == N_TENSORS
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    listing = sorted(os.listdir(tmp_path))
    failed = _entry(tmp_path, ["run", "-e", "pre + 0.5*(a - pre)", *binds(ckpt[0]), "-o", str(out)])
    assert failed.returncode == 1
    assert failed.stderr == f"error: {out}: output already exists\n  pass --force (force=True) to replace it\n"
    assert failed.stdout == "atexit ran\n"
    # the refused run changed nothing on disk: the output's files, byte for byte, and no temporary
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == listing


def test_entry_without_torch_leaves_the_same_way(tmp_path):
    """A command that never loads torch (check) leaves by os._exit too: atexit functions run and
    the status is main()'s, but the interpreter's teardown (which would call the ``__del__`` of
    an object left in a module) does not run."""
    tell = "class Tell:\n    def __del__(self): print('teardown', flush=True)\nkept = Tell()\n"
    result = _entry(tmp_path, ["check", "-e", "pre + 0.5*(ft - pre)"], before=tell)
    assert (result.returncode, result.stdout) == (0, "atexit ran\n")
    assert "Traceback" not in result.stderr
    failed = _entry(tmp_path, ["check", "-e", "pre + "], before=tell)
    assert (failed.returncode, failed.stdout) == (1, "atexit ran\n")
    assert failed.stderr.startswith("<expr>:1:")
    # and the same script with a plain sys.exit: the teardown runs (so the check above can fail)
    plain = _entry(tmp_path, ["check", "-e", "pre + 0.5*(ft - pre)"], before=tell, call="sys.exit(main())")
    assert (plain.returncode, plain.stdout) == (0, "atexit ran\nteardown\n")


def test_entry_sets_one_blas_thread_unless_told(tmp_path):
    """numpy's BLAS runs one thread in the command line's process unless the environment says otherwise."""
    show = "import os\natexit.register(lambda: print('blas', os.environ.get('OPENBLAS_NUM_THREADS'), flush=True))\n"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    unset = _entry(tmp_path, ["check", "-e", "pre"], before=show, env=env)
    assert unset.stdout == "atexit ran\nblas 1\n", unset.stdout  # (atexit: the last registered first)
    told = _entry(tmp_path, ["check", "-e", "pre"], before=show, env={**env, "OPENBLAS_NUM_THREADS": "2"})
    assert told.stdout == "atexit ran\nblas 2\n", told.stdout


def test_entry_under_a_profiler_exits_normally(ckpt, tmp_path):
    """``python -m cProfile -o FILE -m tvlang run ...`` writes FILE after the program returns:
    with a profiler set, entry() leaves the normal way, so the profile is written."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stats = tmp_path / "run.prof"
    result = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "tvlang", "run", "-e",
                             "pre + 0.5*(a - pre)", *binds(ckpt[0]), "-o", str(tmp_path / "merged"), "-q"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr
    assert stats.stat().st_size > 0 and (tmp_path / "merged" / "model.safetensors").is_file()
