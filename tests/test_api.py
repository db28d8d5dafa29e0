"""The Python API's typing of free names by their bindings."""

import pytest
import torch

import tvlang


def _sd(value):
    return {"w": torch.full((2, 3), float(value)), "steps": torch.tensor([7])}


def test_a_free_name_bound_to_a_task_vector_types_the_plan_at_run_time():
    plan = tvlang.compile("pre + 0.7*tau")  # only well typed when tau is a task vector
    result = plan.evaluate({"pre": _sd(1), "tau": tvlang.delta(_sd(2))})
    assert torch.equal(result["w"], torch.full((2, 3), 1 + 0.7 * 2))
    assert torch.equal(result["steps"], torch.tensor([7]))  # integer buffer from the base


def test_the_pending_plan_reports_the_checker_error_until_bound():
    plan = tvlang.compile("pre + 0.7*tau")
    with pytest.raises(tvlang.TvlangError, match="model coefficients sum to 1.7"):
        plan.explain()
    with pytest.raises(tvlang.TvlangError, match="model coefficients sum to 1.7"):
        plan.evaluate({"pre": _sd(1), "tau": _sd(2)})  # a model bound to tau: still wrong


def test_a_delta_file_written_by_tvlang_binds_as_a_task_vector(tmp_path):
    tau = tmp_path / "tau.safetensors"
    tvlang.compile("ft - pre").run({"pre": _sd(1), "ft": _sd(3)}, out=str(tau))
    result = tvlang.compile("pre + 0.5*tau").evaluate({"pre": _sd(1), "tau": str(tau)})
    assert torch.equal(result["w"], torch.full((2, 3), 2.0))


def test_explicit_sources_are_checked_at_compile_time():
    with pytest.raises(tvlang.TvlangError, match="model coefficients sum to 1.7"):
        tvlang.compile("pre + 0.7*tau", sources={"pre": "model", "tau": "model"})
    plan = tvlang.compile("pre + 0.7*tau", sources={"pre": "model", "tau": "delta"})
    assert plan.sources_read() == ["pre", "tau"]


def test_errors_no_binding_can_fix_are_raised_at_compile_time():
    with pytest.raises(tvlang.TvlangError, match="no param 'lamb'"):
        tvlang.compile("pre + lam*(ft - pre)", lamb=0.25)
    with pytest.raises(tvlang.TvlangError, match="unknown built-in|not a built-in|unknown function"):
        tvlang.compile("pre + tiez(a - pre, b - pre)")
