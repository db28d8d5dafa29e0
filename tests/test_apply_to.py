"""``tvlang.apply_to``: a result written into a module's parameters in place (issue 13)."""

from __future__ import annotations

import pytest
import torch

import tvlang


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("steps", torch.tensor([7]))


def state(seed: float) -> dict[str, torch.Tensor]:
    return {"lin.weight": torch.full((2, 3), seed), "lin.bias": torch.full((2,), seed), "steps": torch.tensor([7])}


def test_apply_to_writes_the_result_into_the_parameters_in_place():
    module = Tiny()
    weight = module.lin.weight
    count = tvlang.apply_to(module, "pre + 0.5*(ft - pre)", {"pre": state(1.0), "ft": state(3.0)})
    assert count == 3
    assert module.lin.weight is weight  # the same parameter, changed in place
    assert module.lin.weight.tolist() == [[2.0] * 3] * 2 and module.lin.bias.tolist() == [2.0, 2.0]
    assert module.steps.tolist() == [7]


def test_apply_to_aligns_wrapped_module_names_and_casts():
    wrapped = torch.nn.Module()
    wrapped.module = Tiny().to(torch.float64)  # as DDP wraps a model: names start with module.
    tvlang.apply_to(wrapped, tvlang.compile("pre + 0.25*(ft - pre)"), {"pre": state(0.0), "ft": state(4.0)})
    assert wrapped.module.lin.weight.dtype == torch.float64
    assert wrapped.module.lin.weight.tolist() == [[1.0] * 3] * 2


def test_apply_to_a_module_without_the_tensors_is_an_error():
    other = torch.nn.Module()
    other.register_parameter("gain", torch.nn.Parameter(torch.zeros(2)))
    message = "the module has no tensor for 'lin.weight' .its names look like 'gain'"
    with pytest.raises(tvlang.TvlangError, match=message):
        tvlang.apply_to(other, "pre + 0.5*(ft - pre)", {"pre": state(1.0), "ft": state(3.0)})
    assert other.gain.tolist() == [0.0, 0.0]


def test_apply_to_a_module_of_another_shape_is_an_error():
    # Linear(4, 4) has weight and bias: aligned (lin. removed), then refused on the shape
    message = r"tensor 'lin.weight' is \[2, 3\] but the module's 'weight' is \[4, 4\]"
    with pytest.raises(tvlang.TvlangError, match=message):
        tvlang.apply_to(torch.nn.Linear(4, 4), "pre + 0.5*(ft - pre)", {"pre": state(1.0), "ft": state(3.0)})
