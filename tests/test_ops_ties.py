"""ties / dare_ties / della merge semantics on hand-computed tensors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvlang.errors import TvlangError
from tvlang.ops.context import TensorContext
from tvlang.ops.della import della
from tvlang.ops.ties import dare_ties, sign_merge, ties

T = torch.tensor


def ctx(name="model.layers.0.mlp.weight", **reduced):
    return TensorContext(name, "cpu", dict(reduced))


def run(inputs, **options):
    return ties([T(x) for x in inputs], ctx(), **options)


# a, b, c at density 1 (no trimming):
#   entry 0:  1, -4,  2   total -1 -> '-' : {-4}        frequency ++- -> '+' : {1, 2}
#   entry 1: -2, -1, -3   '-' : all three
#   entry 2:  3,  1,  2   '+' : all three
#   entry 3: .5,  0, -1   total -.5 -> '-' : {-1}       frequency 1+0-1 = 0 -> '+' : {.5}
A = [1.0, -2.0, 3.0, 0.5]
B = [-4.0, -1.0, 1.0, 0.0]
C = [2.0, -3.0, 2.0, -1.0]


@pytest.mark.parametrize(
    "elect, merge, expected",
    [
        ("total", "mean", [-4.0, -2.0, 2.0, -1.0]),
        ("total", "sum", [-4.0, -6.0, 6.0, -1.0]),
        ("frequency", "mean", [1.5, -2.0, 2.0, 0.5]),
        ("frequency", "sum", [3.0, -6.0, 6.0, 0.5]),
        ("total", "weighted_mean", [-4.0, -2.0, 2.0, -1.0]),  # weights all 1: same as mean
    ],
)
def test_election_and_merge_without_trimming(elect, merge, expected):
    assert torch.equal(run([A, B, C], density=1.0, elect=elect, merge=merge), T(expected))


def test_trim_then_elect():
    # density 0.5 of 4 entries keeps 2 per input:
    #   a [4,-1,2,-3] -> [4,0,0,-3];  b [-2,1,5,.5] -> [-2,0,5,0];  c [1,-6,-1,2] -> [0,-6,0,2]
    a, b, c = [4.0, -1.0, 2.0, -3.0], [-2.0, 1.0, 5.0, 0.5], [1.0, -6.0, -1.0, 2.0]
    assert torch.equal(run([a, b, c], density=0.5), T([4.0, -6.0, 5.0, -3.0]))
    # frequency: entry 0 has one + and one - -> '+' (4); entry 3: -3 and 2 -> '+' (2)
    assert torch.equal(run([a, b, c], density=0.5, elect="frequency"), T([4.0, -6.0, 5.0, 2.0]))


def test_weights_mergekit_style():
    # v = w*x: [1,-2,3,.5], [-8,-2,2,0], [1,-1.5,1,-.5]; elected on v
    w = [1.0, 2.0, 0.5]
    got_sum = run([A, B, C], density=1.0, weights=w, merge="sum")
    assert torch.equal(got_sum, T([-8.0, -5.5, 6.0, 0.5]))
    got = run([A, B, C], density=1.0, weights=w, merge="weighted_mean")
    assert torch.allclose(got, T([-8.0 / 2.0, -5.5 / 3.5, 6.0 / 3.5, 0.5 / 1.0]))
    got = run([A, B, C], density=1.0, weights=w, merge="mean")
    assert torch.allclose(got, T([-8.0, -5.5 / 3, 2.0, 0.5]))


def test_weights_peft_style_elects_on_unweighted_values():
    # elected on x: entry 3 is .5+0-1 < 0 -> '-' : {c}, value w_c * -1 = -.5
    w = [1.0, 2.0, 0.5]
    got = run([A, B, C], density=1.0, weights=w, elect_on="unweighted", merge="mean")
    assert torch.allclose(got, T([-8.0, -5.5 / 3, 2.0, -0.5]))


def test_negative_weight_and_zero_divisor():
    # weights [-1, 1]: v = [-1,-2], [1,-3]; entry 0: total 0 -> '+' : {1}; entry 1: '-' : both
    got = ties([T([1.0, 2.0]), T([1.0, -3.0])], ctx(), density=1.0, weights=[-1.0, 1.0], merge="sum")
    assert torch.equal(got, T([1.0, -5.0]))
    # weighted_mean: entry 1 divides by -1 + 1 = 0 -> replaced by 1 (mergekit)
    got = ties([T([1.0, 2.0]), T([1.0, -3.0])], ctx(), density=1.0, weights=[-1.0, 1.0], merge="weighted_mean")
    assert torch.equal(got, T([1.0, -5.0]))


def test_zero_weight_neither_votes_nor_counts():
    got = ties([T([5.0]), T([-1.0])], ctx(), density=1.0, weights=[0.0, 1.0])
    assert torch.equal(got, T([-1.0]))


def test_elected_sign_zero_picks_plus():
    assert torch.equal(run([[1.0], [-1.0]], density=1.0), T([1.0]))
    assert torch.equal(run([[2.0, -3.0], [-2.0, 3.0]], density=1.0, elect="frequency"), T([2.0, 3.0]))


def test_weighted_sign_tally_rounds_each_term():
    """Weighted terms that cancel exactly once each is rounded (0.3*d1 == -0.6*d2 in float32:
    0.6f is 2*0.3f) sum to 0 and elect +, as mergekit's sum of rounded products does. A fused
    multiply-add (add_(p, alpha=0.6)) leaves the first product's rounding error instead."""
    d1 = 2.0**-7 * 1.125  # a bfloat16 task vector entry
    d2 = -d1 / 2
    terms = torch.tensor([0.3], dtype=torch.float32) * d1 + torch.tensor([0.6], dtype=torch.float32) * d2
    assert float(terms) == 0.0  # the rounded products cancel
    for parts, w in (([d1, d2], [0.3, 0.6]), ([d2, d1], [0.6, 0.3])):
        got = run([[parts[0]], [parts[1]]], density=1.0, weights=w, merge="weighted_mean")
        assert float(got) == pytest.approx(d1, rel=1e-6)  # + elected: d1's input alone


