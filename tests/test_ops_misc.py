"""slerp, model_stock, select/pick/schedule, linear kernels, reducers, the registry."""

import math
import subprocess
import sys

import pytest
import torch

from tvlang.errors import TvlangError
from tvlang.language.builtins import BUILTINS, OPERATORS, resolve
from tvlang.ops.context import TensorContext
from tvlang.ops.reduce import CosReducer, DotReducer, NormReducer, mean, sum_
from tvlang.ops.registry import KERNELS
from tvlang.ops.select import count_layers, layer_index, pick, schedule, select
from tvlang.ops.slerp import slerp
from tvlang.ops.stock import model_stock

T = torch.tensor
C = TensorContext("w")


# -- slerp ----------------------------------------------------------------------------

def test_slerp_hand_computed():
    # angle pi/4, t = .5: both coefficients sin(pi/8)/sin(pi/4) = 0.5411961
    s = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    got = slerp([T([1.0, 0.0]), T([1.0, 1.0])], C, t=0.5)
    assert torch.allclose(got, T([2 * s, s]))
    got = slerp([T([1.0, 0.0]), T([0.0, 2.0])], C, t=0.5)
    assert torch.allclose(got, T([math.sqrt(0.5), 2 * math.sqrt(0.5)]))


def test_slerp_endpoints_and_fallbacks():
    a, b = T([1.0, 0.0, 2.0]), T([0.0, 1.0, -1.0])
    assert torch.allclose(slerp([a, b], C, t=0.0), a)
    assert torch.allclose(slerp([a, b], C, t=1.0), b)
    # colinear (cos = 1) and anti-parallel (cos = -1): linear interpolation
    assert torch.equal(slerp([T([1.0, 2.0]), T([3.0, 6.0])], C, t=0.25), T([1.5, 3.0]))
    assert torch.equal(slerp([T([1.0, 0.0]), T([-1.0, 0.0])], C, t=0.5), T([0.0, 0.0]))
    # a zero tensor has no direction: linear interpolation
    assert torch.equal(slerp([torch.zeros(2), T([2.0, 4.0])], C, t=0.5), T([1.0, 2.0]))


# -- model_stock ------------------------------------------------------------------------

def test_model_stock_three_models():
    base = T([0.0, 0.0])
    ms = [T([1.0, 0.0]), T([0.0, 1.0]), T([1.0, 1.0])]
    c = (0.0 + 2 * math.sqrt(0.5)) / 3  # mean pairwise cosine
    t = 3 * c / (1 + 2 * c)
    got = model_stock([base, *ms], C)
    assert torch.allclose(got, T([t * 2 / 3, t * 2 / 3]))


def test_model_stock_with_offset_base_and_negative_cos():
    base = T([1.0, 1.0])
    got = model_stock([base, T([2.0, 1.0]), T([1.0, 2.0])], C)  # orthogonal offsets: t = 0
    assert torch.equal(got, base)
    got = model_stock([base, T([2.0, 1.0]), T([0.0, 1.1])], C)  # cos < 0: clamped, t = 0
    assert torch.equal(got, base)
    same = model_stock([base, T([3.0, 1.0]), T([3.0, 1.0])], C)  # cos 1: t = 1, the average
    assert torch.equal(same, T([3.0, 1.0]))
    with pytest.raises(TvlangError, match="at least two"):
        model_stock([base, T([2.0, 1.0])], C)


# -- names ----------------------------------------------------------------------------

def test_layer_index_rule():
    assert layer_index("model.layers.7.mlp.up_proj.weight") == 7
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q.weight") == 2
    assert layer_index("bert.encoder.layer.11.output.dense.bias") == 11
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("layers.x.weight") is None
    assert count_layers(["a.layers.0.w", "a.layers.11.w", "lm_head.weight"]) == 12
    assert count_layers(["lm_head.weight"]) is None


