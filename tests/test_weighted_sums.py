"""``sum(..., weights=[...])`` and ``mean(..., weights=[...])``: weighted sums whose weights may
vary per tensor (``layers(...)``, ``where(...)``), compared with the sums written by hand."""

from __future__ import annotations

import pytest
import torch

import tvlang
from tvlang.errors import TvlangError
from tvlang.run import chunked


def state(scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(scale * 10))
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up.weight", "model.layers.1.mlp.up.weight",
             "model.layers.2.self_attn.q.weight", "model.norm.weight"]
    return {n: torch.randn(40, 30, generator=gen) * scale for n in names}


A, B, BASE = state(1.0), state(2.0), state(0.5)
# layers(0, 1) over 3 layers: 0, 0.5, 1 for layers 0..2, 0 outside the layers
GRADIENT = {"model.embed_tokens.weight": 0.0, "model.layers.0.mlp.up.weight": 0.0,
            "model.layers.1.mlp.up.weight": 0.5, "model.layers.2.self_attn.q.weight": 1.0, "model.norm.weight": 0.0}


@pytest.mark.parametrize("chunks", [False, True])
def test_weighted_sum_and_mean_use_each_tensors_weights(chunks, monkeypatch):
    if chunks:
        monkeypatch.setattr(chunked, "CHUNK_MIN", 1)
    recipe = ('out s = base + sum(a - base, b - base, weights=[layers(0, 1), where("*mlp*", 2, -1)])\n'
              'out m = mean(a, b, weights=[layers(0, 1), 0.5])\n')
    plan = tvlang.compile(recipe)
    bindings = {"a": A, "b": B, "base": BASE}
    s, m = plan.evaluate(bindings, output="s"), plan.evaluate(bindings, output="m")
    for name, g in GRADIENT.items():
        wb = 2.0 if "mlp" in name else -1.0
        expected = BASE[name] + g * (A[name] - BASE[name]) + wb * (B[name] - BASE[name])
        torch.testing.assert_close(s[name], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(m[name], (g * A[name] + 0.5 * B[name]) / (g + 0.5), rtol=0, atol=1e-5)


def test_without_weights_sum_and_mean_are_unchanged():
    got = tvlang.compile("out = mean(a, b)").evaluate({"a": A, "b": B})
    assert all(torch.equal(got[n], (A[n] + B[n]) / 2) for n in A)


@pytest.mark.parametrize("recipe, message", [
    ("out = mean(a, b, weights=[1])", "option 'weights' has 1 values for 2 inputs"),
    ("out = mean(a, b, weights=[1, -1])", "the weights sum to 0, and a weighted mean divides by their sum"),
])
def test_weights_that_cannot_work_are_errors_before_any_read(recipe, message):
    with pytest.raises(TvlangError, match=message):
        tvlang.compile(recipe).explain()


def test_per_tensor_weights_summing_to_zero_stop_at_that_tensor():
    plan = tvlang.compile("out = mean(a, b, weights=[layers(1, -1), 1])")  # 0 at layer 2 of 3
    with pytest.raises(TvlangError) as caught:
        plan.evaluate({"a": A, "b": B})
    assert caught.value.tensor == "model.layers.2.self_attn.q.weight"
    assert caught.value.message == "mean: the weights sum to 0, and a weighted mean divides by their sum"
