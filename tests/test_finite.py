"""The finiteness policy (issue 18, case 4): a NaN or an infinity in a result is an error
that names the output, the tensor and the first index, unless allowed."""

from __future__ import annotations

import math

import pytest
import torch

import tvlang
from tvlang.faces.cli import main
from tvlang.run import chunked
from tvlang.run.finite import first_nonfinite
from tvlang.testing.synth import write_checkpoint


def models(nan_at=None):
    pre = {"w": torch.zeros(4, 3), "b": torch.zeros(5), "step": torch.tensor([3])}
    ft = {"w": torch.arange(12.0).reshape(4, 3) / 10, "b": torch.ones(5), "step": torch.tensor([3])}
    if nan_at is not None:
        ft["w"][nan_at] = math.nan
    return pre, ft


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    if request.param == "chunked":  # every float tensor here runs in chunks of 4 entries
        monkeypatch.setattr(chunked, "CHUNK_MIN", 4)
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4)
    return request.param


RECIPE = 'pre = load("pre")\nft = load("ft")\nout = {}\n'


@pytest.mark.parametrize("expr,column,message", [
    ("pre + 1e200*(1e200*(ft - pre))", 13,
     "this scales a task vector by about 1e+400, beyond the largest number a run can hold (about 1.8e+308)"),
    ("pre + (ft - pre)/1e-320", 13,
     "this scales a task vector by about 1e+320, beyond the largest number a run can hold (about 1.8e+308)"),
    ("pre + 1e-200*(1e-200*(ft - pre))", 13,
     "this scales a task vector by about 1e-400, below the smallest number a run can hold (about 4.9e-324)"),
    ("pre + 1e308*(ft - pre) + 1e308*(ft - pre)", 1,
     "output 'out': its coefficients add up to -inf, beyond the largest number a run can hold (about 1.8e+308)"),
])
def test_coefficients_beyond_a_double_are_check_time_errors(expr, column, message):
    """0.2 wrote an all-NaN model for these (or, below the range, the base unchanged)."""
    text = RECIPE.format(expr)
    with pytest.raises(tvlang.TvlangError) as err:
        tvlang.compile(text, filename="r.tv")
    assert err.value.message == message
    assert (err.value.span.line, err.value.span.column) == (3, column)


@pytest.mark.parametrize("expr", ["pre + 0*(ft - pre)", "pre + 1e200*(1e-200*(ft - pre))",
                                  "pre + (1e300*(ft - pre))/1e300"])
def test_coefficients_inside_the_range_pass(expr):
    pre, ft = models()
    got = tvlang.compile(expr).evaluate({"pre": pre, "ft": ft}, dtype="float64")
    factor = 0.0 if expr.startswith("pre + 0") else 1.0
    torch.testing.assert_close(got["w"], (pre["w"] + factor * (ft["w"] - pre["w"])).double().float(),
                               rtol=1e-6, atol=0)


def test_a_coefficient_beyond_the_compute_dtype_is_refused_before_reading(tmp_path):
    pre, ft = models()
    out = tmp_path / "o.safetensors"
    plan = tvlang.compile("pre + 1e30*(1e30*(ft - pre))")  # 1e60 fits a double, not a float32
    with pytest.raises(tvlang.TvlangError) as err:
        plan.run({"pre": pre, "ft": ft}, str(out))
    assert err.value.message == ("the recipe scales a term by -1e+60, beyond what float32 can hold "
                                 "(about 3.4e+38): compute in float64 (--dtype float64)")
    assert not out.exists()
    # In float64 the coefficient is fine, and the result overflowing float32 is named at its index.
    with pytest.raises(tvlang.TvlangError) as err:
        plan.run({"pre": pre, "ft": ft}, str(out), dtype="float64")
    assert err.value.message == "output 'out': tensor 'w' has a non-finite value (inf) at index (0, 1)"
    assert not out.exists()


def test_one_nan_in_an_input_through_norm_is_refused(chunking):
    pre, ft = models(nan_at=(2, 1))
    with pytest.raises(tvlang.TvlangError) as err:
        tvlang.compile("pre + (1/norm(ft - pre))*(ft - pre)").evaluate({"pre": pre, "ft": ft})
    assert err.value.message.startswith("the whole-model scalar norm(...) (r0 in explain) is nan")


def test_a_nan_in_an_input_is_named_at_its_index(chunking):
    pre, ft = models(nan_at=(2, 1))
    with pytest.raises(tvlang.TvlangError) as err:
        tvlang.compile("pre + 0.5*(ft - pre)").evaluate({"pre": pre, "ft": ft})
    assert err.value.message == "output 'out': tensor 'w' has a non-finite value (nan) at index (2, 1)"


def test_float16_overflow_on_output_is_refused(chunking):
    pre, ft = models()
    with pytest.raises(tvlang.TvlangError) as err:
        tvlang.compile("pre + 1e5*(ft - pre)").evaluate({"pre": pre, "ft": ft}, out_dtype="float16")
    # w = 1e5 * [0, .1, .2, ...]: 1e4 fits in float16, 1e5 * 0.7 = 70000 > 65504 does not
    assert err.value.message == "output 'out': tensor 'w' has a non-finite value (inf) at index (2, 1)"
    assert "65504" in err.value.notes[0]


def test_allow_nonfinite_writes_them(chunking):
    pre, ft = models(nan_at=(0, 2))
    got = tvlang.compile("pre + 0.5*(ft - pre)").evaluate({"pre": pre, "ft": ft}, allow_nonfinite=True)
    assert math.isnan(got["w"][0, 2]) and got["w"][1, 0] == 0.15


def test_finite_values_that_overflow_a_float32_sum_pass():
    big = torch.full((1000,), 3e38)
    assert first_nonfinite(big) is None  # the float32 sum overflows; the search finds no bad entry
    # half-precision values are summed in float32: 100 * 60000 does not overflow it
    assert first_nonfinite(torch.full((100,), 60000.0, dtype=torch.float16)) is None
    assert first_nonfinite(torch.tensor([1.0, 2.0, float("nan")], dtype=torch.bfloat16)) == 2
    assert first_nonfinite(torch.tensor([1.0, float("-inf"), 2.0])) == 1
    assert first_nonfinite(torch.tensor([1, 2])) is None


def test_cli_exit_1_with_the_message_and_no_output(tmp_path, capsys):
    pre, ft = models()
    write_checkpoint(str(tmp_path / "pre"), pre)
    write_checkpoint(str(tmp_path / "ft"), ft)
    out = tmp_path / "merged"
    code = main(["run", "-e", "pre + 1e20*(ft - pre)", "--bind", f"pre={tmp_path / 'pre'}",
                 "--bind", f"ft={tmp_path / 'ft'}", "-o", str(out), "--out-dtype", "float16"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: output 'out': tensor 'w' has a non-finite value (inf) at index (0, 1)" in err
    assert "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "tvtmp" in p.name] == []
