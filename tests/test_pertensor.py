"""Per-tensor values of a built-in's numbers: layers(...) and where(...) (tvlang.language.pertensor).

Checked like numbers (each value against the row's ranges), carried by the plan as one call,
and given to each kernel call as the values of the tensor it computes: the streamed result
(whole tensors and chunks) equals an eager loop that calls the kernels with each tensor's
values computed by hand.
"""

from __future__ import annotations

import pytest
import torch

import tvlang
from chunking import chunk_in
from tvlang.errors import TvlangError
from tvlang.ops.context import TensorContext
from tvlang.ops.slerp import slerp
from tvlang.ops.ties import ties

NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.2.mlp.up_proj.weight", "model.norm.weight"]


def models(count: int = 3):
    g = torch.Generator().manual_seed(5)
    shapes = {n: (4, 6) if "weight" in n and "norm" not in n else (6,) for n in NAMES}
    return [{n: torch.randn(shapes[n], generator=g) for n in NAMES} for _ in range(count)]


# By hand, for 3 layers (t = 0, 0.5, 1 at layers 0, 1, 2; t = 0 without a layer index):
# t = where("*mlp*", layers(0.2, 0.6, 1), 0.5)
SLERP_T = {
    "model.embed_tokens.weight": 0.5, "model.layers.0.self_attn.q_proj.weight": 0.5,
    "model.layers.0.mlp.up_proj.weight": 0.2, "model.layers.1.self_attn.q_proj.weight": 0.5,
    "model.layers.1.mlp.up_proj.weight": 0.6, "model.layers.2.mlp.up_proj.weight": 1.0, "model.norm.weight": 0.5,
}


def test_slerp_t_per_tensor_equals_one_slerp_per_tensor_with_its_value():
    base, ft = models(2)
    plan = tvlang.compile('slerp(base, ft, where("*mlp*", layers(0.2, 0.6, 1), 0.5))')
    out = plan.evaluate({"base": base, "ft": ft})
    for name in NAMES:
        want = slerp([base[name], ft[name]], TensorContext(name), t=SLERP_T[name])
        torch.testing.assert_close(out[name], want, rtol=0, atol=0, msg=name)
    # One call per tensor, with the per-tensor value as its option: no branch per value.
    calls = [line for line in plan.explain().splitlines() if line.startswith("  ") and "= slerp(" in line]
    assert calls == ['  b1 = slerp(b0, b1, t=where("*mlp*", layers(0.2, 0.6, 1), 0.5))']


def test_a_layer_gradient_sits_at_t_zero_for_tensors_without_a_layer():
    base, ft = models(2)
    out = tvlang.compile("slerp(base, ft, layers(0.25, 1))").evaluate({"base": base, "ft": ft})
    for name, t in (("model.norm.weight", 0.25), ("model.layers.1.mlp.up_proj.weight", 0.625),
                    ("model.layers.2.mlp.up_proj.weight", 1.0)):
        torch.testing.assert_close(out[name], slerp([base[name], ft[name]], TensorContext(name), t=t), msg=name)




@pytest.mark.parametrize("chunked", [False, True])
def test_ties_density_and_weights_per_tensor_streamed_equal_eager(chunked, monkeypatch):
    base, a, b = models(3)
    recipe = ('base + ties(a - base, b - base, density=layers(0.2, 0.9), '
              'weights=[1, where("*self_attn*", 0.25, layers(0, 2))], merge="weighted_mean")')
    ran_in_chunks = chunk_in(monkeypatch, minimum=6, elements=5) if chunked else []
    out = tvlang.compile(recipe).evaluate({"base": base, "a": a, "b": b})
    if chunked:
        assert ran_in_chunks == NAMES
    for name in NAMES:
        layer = {"0": 0, "1": 1, "2": 2}.get(name.split(".")[2]) if ".layers." in name else None
        t = 0.0 if layer is None else layer / 2
        density = 0.2 + t * 0.7
        weight = 0.25 if "self_attn" in name else 2 * t
        ctx = TensorContext(name)
        want = base[name] + ties([a[name] - base[name], b[name] - base[name]], ctx, density=density,
                                 weights=[1.0, weight], merge="weighted_mean")
        torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-6, msg=name)


def test_values_are_checked_leaf_by_leaf_before_any_read():
    with pytest.raises(TvlangError, match=r"ties: option 'density' must be in \[0, 1\], got 1.5"):
        tvlang.compile("ties(a - p, b - p, density=layers(0.2, 1.5))")
    with pytest.raises(TvlangError, match=r"multislerp: option 'weights' has 3 values for 2 inputs"):
        tvlang.compile('multislerp(a, b, weights=[1, where("*mlp*", 1, 2), 3])')
    with pytest.raises(TvlangError, match=r"where\(\) takes a glob and two values"):
        tvlang.compile('slerp(a, b, where("", 1, 2))')
    with pytest.raises(TvlangError, match=r"where\(\) takes a glob and two values"):
        tvlang.compile("slerp(a, b, where(1, 2))")
    with pytest.raises(TvlangError, match=r"layers\(\) needs at least one value"):
        tvlang.compile("slerp(a, b, layers())")
    with pytest.raises(TvlangError, match=r"a value of layers\(\) in argument 't' of slerp\(\) must be a number"):
        tvlang.compile('slerp(a, b, layers(0, "x"))')
    with pytest.raises(TvlangError, match="whole-model thresholds"):
        tvlang.compile('ties(a - p, b - p, density=layers(0.2, 0.5), scope="model")')
    with pytest.raises(TvlangError, match="unknown function 'layers'"):
        tvlang.compile("out = a + layers(1, 2)*(b - a)")


def test_a_param_inside_a_per_tensor_value_takes_its_override():
    base, ft = models(2)
    plan = tvlang.compile('param hi = 1\nout = slerp(base, ft, layers(0, hi))\n', hi=0.5)
    out = plan.evaluate({"base": base, "ft": ft})
    name = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(out[name], slerp([base[name], ft[name]], TensorContext(name), t=0.5))


def test_a_value_a_kernel_refuses_names_the_tensor():
    base, ft = models(2)
    plan = tvlang.compile("karcher(base, ft, max_iter=layers(1, 2))")
    with pytest.raises(TvlangError, match="karcher: option 'max_iter' must be an integer, got 1.5") as caught:
        plan.evaluate({"base": base, "ft": ft})
    assert caught.value.tensor == "model.layers.1.self_attn.q_proj.weight"