def test_ties_at_the_threshold_are_broken_by_position():
    # density .25 of 4 keeps k=1; -2 and 2 tie for the largest magnitude: the first stays
    assert torch.equal(run([[1.0, -2.0, 2.0, 0.5]], density=0.25), T([0.0, -2.0, 0.0, 0.0]))


def test_density_zero_and_one():
    assert torch.equal(run([A, B], density=0.0), T([0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(run([A], density=1.0), T(A))


def test_all_zero_and_one_element_tensors():
    assert torch.equal(run([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], density=0.5), T([0.0, 0.0, 0.0]))
    assert torch.equal(run([[2.0], [-3.0]], density=1.0), T([-3.0]))
    # floor(0.5 * 1) = 0 entries kept: a one-element tensor is trimmed away below density 1
    assert torch.equal(run([[2.0], [-3.0]], density=0.5), T([0.0]))


def test_inputs_are_not_modified_and_shape_is_kept():
    a = torch.randn(3, 5)
    b = torch.randn(3, 5)
    a0, b0 = a.clone(), b.clone()
    out = ties([a, b], ctx(), density=0.4)
    assert out.shape == (3, 5)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_non_contiguous_input():
    a = torch.randn(4, 6)
    b = torch.randn(6, 4).t()
    got = ties([a, b], ctx(), density=0.5)
    want = ties([a, b.contiguous()], ctx(), density=0.5)
    assert torch.equal(got, want)


def test_model_scope_reads_the_threshold():
    a, b = T([1.0, -2.0, 3.0]), T([-4.0, 0.5, 0.25])
    got = ties([a, b], ctx(**{"threshold:0": 2.0, "threshold:1": 0.5}), density=0.3, scope="model")
    # a -> [0,-2,3], b -> [-4,.5,0]; entry 0 '-' -4, entry 1 -1.5 '-' -> -2, entry 2 -> 3
    assert torch.equal(got, T([-4.0, -2.0, 3.0]))
    with pytest.raises(TvlangError, match="threshold:0"):
        ties([a, b], ctx(), density=0.3, scope="model")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"density": 1.5}, "option 'density' must be in \\[0, 1\\], got 1.5"),
        ({"weights": [1.0]}, "option 'weights' has 1 values for 2 inputs"),
        ({"merge": "median"}, "option 'merge' must be one of"),
    ],
)
def test_option_errors_name_the_tensor(options, message):
    with pytest.raises(TvlangError, match=message) as info:
        ties([T([1.0]), T([2.0])], ctx("x.weight"), **options)
    assert info.value.tensor == "x.weight"


def test_sign_merge_elect_none():
    parts = [T([1.0, -2.0]), T([3.0, 1.0])]
    out = torch.empty(2)
    plain = dict(elect="none", weights=(), elect_on="weighted", out=out)
    assert torch.equal(sign_merge(parts, merge="sum", **plain), T([4.0, -1.0]))
    assert torch.equal(sign_merge(parts, merge="mean", **plain), T([2.0, -0.5]))
    got = sign_merge(parts, elect="none", merge="weighted_mean", weights=[1.0, 3.0], elect_on="weighted", out=out)
    assert torch.equal(got, T([10.0 / 4.0, 1.0 / 4.0]))


@pytest.mark.parametrize("merge", ["sum", "mean", "weighted_mean"])
@pytest.mark.parametrize("weights", [(), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (-1.0, 1.0, 1.0)])
def test_sign_merge_sums_start_from_zero(merge, weights):
    """Every sum starts from +0 (0 + (-0) == +0): entries whose parts are all zeros, of either
    sign, come out +0, whatever the weights; the others as computed by hand."""
    parts = [T([-0.0, -0.0, 2.0, -0.0]), T([-0.0, 0.0, -1.0, 3.0]), T([-0.0, -0.0, 4.0, -0.0])]
    out = sign_merge(parts, elect="total", merge=merge, weights=weights, elect_on="weighted", out=torch.empty(4))
    assert not torch.signbit(out[:2]).any()
    w = list(weights) or [1.0, 1.0, 1.0]
    values = [wi * p for wi, p in zip(w, parts)]
    for j in (2, 3):
        elected = 1.0 if sum(float(v[j]) for v in values) >= 0 else -1.0
        agree = [i for i in range(3) if float(values[i][j]) * elected > 0]
        total = sum(float(values[i][j]) for i in agree)
        divisor = {"sum": 1.0, "mean": max(len(agree), 1.0), "weighted_mean": sum(w[i] for i in agree) or 1.0}[merge]
        assert float(out[j]) == float(T(total) / T(divisor))  # float32, as the kernel divides


