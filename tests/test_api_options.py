"""The Python API's options: keyword parameters of Plan's methods, and unused bindings refused (issue 13)."""

import inspect

import pytest
import torch

import tvlang
from tvlang import TvlangError
from tvlang.run import driver, scalars

PRE = {"w": torch.tensor([1.0, 2.0])}
FT = {"w": torch.tensor([3.0, 0.0])}


def _keywords(function, drop=()) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in drop}


@pytest.mark.parametrize("method, executor", [
    (tvlang.Plan.run, driver.run),
    (tvlang.Plan.stream, driver.stream),
    (tvlang.Plan.evaluate, driver.stream),
    (tvlang.Plan.scalar, scalars.scalars),
])
def test_plan_methods_name_the_run_layers_options_with_its_defaults(method, executor):
    """Every option the run layer takes is a keyword parameter of the Plan method, with the same
    default (0.2 took **options: nothing for an editor or a type checker to know)."""
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(method).parameters.values())
    assert _keywords(method, drop=("allow_unused", "output")) == _keywords(executor, drop=("output",))
    assert _keywords(method)["allow_unused"] is False


def test_a_misspelled_option_is_refused_at_the_call_before_any_input_is_opened():
    plan = tvlang.compile("pre + 0.5*(ft - pre)")
    with pytest.raises(TypeError, match="unexpected keyword argument 'devcie'"):
        plan.evaluate({"pre": "no/such/pre", "ft": "no/such/ft"}, devcie="cpu")


def test_an_unused_binding_is_an_error_naming_it_with_the_near_name():
    plan = tvlang.compile("pre + 0.5*(ft - pre)")
    with pytest.raises(TvlangError) as info:
        plan.evaluate({"pre": PRE, "ft": FT, "fft": FT})
    assert info.value.render() == (
        "error: the recipe does not use the binding 'fft'; did you mean 'ft'? (it reads pre, ft)\n"
        "  note: pass allow_unused=True to keep names that other recipes read (a sweep)")
    with pytest.raises(TvlangError, match="the recipe does not use the bindings 'x', 'y' \\(it reads pre, ft\\)"):
        plan.stream({"pre": PRE, "ft": FT, "x": FT, "y": FT})
    with pytest.raises(TvlangError, match="the recipe does not use the binding 'x'"):
        plan.run({"pre": PRE, "ft": FT, "x": FT}, "never.safetensors")
    with pytest.raises(TvlangError, match="the recipe does not use the binding 'x'"):
        tvlang.compile("norm(ft - pre)").scalar({"pre": PRE, "ft": FT, "x": FT})


def test_a_binding_of_a_name_the_recipe_defines_says_so():
    plan = tvlang.compile("tau = ft - pre\nout = pre + 0.5*tau\n")
    with pytest.raises(TvlangError, match="does not use the binding 'tau'; the recipe defines 'tau' itself"):
        plan.evaluate({"pre": PRE, "ft": FT, "tau": FT})


def test_allow_unused_keeps_one_dict_for_many_recipes():
    everything = {"pre": PRE, "ft": FT, "other": {"w": torch.tensor([9.0, 9.0])}}
    plan = tvlang.compile("pre + 0.5*(ft - pre)")
    assert plan.evaluate(everything, allow_unused=True)["w"].tolist() == [2.0, 1.0]
    assert [(n, t.tolist()) for n, t in plan.stream(everything, allow_unused=True)] == [("w", [2.0, 1.0])]
    assert tvlang.compile("norm(ft - pre)").scalar(everything, allow_unused=True) == pytest.approx(8 ** 0.5)


def test_a_pending_plan_and_apply_to_refuse_unused_bindings_too():
    tau = tvlang.delta({"w": torch.tensor([2.0, -2.0])})
    pending = tvlang.compile("pre + 0.5*tau")  # typed by its bindings
    with pytest.raises(TvlangError, match="does not use the binding 'taux'; did you mean 'tau'"):
        pending.evaluate({"pre": PRE, "tau": tau, "taux": tau})
    assert pending.evaluate({"pre": PRE, "tau": tau, "taux": tau}, allow_unused=True)["w"].tolist() == [2.0, 1.0]
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TvlangError, match="does not use the binding 'fx'"):
        tvlang.apply_to(holder, "pre + 0.5*(ft - pre)", {"pre": PRE, "ft": FT, "fx": FT})
    assert holder.w.tolist() == [0.0, 0.0]
    assert tvlang.apply_to(holder, "pre + 0.5*(ft - pre)", {"pre": PRE, "ft": FT, "fx": FT}, allow_unused=True) == 1
    assert holder.w.tolist() == [2.0, 1.0]


def test_a_source_the_optimizer_drops_is_still_a_used_binding():
    """lam = 0 cancels ft's term; ft is still a name the recipe reads, so binding it is no error."""
    plan = tvlang.compile("param lam = 0.0\nout = pre + lam*(ft - pre)\n")
    assert plan.sources_read() == ["pre"]
    assert plan.evaluate({"pre": PRE, "ft": FT})["w"].tolist() == [1.0, 2.0]
