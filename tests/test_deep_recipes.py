"""Recipes as long and as deep as generators write them: no stage recurses once per level.

Issue 18, case 11: more than ~330 chained definitions (``t{i} = 0.5*t{i-1}``) hit
Python's recursion limit in ``check`` and ``run``. Now the parser, the checker, the
IR builder, the optimizer passes, the scheduler, explain and the printer walk
iteratively, and each case here is checked, explained and run, with the result
compared with a naive computation. The time bounds are loose on purpose: they
catch a quadratic blow-up (hours at these sizes), not a slow machine.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import sys
import time

import pytest
import torch

import tvlang
from tvlang.faces.cli import main
from tvlang.language import ast
from tvlang.language.checker import check
from tvlang.language.printer import to_text
from tvlang.language.syntax import parse
from tvlang.plan.optimize import OptimizerFlags

PRE = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
FT = {"w": torch.tensor([2.0, 0.0, 5.0]), "b": torch.tensor([-1.5])}
BIND = ["--bind", "pre=model", "--bind", "ft=model"]


def chain(n: int) -> tuple[str, list[float]]:
    """A chain of ``n`` definitions that stays finite (x2 and x0.5 in turn), and its factors."""
    factors = [2.0 if i % 2 else 0.5 for i in range(1, n)]
    lines = ["t0 = ft - pre"] + [f"t{i} = {f:g}*t{i - 1}" for i, f in zip(range(1, n), factors)]
    return "\n".join(lines + [f"out = pre + t{n - 1}"]) + "\n", factors


def naive_chain(factors: list[float]) -> dict[str, list[float]]:
    """The chain computed as written, one step at a time, in Python floats."""
    result = {}
    for name in PRE:
        values = []
        for pre, ft in zip(PRE[name].tolist(), FT[name].tolist()):
            t = ft - pre
            for factor in factors:
                t = factor * t
            values.append(pre + t)
        result[name] = values
    return result


def timed(seconds: float):
    """Fail when the block takes longer than ``seconds`` (a loose bound against blow-ups)."""
    class Timer:
        def __enter__(self):
            self.start = time.perf_counter()
            return self

        def __exit__(self, *exc):
            self.elapsed = time.perf_counter() - self.start
            if exc[0] is None:
                assert self.elapsed < seconds, f"took {self.elapsed:.1f} s (bound {seconds} s)"

    return Timer()


def checks(tmp_path, text: str, *extra: str) -> int:
    path = tmp_path / "recipe.tv"
    path.write_text(text)
    return main(["check", str(path), *BIND, *extra])


# -- 100,000 chained definitions ----------------------------------------------------------

N = 100_000


@pytest.fixture(scope="module")
def long_chain():
    return chain(N)


@pytest.mark.slow
def test_a_100k_line_chain_checks(tmp_path, long_chain, capsys):
    text, _ = long_chain
    with timed(600):
        assert checks(tmp_path, text) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_100k_line_chain_explains_and_runs(long_chain):
    text, factors = long_chain
    with timed(600):
        plan = tvlang.compile(text)
        explained = plan.explain()
        result = plan.evaluate({"pre": PRE, "ft": FT})
    assert "out = 2*ft - pre" in explained  # the factors multiply to 2: pre + 2*(ft - pre)
    assert {name: tensor.tolist() for name, tensor in result.items()} == naive_chain(factors)


def test_an_error_deep_in_a_long_chain_is_reported(tmp_path, capsys):
    text, _ = chain(20_000)
    # The first definition's option is refused while the IR is built, 20,000 frames down.
    text = text.replace("t0 = ft - pre", "t0 = ties(ft - pre, density=1.5)", 1)
    assert checks(tmp_path, text) == 1
    err = capsys.readouterr().err
    assert "ties: " in err and "density" in err and "Traceback" not in err


def test_a_chain_with_every_pass_off_runs():
    text, factors = chain(3_000)
    plan = tvlang.compile(text, flags=OptimizerFlags.none())
    assert plan.explain().count("\n") > 3_000  # the unoptimized program, step by step
    result = plan.evaluate({"pre": PRE, "ft": FT})
    assert {name: tensor.tolist() for name, tensor in result.items()} == naive_chain(factors)


# -- deep expressions ---------------------------------------------------------------------

DEPTH = 5_000


@pytest.mark.parametrize("expr", [
    "pre + " + "(" * DEPTH + "ft - pre" + ")" * DEPTH,  # brackets: no node of their own
    "pre + " + "2*(0.5*(" * (DEPTH // 2) + "ft - pre" + "))" * (DEPTH // 2),  # 5,000 levels of '*'
    "pre + " + "-(" * DEPTH + "ft - pre" + ")" * DEPTH,  # 5,000 unary minuses (an even count)
])
def test_deep_expressions_check_explain_and_run(tmp_path, expr):
    with timed(300):
        assert main(["check", "-e", expr, *BIND]) == 0
        plan = tvlang.compile(expr)
        assert "out = ft" in plan.explain()  # every factor cancels
        result = plan.evaluate({"pre": PRE, "ft": FT})
    assert {name: tensor.tolist() for name, tensor in result.items()} == {k: v.tolist() for k, v in FT.items()}


TERMS = 20_000


def test_a_sum_of_20000_terms_checks_explains_and_runs():
    expr = " + ".join(["0.001*(ft - pre)"] * TERMS)
    with timed(300):
        assert main(["check", "-e", expr, *BIND]) == 0
        plan = tvlang.compile(expr)
        explained = plan.explain()
        result = plan.evaluate({"pre": PRE, "ft": FT})
    coefficient = 0.0
    for _ in range(TERMS):  # as fold adds them: left to right, in float64
        coefficient += 0.001
    assert plan.output_kind("out") == "delta"
    assert f"out = {float(f'{coefficient:.12g}'):g}*ft" in explained
    for name in PRE:
        expected = coefficient * FT[name].double() - coefficient * PRE[name].double()
        torch.testing.assert_close(result[name].double(), expected, rtol=1e-6, atol=1e-6)


def test_a_sum_of_many_distinct_sources_checks_explains_and_runs():
    n = 2_000
    expr = "pre + " + " + ".join(f"{1 / n:g}*(x{i} - pre)" for i in range(n))
    bindings = {"pre": PRE, **{f"x{i}": {k: v + i for k, v in FT.items()} for i in range(n)}}
    with timed(300):
        assert main(["check", "-e", expr, "--bind", "pre=model",
                     *[arg for i in range(n) for arg in ("--bind", f"x{i}=model")]]) == 0
        plan = tvlang.compile(expr)
        assert plan.sources_read() == [f"x{i}" for i in range(n)]  # pre's coefficient cancels to 0
        explained = plan.explain()
        result = plan.evaluate(bindings)
    assert explained.count("read(x") == n
    for name in PRE:
        expected = sum(bindings[f"x{i}"][name].double() for i in range(n)) / n
        torch.testing.assert_close(result[name].double(), expected, rtol=1e-5, atol=1e-5)


# -- the AST itself: print, compare, hash, repr, pickle ----------------------------------


def test_a_deep_tree_prints_back_compares_and_pickles():
    program = parse("out = " + " + ".join(f"{i}*(x{i} - pre)" for i in range(DEPTH)) + "\n")
    assert parse(to_text(program)) == program
    assert hash(parse(to_text(program))) == hash(program)
    assert repr(program).startswith("Program(statements=(Out(name=None, value=BinOp(op='+', left=BinOp(")
    for copied in (pickle.loads(pickle.dumps(program)), copy.deepcopy(program)):
        assert copied == program
        assert copied.statements[0].value.right.span == program.statements[0].value.right.span


def test_a_deep_ast_built_by_hand_is_checked():
    expr: ast.Expr = ast.Name("a")
    for _ in range(DEPTH):
        expr = ast.BinOp("*", ast.Number(1.0), ast.Neg(expr))
    checked = check(ast.Program((ast.Out(None, expr),)), source="")
    assert checked.outputs[0].kind == "model"


def test_every_stage_runs_in_a_shallow_stack():
    """With the stack limited to 120 frames more than the test's own, a 2,000-line chain
    (and a 2,000-term sum) parses, checks, compiles, explains and runs."""
    text, factors = chain(2_000)
    expr = " + ".join(["0.5*(ft - pre)"] * 2_000)
    tvlang.compile("pre + 0.5*(ft - pre)").evaluate({"pre": PRE, "ft": FT})  # imports done
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 120)
    try:
        for recipe in (text, expr):
            plan = tvlang.compile(recipe, filename=f"{len(recipe)}.tv")
            plan.explain()
            result = plan.evaluate({"pre": PRE, "ft": FT})
        unoptimized = tvlang.compile(text, flags=OptimizerFlags.none())
        unoptimized.explain()
        unoptimized.evaluate({"pre": PRE, "ft": FT})
    finally:
        sys.setrecursionlimit(limit)
    torch.testing.assert_close(result["w"], 1000 * (FT["w"] - PRE["w"]))
