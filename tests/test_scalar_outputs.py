"""Scalar outputs: a recipe whose value is a number is checked, planned and computed.

``check(scalar_outputs=True)`` accepts ``out = norm(a - pre)``; the planner schedules its
reductions like any other (no main pass when nothing is written); ``Plan.scalar`` computes
it. Values are compared with a naive eager evaluation (``tests/naive.py``) and, for a
model-scope threshold, with the same merge over one tensor that holds the whole model.
"""

from __future__ import annotations

import math

import pytest
import torch

import tvlang
from naive import evaluate as naive_evaluate
from tvlang.errors import TvlangError
from tvlang.language.checker import check
from tvlang.language.syntax import parse
from tvlang.run.evaluate import scalars


def _models(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"layer.0.w": (6, 5), "layer.0.b": (5,), "layer.1.w": (4, 6), "head": (7,)}
    models = {}
    for name in ("pre", "a", "b"):
        sd = {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}
        sd["steps"] = torch.tensor([3, 1], dtype=torch.int64)
        models[name] = sd
    return models


MODELS = _models()


# -- the checker ---------------------------------------------------------------------------


def test_check_without_an_output_gives_the_kind_of_every_name():
    text = "param lam = 0.5\ntau = ft - pre\nm = pre + lam*tau\ns = norm(tau)\nout x = m\n"
    checked = check(parse(text), source=text, require_output=False)
    assert checked.kinds == {"lam": "scalar", "tau": "delta", "m": "model", "s": "scalar", "x": "model"}
    definitions = "tau = ft - pre\n"
    assert check(parse(definitions), source=definitions, require_output=False).outputs == []
    with pytest.raises(TvlangError, match="the recipe has no output"):
        check(parse(definitions), source=definitions)


def test_a_scalar_output_is_checked_only_when_asked_for():
    text = "out = norm(a - b)\n"
    with pytest.raises(TvlangError, match="an output must be a model or a task vector, got a number"):
        check(parse(text), source=text)
    (output,) = check(parse(text), source=text, scalar_outputs=True).outputs
    assert (output.name, output.kind) == ("out", "scalar")


# -- the plan ------------------------------------------------------------------------------


def test_a_scalar_output_is_planned_with_its_reductions_and_no_main_pass():
    plan = tvlang.compile("cos(a - pre, b - pre) * 2")
    assert plan.outputs == ["out"] and plan.output_kind("out") == "scalar"
    assert plan.sources_read("out") == ["a", "pre", "b"]
    schedule = plan.schedule
    assert [[task.builtin for task in tasks] for tasks, _ in schedule.levels] == [["cos"]]
    assert schedule.main.steps == [] and schedule.passes == 1
    assert [name for name, _ in schedule.scalars] == ["out"]
    text = plan.explain()
    assert ("# plan: 1 streaming pass over the inputs\n"
            "# pass 1: whole-model scalars\nr0 = cos(a - pre, b - pre)\n") in text
    assert "per tensor" not in text
    assert text.endswith("# scalar outputs, from the whole-model scalars\nout = r0*2")


def test_a_constant_scalar_reads_nothing():
    plan = tvlang.compile("param lam = 0.25\nout = 2*lam + 1\n")
    assert plan.schedule.passes == 0 and plan.sources_read() == []
    assert plan.scalar() == 1.5
    assert plan.with_params(lam=1.0).scalar({}) == 3.0


# A table of scalar recipes; each is computed through its plan and eagerly.
SCALAR_RECIPES = [
    "norm(a - pre)",
    "cos(a - pre, b - pre) * 2",
    "dot(a - pre, b - pre) / norm(a - pre)",
    "norm(pre + 0.5*(a - pre) - b)",
    "norm(mean(a, b) - pre) - norm(sum(a - pre, b - pre))",
    "norm((a - pre)/norm(a - pre))",  # a reduction over a vector scaled by a reduction: two levels
    "param lam = 0.3\ntau = a - pre\nout = lam*norm(tau) - cos(tau, b - pre)/lam",
    "norm(ties(a - pre, b - pre, density=0.5))",
    "-dot(topk(a - pre, density=0.3), b - pre)",
]


@pytest.mark.parametrize("text", SCALAR_RECIPES)
def test_scalars_through_plans_equal_an_eager_evaluation(text):
    plan = tvlang.compile(text)
    # In float64 the plan and the eager walk of the AST differ only by rounding order.
    expected = naive_evaluate(text, MODELS, dtype=torch.float64)["out"]
    assert plan.scalar(MODELS, dtype="float64", allow_unused=True) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # In float32 (the default) the vectors round as float32 does; the reducers sum in float64.
    expected32 = naive_evaluate(text, MODELS, dtype=torch.float32)["out"]
    assert plan.scalar(MODELS, allow_unused=True) == pytest.approx(expected32, rel=1e-5, abs=1e-6)