def test_dare_ties_is_dare_then_election():
    a, b = torch.randn(50), torch.randn(50)
    c = ctx("w")
    got = dare_ties([a, b], c, p=0.5, seed=3)
    # one bit generator, input a's 50 words (25 draws of 64 bits) then b's
    import numpy

    words = c.bits(3).random_raw(50).view(numpy.uint32).astype(numpy.int64)
    keep_a = torch.tensor(words[:50] >= 2**31)
    keep_b = torch.tensor(words[50:] >= 2**31)
    da, db = torch.where(keep_a, a * 2.0, 0.0), torch.where(keep_b, b * 2.0, 0.0)
    want = ties([da, db], c, density=1.0)
    assert torch.allclose(got, want)
    # p = 0 is plain election and merge; p = 1 gives zeros
    assert torch.equal(dare_ties([a, b], c, p=0.0), ties([a, b], c, density=1.0))
    assert torch.equal(dare_ties([a, b], c, p=1.0), torch.zeros(50))


def test_della_linear_and_lambda():
    a, b = T([1.0, -2.0, 4.0]), T([3.0, 1.0, -1.0])
    got = della([a, b], ctx(), density=1.0, elect="none", merge="sum", **{"lambda": 2.0})
    assert torch.equal(got, T([8.0, -2.0, 6.0]))
    got = della([a, b], ctx(), density=1.0, **{"lambda": 0.5})  # ties election, mean, halved
    assert torch.equal(got, T([1.0, -1.0, 2.0]))
    assert torch.equal(della([a, b], ctx(), density=0.0), torch.zeros(3))


def test_della_rejects_bad_epsilon():
    with pytest.raises(TvlangError, match="density - epsilon must be > 0"):
        della([T([1.0])], ctx(), density=0.1, epsilon=0.15)


# -- a naive reference, written straight from docs/operators.md --------------------------

def _reference_ties(xs, density, elect, merge, weights, elect_on):
    m = len(xs)
    w = weights or [1.0] * m
    trimmed = []
    for x in xs:
        n = x.numel()
        k = int(density * n + 1e-9)
        if k == 0:
            trimmed.append(torch.zeros_like(x))
            continue
        # exactly k: a stable descending sort ranks equal magnitudes by position
        keep = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices[:k]
        mask = torch.zeros(n)
        mask[keep] = 1.0
        trimmed.append(x * mask.view(x.shape))
    p = torch.stack(trimmed).double()
    wt = torch.tensor(w, dtype=torch.float64).view(-1, *([1] * xs[0].dim()))
    v = p * wt
    e = v if elect_on == "weighted" else p
    score = e.sum(0) if elect == "total" else torch.sign(e).sum(0)
    s = torch.where(score >= 0, 1.0, -1.0).double()
    agree = (torch.sign(e) == s).double()
    total = (v * agree).sum(0)
    if merge == "sum":
        return total
    if merge == "mean":
        return total / agree.sum(0).clamp(min=1)
    div = (wt * agree).sum(0)
    return total / torch.where(div == 0, torch.ones_like(div), div)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 4),
    n=st.integers(1, 12),
    density=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]),
    elect=st.sampled_from(["total", "frequency"]),
    merge=st.sampled_from(["mean", "sum", "weighted_mean"]),
    elect_on=st.sampled_from(["weighted", "unweighted"]),
)
def test_ties_matches_the_naive_reference(data, m, n, density, elect, merge, elect_on):
    values = st.integers(-4, 4).map(float)  # small integers: many ties and zeros
    xs = [torch.tensor(data.draw(st.lists(values, min_size=n, max_size=n))) for _ in range(m)]
    some_weights = st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0]), min_size=m, max_size=m)
    weights = data.draw(st.one_of(st.just([]), some_weights))
    got = ties(xs, ctx(), density=density, elect=elect, merge=merge, weights=weights, elect_on=elect_on)
    want = _reference_ties(xs, density, elect, merge, weights, elect_on)
    assert torch.allclose(got.double(), want, atol=1e-6), (got, want)


def test_results_do_not_depend_on_the_workspace(monkeypatch):
    from tvlang.ops import common

    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(40, 30, generator=g) for _ in range(3)]
    cached = ties(xs, ctx(), density=0.3, elect="frequency")
    monkeypatch.setattr(common, "SCRATCH_LIMIT_BYTES", 64)  # every temporary fresh
    assert torch.equal(ties(xs, ctx(), density=0.3, elect="frequency"), cached)
    common.clear_workspace()
    monkeypatch.undo()
    assert torch.equal(ties(xs, ctx(), density=0.3, elect="frequency"), cached)