def test_select_and_pick():
    x = T([1.0, -2.0])
    q = TensorContext("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(select([x], q, pattern="*.q_proj.*"), x)
    assert torch.equal(select([x], q, pattern="*.k_proj.* | *.q_proj.*"), x)
    assert torch.equal(select([x], q, pattern="*.k_proj.*"), torch.zeros(2))
    assert torch.equal(select([x], q, pattern="*.Q_PROJ.*"), torch.zeros(2))  # case-sensitive
    y = T([5.0, 6.0])
    assert torch.equal(pick([x, y], q, pattern="model.layers.0.*"), x)
    assert torch.equal(pick([x, y], q, pattern="model.layers.1.*"), y)
    out = pick([x, y], q, pattern="*")
    out.add_(1)
    assert torch.equal(x, T([1.0, -2.0]))  # a fresh tensor, never the input


def test_schedule():
    x = T([2.0, 4.0])
    def run(name, values, layers=5, **kw):
        return schedule([x], TensorContext(name, "cpu", {}, layers), values=values, **kw)
    assert torch.equal(run("m.layers.0.w", [0.0, 1.0]), T([0.0, 0.0]))
    assert torch.equal(run("m.layers.2.w", [0.0, 1.0]), T([1.0, 2.0]))  # halfway: .5
    assert torch.equal(run("m.layers.4.w", [0.0, 1.0]), x)
    assert torch.equal(run("m.layers.1.w", [1.0, 0.0, 1.0], layers=3), T([0.0, 0.0]))
    assert torch.equal(run("m.layers.3.w", [0.0, 1.0, 0.0], layers=5), T([1.0, 2.0]))  # pos 1.5 -> .5
    assert torch.equal(run("m.layers.3.w", [0.25]), T([0.5, 1.0]))
    assert torch.equal(run("m.embed.weight", [0.0, 1.0]), x)  # default 1
    assert torch.equal(run("m.embed.weight", [0.0, 1.0], default=0.5), T([1.0, 2.0]))
    with pytest.raises(TvlangError, match="number of layers is unknown"):
        run("m.layers.3.w", [0.0, 1.0], layers=None)


# -- linear kernels and reducers ----------------------------------------------------------

def test_mean_and_sum_kernels():
    a, b = T([1.0, 2.0]), T([3.0, -4.0])
    assert torch.equal(sum_([a, b], C), T([4.0, -2.0]))
    assert torch.equal(mean([a, b], C), T([2.0, -1.0]))
    assert torch.equal(a, T([1.0, 2.0]))
    assert KERNELS["mean"] is mean and KERNELS["sum"] is sum_


def _reduce(reducer, *tensor_lists):
    for p in range(reducer.passes):
        for i, tensors in enumerate(zip(*tensor_lists)):
            reducer.update(p, list(tensors), TensorContext(f"t{i}"))
        reducer.end_pass(p)
    return reducer.result()


def test_reducers():
    a = [T([3.0, 0.0]), T([[4.0]])]
    b = [T([1.0, 1.0]), T([[-2.0]])]
    assert _reduce(NormReducer(), a) == 5.0
    assert _reduce(DotReducer(), a, b) == 3.0 - 8.0
    assert math.isclose(_reduce(CosReducer(), a, b), -5.0 / (5.0 * math.sqrt(6.0)))
    assert _reduce(CosReducer(), a, [torch.zeros(2), torch.zeros(1, 1)]) == 0.0
    # float64 accumulation: products 1e8, 1, -1e8 sum to 0 in float32, to 1 in float64
    assert _reduce(DotReducer(), [T([1e4, 1.0, 1e4])], [T([1e4, 1.0, -1e4])]) == 1.0
    assert resolve(BUILTINS["norm"].kernel) is NormReducer


# -- registry ------------------------------------------------------------------------------

def test_operator_rows_have_docs_and_kernels():
    for row in OPERATORS:
        assert BUILTINS[row.name] is row
        assert row.summary and row.reference, row.name
        assert row.name in KERNELS
        assert callable(KERNELS[row.name])


def reductions(name, options, n_inputs):
    row = BUILTINS[name]
    return row.reductions(row.complete(options), n_inputs) if row.reductions else ()


def test_reductions_of_a_call():
    assert reductions("ties", {"density": 0.2}, 3) == ()
    assert reductions("dare", {"p": 0.5}, 1) == ()
    (found,) = reductions("topk", {"density": 0.5, "scope": "model"}, 1)
    assert (found.key, found.inputs) == ("threshold:0", (0,))
    reducer = resolve(found.reducer)(*found.args)
    assert reducer.passes == 2 and reducer.density == 0.5
    assert [r.key for r in reductions("ties", {"scope": "model", "density": 0.1}, 2)] == ["threshold:0", "threshold:1"]


def check_options(name, options, n_inputs):
    return BUILTINS[name].check_options(options, n_inputs)


def test_check_options_messages():
    check_options("ties", {"density": 0.2, "elect": "total"}, 2)
    with pytest.raises(TvlangError, match="dare: option 'p' must be in \\[0, 1\\], got 2"):
        check_options("dare", {"p": 2.0}, 1)
    with pytest.raises(TvlangError, match="option 'elect' must be one of 'total', 'frequency'"):
        check_options("ties", {"elect": "none"}, 2)
    check_options("della", {"elect": "none", "density": 0.5}, 2)
    with pytest.raises(TvlangError, match="the list of values is empty"):
        check_options("schedule", {"values": []}, 1)


def test_registry_import_does_not_load_torch():
    code = "import sys, tvlang.ops.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