def _whole_model_as_one_tensor(models):
    """Each model as one flat tensor, so a per-tensor merge sees the whole model."""
    names = [n for n, t in models["pre"].items() if t.is_floating_point()]
    return {key: {"all": torch.cat([sd[n].flatten() for n in names])} for key, sd in models.items()}


def test_a_norm_over_a_model_scope_threshold_takes_its_passes():
    text = 'norm(ties(a - pre, b - pre, density=0.4, scope="model"))'
    plan = tvlang.compile(text)
    levels = [[task.builtin for task in tasks] for tasks, _ in plan.schedule.levels]
    assert levels == [["@ties.threshold:0", "@ties.threshold:1"], ["norm"]]  # thresholds, then the norm
    assert plan.schedule.passes == 3  # the radix select takes two passes, the norm one
    merged = tvlang.compile("ties(a - pre, b - pre, density=0.4)").evaluate(_whole_model_as_one_tensor(MODELS))
    expected = math.sqrt(float((merged["all"].double() ** 2).sum()))
    assert plan.scalar(MODELS, allow_unused=True) == pytest.approx(expected, rel=1e-12)


def test_a_vector_scaled_by_a_norm_of_a_model_scope_merge():
    # The merge needs its thresholds before the norm over it can run: three levels of work.
    text = 't = ties(a - pre, b - pre, density=0.4, scope="model")\nout = pre + t/norm(t)\n'
    plan = tvlang.compile(text)
    assert plan.schedule.passes == 4
    result = plan.evaluate(MODELS)
    flat = _whole_model_as_one_tensor(MODELS)
    merged = tvlang.compile("ties(a - pre, b - pre, density=0.4)").evaluate(flat)["all"]
    expected = flat["pre"]["all"] + merged / torch.linalg.vector_norm(merged.double()).float()
    got = torch.cat([result[n].flatten() for n in MODELS["pre"] if MODELS["pre"][n].is_floating_point()])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_several_scalar_outputs_and_a_vector_one():
    text = "tau = a - pre\nout n = norm(tau)\nout c = cos(tau, b - pre)\nout m = pre + tau/norm(tau)\n"
    plan = tvlang.compile(text)
    assert [plan.output_kind(name) for name in plan.outputs] == ["scalar", "scalar", "model"]
    values = scalars(plan, MODELS, dtype="float64")
    eager = naive_evaluate(text, MODELS, dtype=torch.float64)
    assert values == pytest.approx({"n": eager["n"], "c": eager["c"]}, rel=1e-12)
    assert plan.scalar(MODELS, output="c", dtype="float64") == values["c"]
    torch.testing.assert_close(plan.evaluate(MODELS, output="m", dtype="float64")["head"],
                               eager["m"]["head"].float(), rtol=1e-6, atol=1e-6)


def test_a_number_is_not_written_or_streamed():
    plan = tvlang.compile("norm(a - pre)", filename="s.tv")
    with pytest.raises(TvlangError) as info:
        plan.run(MODELS, "never.safetensors")
    assert info.value.render() == ("s.tv:1:1: error: an output must be a model or a task vector, got a number\n"
                                   "  norm(a - pre)\n  ^^^^^^^^^^^^^\n"
                                   "  note: name it (x = ...) and use it to scale a task vector")
    with pytest.raises(TvlangError, match="got a number") as info:
        plan.evaluate(MODELS)
    assert info.value.notes == ("note: its value is Plan.scalar()",)
    with pytest.raises(TvlangError, match="output 'out' is a task vector, not a number"):
        tvlang.compile("a - pre").scalar(MODELS, allow_unused=True)
    with pytest.raises(TvlangError, match="this recipe has outputs n, c: say which one"):
        tvlang.compile("out n = norm(a)\nout c = norm(b)\n").scalar(MODELS, allow_unused=True)


def test_a_zero_divisor_found_at_run_time_is_an_error():
    with pytest.raises(TvlangError, match="division by zero"):
        tvlang.compile("1/norm(a - a)").scalar(MODELS, allow_unused=True)
    assert tvlang.compile("norm(a - a)").scalar(MODELS, allow_unused=True) == 0.0


def test_a_pending_plan_computes_its_scalar_once_bound():
    tau = {k: v - MODELS["pre"][k] for k, v in MODELS["a"].items() if v.is_floating_point()}
    plan = tvlang.compile("norm(pre + tau - pre)")  # tau must be a task vector: typed by its binding
    value = plan.scalar({"pre": MODELS["pre"], "tau": tvlang.delta(tau)})
    assert value == pytest.approx(tvlang.compile("norm(a - pre)").scalar(MODELS, allow_unused=True), rel=1e-6)
