"""The REPL: piped stdin (in-process, through tvlang.faces.cli.main) and a real terminal (pty).

Checkpoints here are three tiny safetensors files with known values, so every
number the REPL prints is compared with a hand computation.
"""

from __future__ import annotations

import io
import math
import os
import re
import select
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from naive import evaluate as naive_evaluate
from tvlang.faces.cli import main
from tvlang.faces.repl import Repl, open_parens
from tvlang.language.builtins import BUILTINS, Arg, Builtin
from tvlang.testing.synth import write_checkpoint

PRE = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5]),
       "pos": torch.tensor([0, 1, 2])}
A = {"w": torch.tensor([[2.0, 2.0], [3.0, 6.0]]), "b": torch.tensor([0.5, 0.5]), "pos": PRE["pos"]}
B = {"w": torch.tensor([[1.0, 5.0], [3.0, 4.0]]), "b": torch.tensor([1.5, -0.5]), "pos": PRE["pos"]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("repl_ckpt")
    paths = {}
    for name, sd in (("pre", PRE), ("a", A), ("b", B)):
        paths[name] = write_checkpoint(root / name, sd)
    return paths


def binds(ckpt):
    return [arg for name in ("pre", "a", "b") for arg in ("--bind", f"{name}={ckpt[name]}")]


def drive(monkeypatch, capsys, text, args=()):
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = main(["repl", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def flat(sd):
    return torch.cat([t.flatten() for k, t in sd.items() if t.dtype.is_floating_point])


def delta(x, y):
    return flat(x) - flat(y)


# -- piped stdin --------------------------------------------------------------------------


def test_piped_definitions_and_summaries(ckpt, monkeypatch, capsys):
    script = "tau = a - pre\nparam lam = 0.5\ntau\npre + lam*tau\nnorm(tau)\ncos(a - pre, b - pre)\nlam*2\n"
    code, out, err = drive(monkeypatch, capsys, script, binds(ckpt))
    assert (code, err) == (0, "")
    ta, tb = delta(A, PRE), delta(B, PRE)
    norm = float(torch.linalg.vector_norm(ta.double()))
    cos = float(ta.double() @ tb.double() / (ta.double().norm() * tb.double().norm()))
    lines = out.splitlines()
    assert lines[0] == "Delta (task vector): 2 tensors, 6 parameters, float32"
    assert lines[1] == f"  reads: a ({ckpt['a']}), pre ({ckpt['pre']})"
    assert lines[2] == "Model: 3 tensors (+1 integer buffers from the base), 6 parameters, float32"
    assert lines[3].startswith("  reads: ")
    assert lines[4] == f"Scalar: {norm:.8g}"
    assert lines[6] == f"Scalar: {cos:.8g}"
    assert lines[8] == "Scalar: 1"
    assert len(lines) == 9


def test_piped_error_recovery_and_exit_status(ckpt, monkeypatch, capsys):
    script = "tau = a - pre\nbad = pre + 0.4*a\nnorm(tua)\nnorm(tau)\n"
    code, out, err = drive(monkeypatch, capsys, script, binds(ckpt))
    assert code == 1  # piped input with a failing line
    expected = float(torch.linalg.vector_norm(delta(A, PRE).double()))
    assert out == f"Scalar: {expected:.8g}\n  reads: a ({ckpt['a']}), pre ({ckpt['pre']})\n"
    assert err.splitlines()[:3] == [
        "<repl>:1:7: error: model coefficients sum to 1.4; a model needs 1 and a task vector 0",
        "  bad = pre + 0.4*a",
        "        ^^^^^^^^^^^",
    ]
    assert "<repl>:1:6: error: unknown name 'tua'; did you mean 'tau'?\n  norm(tua)\n       ^^^" in err


def test_multiline_input_and_redefinition(ckpt, monkeypatch, capsys):
    script = "x = mean(a,\n         b)\nx = (a - pre) + (b - pre)\ny = pre + 0.5*x\n:vars\n"
    code, out, err = drive(monkeypatch, capsys, script, binds(ckpt))
    assert (code, err) == (0, "")
    assert out.splitlines() == ["x : Delta  = a - pre + (b - pre)", "y : Model  = pre + 0.5*x"]


def test_redefinition_that_breaks_a_dependent_is_refused(ckpt, monkeypatch, capsys):
    script = "x = a - pre\ny = pre + x\nx = a\n:vars\n"
    code, out, err = drive(monkeypatch, capsys, script, binds(ckpt))
    assert code == 1
    assert "error: model coefficients sum to 2" in err
    assert out.splitlines() == ["x : Delta  = a - pre", "y : Model  = pre + x"]


def test_cycle_is_refused(ckpt, monkeypatch, capsys):
    code, out, err = drive(monkeypatch, capsys, "x = a - pre\ny = 2*x\nx = y\n", binds(ckpt))
    assert code == 1
    assert "error: 'x' would depend on itself: x -> y -> x" in err


def test_commands_sources_help_unknown(ckpt, monkeypatch, capsys):
    code, out, err = drive(monkeypatch, capsys, ":sources\n:help\n:frobnicate\n:q\nnorm(a)\n", binds(ckpt))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"pre: {ckpt['pre']} (bound, model; 3 tensors, 6 parameters, float32)"
    assert ":save EXPR to PATH" in out
    assert "error: unknown command ':frobnicate'" in err
    assert "Scalar" not in out  # :q quit before norm(a)


def test_save_writes_a_loadable_file(ckpt, monkeypatch, capsys, tmp_path):
    target = tmp_path / "merged.safetensors"
    code, out, err = drive(monkeypatch, capsys, f"param lam = 0.25\n:save pre + lam*(b - pre) to {target}\n",
                           binds(ckpt))
    assert (code, err) == (0, "")
    assert out.startswith("wrote 3 tensors")
    saved = load_file(target)
    for key in ("w", "b"):
        torch.testing.assert_close(saved[key], PRE[key] + 0.25 * (B[key] - PRE[key]), rtol=0, atol=1e-6)
    assert torch.equal(saved["pos"], PRE["pos"])


def test_a_signal_as_save_makes_its_output_leaves_no_temporary(ckpt, monkeypatch, capsys, tmp_path):
    """Ctrl-C landing as :save's output transaction is made, before the run keeps its writer: the
    line is cancelled, and the temporary goes too (tvlang.io.atomic.abort_unfinished)."""
    import tvlang.io.atomic as atomic

    real = atomic.AtomicReplace.__init__

    def made_then_interrupted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise KeyboardInterrupt  # the signal, as the constructor returns

    monkeypatch.setattr(atomic.AtomicReplace, "__init__", made_then_interrupted)
    code, out, err = drive(monkeypatch, capsys, f":save pre + 0.5*(b - pre) to {tmp_path}/x.safetensors\n",
                           binds(ckpt))
    assert (code, err.strip()) == (0, "interrupted")
    assert os.listdir(tmp_path) == []


def test_save_of_a_scalar_is_an_error(ckpt, monkeypatch, capsys, tmp_path):
    code, out, err = drive(monkeypatch, capsys, f":save norm(a - pre) to {tmp_path}/x.safetensors\n", binds(ckpt))
    assert code == 1 and "error: a scalar has no tensors to save" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_explain_prints_the_plan(ckpt, monkeypatch, capsys):
    code, out, err = drive(monkeypatch, capsys, "tau = b - pre\n:explain pre + 0.5*tau\n", binds(ckpt))
    assert (code, err) == (0, "")
    assert out.startswith("# as written\ntau = b - pre\nout = pre + 0.5*tau\n\n# optimized\n")
    assert "# optimized\nout = 0.5*pre + 0.5*b\n" in out  # terms in the order their leaves were first built


def test_recipe_argument_loads_definitions_relative_to_the_recipe(ckpt, monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "sub" / "r.tv"
    recipe.parent.mkdir()
    rel = os.path.relpath(ckpt["a"], recipe.parent)
    recipe.write_text(f'ft = load("{rel}")\nparam lam = 0.5\nout merged = pre + lam*(ft - pre)\nout = ft\n')
    code, out, err = drive(monkeypatch, capsys, "lam\nmerged\n", ["--bind", f"pre={ckpt['pre']}", str(recipe)])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"loaded {recipe}: ft, lam, merged (1 unnamed out skipped: type its expression to see it)"
    assert lines[1] == "Scalar: 0.5"
    assert lines[2].startswith("Model: 3 tensors")


def test_missing_checkpoint_in_a_definition_is_reported(ckpt, monkeypatch, capsys, tmp_path):
    code, out, err = drive(monkeypatch, capsys, f'x = load("{tmp_path}/nope")\n:vars\n')
    assert code == 1
    assert err.startswith("<repl>:1:5: error: ")
    assert "nope" in err.splitlines()[0]
    assert out == "(no definitions yet)\n"


def test_open_parens_and_completion_candidates(ckpt):
    assert open_parens("ties(a, [1, 2") == 2
    assert open_parens('load("x(") + f(') == 1
    repl = Repl(stdout=io.StringIO(), stderr=io.StringIO())
    repl.bind("yelp_lm", ckpt["a"])
    assert repl.completions("", "yel") == ["yelp_lm"]
    assert repl.completions("", ":ex") == [":explain "]
    assert repl.completions("x = ties(a, b, ", "dens") == ["density="]
    assert repl.completions("x = ties(a, b, density=0.2, ", "") [:3] == ["elect=", "merge=", "weights="]
    assert "cos(" in repl.completions("", "co")


# -- a real terminal -------------------------------------------------------------------------


class Terminal:
    """A child process on a pseudo-terminal; ``expect`` waits for text in its output."""

    def __init__(self, argv, env):
        import pty

        try:
            self.pid, self.fd = pty.fork()
        except OSError as exc:  # no pseudo-terminals in this sandbox
            pytest.skip(f"cannot open a pseudo-terminal: {exc}")
        if self.pid == 0:  # the child
            try:
                os.execve(sys.executable, [sys.executable, "-m", "tvlang", *argv], env)
            finally:
                os._exit(127)
        self.buffer = ""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.buffer)
            if match:
                seen, self.buffer = self.buffer[:match.end()], self.buffer[match.end():]
                return seen
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{self.buffer}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"process ended waiting for {pattern!r}; output:\n{self.buffer}")
                self.buffer += chunk.decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:
                os.read(self.fd, 4096)
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError("the REPL did not exit")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_terminal_session(ckpt, tmp_path):
    pytest.importorskip("readline")
    history = tmp_path / "history"
    env = {**os.environ, "TVLANG_HISTORY": str(history), "TERM": "dumb", "INPUTRC": os.devnull,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = ["repl", "--bind", f"pre={ckpt['pre']}", "--bind", f"yelp_lm={ckpt['a']}",
            "--bind", f"b={ckpt['b']}"]
    term = Terminal(argv, env)
    try:
        term.expect(r"tv> ")
        # a definition, then an error, then recovery
        term.send("tau = yelp_lm - pre\n")
        term.expect(r"tv> ")
        term.send("norm(tau2)\n")
        term.expect(r"error: unknown name 'tau2'; did you mean 'tau'\?")
        term.expect(r"tv> ")
        # tab completion of a name: "yel" + TAB becomes yelp_lm
        term.send("norm(yel\t")
        term.expect(r"norm\(yelp_lm")
        term.send(" - pre)\n")
        expected = float(torch.linalg.vector_norm(delta(A, PRE).double()))
        term.expect(re.escape(f"Scalar: {expected:.8g}"))
        term.expect(r"tv> ")
        # completion of a keyword argument of the built-in being called
        term.send("t = topk(tau, dens\t")
        term.expect(r"topk\(tau, density=")
        term.send("0.5)\n")
        term.expect(r"tv> ")
        # completion of a path inside a load() string
        term.send(f'w = load("{os.path.dirname(ckpt["pre"])}/pr\t')
        term.expect(r"/pre/")
        term.send('")\n')
        term.expect(r"tv> ")
        # multi-line input inside open parentheses
        term.send("m = mean(yelp_lm,\n")
        term.expect(r"\.\.\. ")
        term.send("b)\n")
        term.expect(r"tv> ")
        term.send(":explain m\n")
        term.expect(r"# sources read\nout \(model\): yelp_lm, b")
        term.expect(r"tv> ")
        target = tmp_path / "saved.safetensors"
        term.send(f":save pre + 0.5*tau to {target}\n")
        term.expect(r"wrote 3 tensors")
        term.expect(r"tv> ")
        term.send(":quit\n")
        assert term.close() == 0
    except BaseException:
        os.kill(term.pid, 9)
        raise
    saved = load_file(target)
    torch.testing.assert_close(saved["w"], PRE["w"] + 0.5 * (A["w"] - PRE["w"]), rtol=0, atol=1e-6)
    assert "tau = yelp_lm - pre" in history.read_text()

    # history across sessions: up-arrow recalls the last line of the previous one
    term = Terminal(argv, env)
    try:
        term.expect(r"tv> ")
        term.send("\x1b[A\x1b[A\n")  # two lines back: the :save before :quit
        # it ran again, in a session where tau is not defined
        term.expect(r"<repl>:1:11: error: unknown name 'tau'")
        term.expect(r"tv> ")
        term.send("\x04")  # Ctrl-D leaves
        assert term.close() == 0
    except BaseException:
        os.kill(term.pid, 9)
        raise


def test_help_says_what_it_does_with_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["repl", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "interactive session" in text.lower()
    assert "examples:\n  tvlang repl --bind pre=base/" in text


def test_save_refuses_to_overwrite_unless_forced(ckpt, monkeypatch, capsys, tmp_path):
    target = tmp_path / "x.safetensors"
    script = f":save a - pre to {target}\n:save b - pre to {target}\n:save b - pre to {target} --force\n"
    code, out, err = drive(monkeypatch, capsys, script, binds(ckpt))
    assert code == 1
    assert "output already exists" in err and err.count("error:") == 1
    assert out.count("wrote 2 tensors") == 2  # a delta leaves the integer buffer out
    saved = load_file(target)
    torch.testing.assert_close(saved["w"], B["w"] - PRE["w"], rtol=0, atol=0)


def test_a_scalar_used_twice_is_computed_once_and_explained(ckpt, monkeypatch, capsys):
    script = "s = norm(a - pre)\ns*s\ndot(a - pre, a - pre)\n:explain s*s/norm(b - pre)\n"
    code, out, err = drive(monkeypatch, capsys, script, binds(ckpt))
    assert (code, err) == (0, "")
    squared = float(delta(A, PRE).double() @ delta(A, PRE).double())
    lines = out.splitlines()
    assert lines[0] == lines[2] == f"Scalar: {squared:.8g}"
    # the plan of the scalar output: both norms in one streaming pass, s computed once
    explained = "\n".join(lines[4:])
    assert explained.startswith("# as written\ns = norm(a - pre)\nout = s*s/norm(b - pre)\n")
    assert "# sources read\nout (scalar): a, pre, b\n" in explained
    assert "# plan: 1 streaming pass over the inputs\n# pass 1: whole-model scalars\n" \
           "r0 = norm(a - pre)\nr1 = norm(b - pre)\n" in explained
    assert "per tensor" not in explained  # no main pass: nothing is written
    assert explained.endswith("# scalar outputs, from the whole-model scalars\nout = r0*r0/r1")


# -- scalars through plans ----------------------------------------------------------------


def test_scalars_through_plans_equal_an_eager_evaluation(ckpt, monkeypatch, capsys):
    definitions = "tau = a - pre\nparam lam = 0.3\ns = norm(tau)\n"
    expressions = ["norm(a - pre)", "cos(a - pre, b - pre) * 2", "dot(tau, b - pre)/norm(b - pre)",
                   "norm(mean(a, b) - pre) - 1", "norm(tau/s)", "lam*s - cos(tau, b - pre)/lam",
                   "norm(pre + lam*tau - b)", "norm(ties(tau, b - pre, density=0.5))", "-s*s", "2*lam + 1"]
    code, out, err = drive(monkeypatch, capsys, definitions + "\n".join(expressions) + "\n", binds(ckpt))
    assert (code, err) == (0, "")
    shown = [line for line in out.splitlines() if not line.startswith("  reads: ")]
    models = {"pre": PRE, "a": A, "b": B}
    expected = [f"Scalar: {naive_evaluate(definitions + 'out = ' + e, models)['out']:.8g}" for e in expressions]
    assert shown == expected
    assert out.splitlines()[-1] == "Scalar: 1.6"  # a constant reads nothing


def _random_checkpoints(root, seed):
    gen = torch.Generator().manual_seed(seed)
    models = {name: {"w": torch.randn(8, 6, generator=gen), "b": torch.randn(6, generator=gen)}
              for name in ("pre", "a", "b")}
    args = [arg for name, sd in models.items()
            for arg in ("--bind", f"{name}={write_checkpoint(root / name, sd)}")]
    return models, args


def test_a_norm_over_a_model_scope_threshold(tmp_path, monkeypatch, capsys):
    """The merge needs whole-model thresholds (two passes of a radix select) before the norm
    over it can stream: three passes, planned like any recipe's."""
    models, args = _random_checkpoints(tmp_path, 7)
    expr = 'norm(ties(a - pre, b - pre, density=0.4, scope="model"))'
    code, out, err = drive(monkeypatch, capsys, f"{expr}\n:explain {expr}\n", args)
    assert (code, err) == (0, "")
    # Eagerly: the same merge over one tensor that holds the whole model, then its norm.
    flat = {key: {"all": torch.cat([sd["b"], sd["w"].flatten()])} for key, sd in models.items()}
    merged = tvlang.compile("ties(a - pre, b - pre, density=0.4)").evaluate(flat)["all"]
    assert out.splitlines()[0] == f"Scalar: {math.sqrt(float((merged.double() ** 2).sum())):.8g}"
    assert "# plan: 3 streaming passes over the inputs" in out
    assert out.rstrip().endswith("# scalar outputs, from the whole-model scalars\nout = r2")


class Spread:
    """The standard deviation of the entries of a whole vector by the two-pass algorithm:
    their mean in the first pass, the squared deviations from it in the second."""

    passes = 2

    def __init__(self) -> None:
        self.total, self.count, self.squares, self.mean = 0.0, 0, 0.0, 0.0

    def update(self, pass_index, tensors, ctx) -> None:
        x = tensors[0].double()
        if pass_index == 0:
            self.total += float(x.sum())
            self.count += x.numel()
        else:
            self.squares += float(((x - self.mean) ** 2).sum())

    def end_pass(self, pass_index) -> None:
        if pass_index == 0:
            self.mean = self.total / self.count

    def result(self) -> float:
        return math.sqrt(self.squares / self.count)


@pytest.fixture
def spread_row(monkeypatch):
    row = Builtin("spread", params=(Arg("x", "vector"),), result="scalar", stage="reduce",
                  summary="standard deviation of every entry, in two passes", kernel=f"{__name__}:Spread")
    monkeypatch.setitem(BUILTINS, "spread", row)


def test_a_reducer_that_needs_two_passes(spread_row, ckpt, monkeypatch, capsys):
    """The REPL once streamed reductions by hand and refused this reducer; a plan runs its passes."""
    script = "spread(a - pre)\nspread(a - pre)/norm(b - pre)\n:explain spread(a - pre)\n"
    code, out, err = drive(monkeypatch, capsys, script, binds(ckpt))
    assert (code, err) == (0, "")
    tau = delta(A, PRE).double()
    spread = math.sqrt(float(((tau - tau.mean()) ** 2).mean()))
    lines = out.splitlines()
    assert lines[0] == f"Scalar: {spread:.8g}"
    assert lines[2] == f"Scalar: {spread / float(delta(B, PRE).double().norm()):.8g}"
    assert "# plan: 2 streaming passes over the inputs\n# pass 1: whole-model scalars\nr0 = spread(a - pre)" in out


def test_highlighting_lexer_and_coloured_vars(ckpt):
    pytest.importorskip("pygments")
    from tvlang.faces.highlight import highlight, tokens

    kinds = [(str(kind).replace("Token.", "").replace("Literal.", ""), text)
             for kind, text in tokens('param lam = 0.4\nout m = ties(a, b, density=0.2) + load("x")  # c\n')
             if text.strip()]
    assert kinds[:4] == [("Keyword", "param"), ("Name.Variable", "lam"), ("Operator", "="), ("Number", "0.4")]
    assert ("Name.Builtin", "ties") in kinds and ("Name.Builtin", "load") in kinds
    assert ("Name", "a") in kinds and ("String.Double", '"x"') in kinds and ("Comment.Single", "# c") in kinds
    assert highlight("x = a - pre") != "x = a - pre" and "\x1b[" in highlight("x = a - pre")
    out = io.StringIO()
    repl = Repl({"pre": ckpt["pre"], "a": ckpt["a"]}, stdout=out, stderr=io.StringIO(), color=True)
    repl.feed("x = a - pre")
    repl.feed(":vars")
    assert "\x1b[" in out.getvalue()
    assert re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()) == "x : Delta  = a - pre\n"


def test_set_overrides_a_recipe_param(ckpt, monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.tv"
    recipe.write_text("param lam = 0.5\nout = pre + lam*(a - pre)\n")
    code, out, err = drive(monkeypatch, capsys, "lam\n", [*binds(ckpt), "--set", "lam=-0.25", str(recipe)])
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == "Scalar: -0.25"


def test_bad_inputs_are_errors_not_tracebacks(ckpt, monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.tv"
    recipe.write_text("# a comment\npre = load('x')\nout = pre\n")
    script = '\n'.join(['"abc"', 'load("nope")', "x =", ")", ":explain", ":save a", ":bind", "param x = a",
                        "1/0", "pre = a", "true", f":load {recipe}", ":load /nope.tv", "a - pre"]) + "\n"
    code, out, err = drive(monkeypatch, capsys, script, binds(ckpt))
    assert code == 1
    assert "Traceback" not in err and "internal error" not in err
    assert err.count("error:") == 13
    assert '<repl>:1:1: error: nope: no such file or directory\n  load("nope")\n  ^^^^^^^^^^^^' in err
    assert f"{recipe}:2:1: error: 'pre' is bound to a checkpoint (:sources); choose another name" in err
    assert out.startswith("Delta (task vector): 2 tensors")


def test_a_saved_task_vector_binds_as_a_delta(ckpt, monkeypatch, capsys, tmp_path):
    tau = tmp_path / "tau.safetensors"
    drive(monkeypatch, capsys, f":save a - pre to {tau}\n", binds(ckpt))
    code, out, err = drive(monkeypatch, capsys, ":sources\npre + 0.5*t\nu\n",
                           ["--bind", f"pre={ckpt['pre']}", "--bind", f"t={tau}", "--bind", f"u=delta:{ckpt['b']}"])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[1] == f"t: {tau} (bound, delta; 2 tensors, 6 parameters, float32)"
    assert lines[2] == f"u: {ckpt['b']} (bound, delta; 3 tensors, 6 parameters, float32)"
    assert lines[3].startswith("Model: 3 tensors")
    assert lines[5].startswith("Delta (task vector): ")


def test_path_completion_inside_strings_and_after_commands(tmp_path, monkeypatch):
    (tmp_path / "t5-base").mkdir()
    (tmp_path / "t5-yelp-lm").mkdir()
    (tmp_path / "recipe.tv").write_text("out = pre\n")
    monkeypatch.chdir(tmp_path)
    repl = Repl(stdout=io.StringIO(), stderr=io.StringIO())
    assert repl.completions('x = load("', "t5") == ["t5-base/", "t5-yelp-lm/"]
    # readline splits words at '-': the candidate replaces only the part after it
    assert repl.completions('x = load("t5-', "y") == ["yelp-lm/"]
    assert repl.completions(":load ", "rec") == ["recipe.tv"]
    assert repl.completions(":bind pre=", "t5-b") == ["t5-base/"]
    assert repl.completions(":save a - pre to ", "t5-y") == ["t5-yelp-lm/"]
    assert repl.completions('x = load("t5-base") + ', "t5") == []
