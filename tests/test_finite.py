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


@pytest.mark.parametrize("expr", ["pre + 1e200*(1e200*(ft - pre))", "pre + (ft - pre)/1e-320"])
def test_overflowing_coefficients_are_refused(tmp_path, chunking, expr):
    pre, ft = models()
    out = tmp_path / "o.safetensors"
    with pytest.raises(tvlang.TvlangError) as err:
        tvlang.compile(expr).run({"pre": pre, "ft": ft}, str(out))
    # w[0, 0] is 0 * inf = nan; the first entry of the first tensor is named
    assert err.value.message == "output 'out': tensor 'w' has a non-finite value (nan) at index (0, 0)"
    assert err.value.tensor == "w"
    assert any("--allow-nonfinite" in note for note in err.value.notes)
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
    assert first_nonfinite(big) is None  # the sum overflows float32, not the check (float64)
    assert first_nonfinite(torch.tensor([1.0, float("-inf"), 2.0])) == 1
    assert first_nonfinite(torch.tensor([1, 2])) is None


def test_cli_exit_1_with_the_message_and_no_output(tmp_path, capsys):
    pre, ft = models()
    write_checkpoint(str(tmp_path / "pre"), pre)
    write_checkpoint(str(tmp_path / "ft"), ft)
    out = tmp_path / "merged"
    code = main(["run", "-e", "pre + 1e200*(1e200*(ft - pre))", "--bind", f"pre={tmp_path / 'pre'}",
                 "--bind", f"ft={tmp_path / 'ft'}", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: output 'out': tensor 'w' has a non-finite value (nan) at index (0, 0)" in err
    assert "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "tvtmp" in p.name] == []
