"""sce, ram, ramplus_tl, arcee_fusion, dare_linear, della_linear and rescale_by="l1":
hand-computed cases, mergekit 0.1.5's own merge methods called on the same tensors, and the
streamed recipe against a naive eager computation."""

import math

import pytest
import torch

import tvlang
from tvlang.errors import TvlangError
from tvlang.ops import sce as sce_module
from tvlang.ops.context import TensorContext
from tvlang.ops.dare import dare
from tvlang.ops.della import della, della_linear
from tvlang.ops.fusion import arcee_fusion
from tvlang.ops.ram import ram, ramplus_tl
from tvlang.ops.sce import sce, variance
from tvlang.ops.ties import dare_linear, dare_ties


def T(values):
    return torch.tensor(values, dtype=torch.float32)


def ctx(name="w"):
    return TensorContext(name)


# -- hand-computed ----------------------------------------------------------------------

def test_sce_hand_computed():
    a, b = T([1.0, -2.0, 0.0, 4.0]), T([3.0, 2.0, -1.0, 4.0])
    # weights: mean squares 21/4 and 30/4 -> 21/51, 30/51
    wa, wb = 21 / 51, 30 / 51
    want = T([(wa * 1 + wb * 3) / (wa + wb), 2.0, -1.0, 4.0])
    assert torch.allclose(sce([a, b], ctx()), want, atol=1e-6)
    # select_topk 0.5: variances 1, 4, 0.25, 0 -> 3 nonzero, k = floor(1.5) = 1: only entry 1
    got = sce([a, b], ctx(), select_topk=0.5)
    # entry 1: -2 vs 2, sum 0 elects +; only b agrees
    assert torch.allclose(got, T([0.0, 2.0, 0.0, 0.0]), atol=1e-6)
    # ties in the variance: the earlier entry is selected
    x, y = T([1.0, 1.0, 0.0]), T([-1.0, -1.0, 0.0])
    assert torch.equal(sce([x, y], ctx(), select_topk=0.5), T([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float64", "specials"])
def test_sce_variance_is_torch_var_bit_for_bit(monkeypatch, m, kind):
    """sce ranks entries by their variance across the inputs, as mergekit does with torch.var:
    variance() (Welford in float64, block by block) gives the same bits, at block ends too."""
    monkeypatch.setattr(sce_module, "_BLOCK", 1000)
    g = torch.Generator().manual_seed(m)
    tvs = torch.randn(m, 37, 101, generator=g) * 0.01
    if kind == "bfloat16":
        tvs = tvs.bfloat16().float()  # many equal values and exact cancellations
    elif kind == "float64":
        tvs = tvs.double()
    elif kind == "specials":
        tvs[:, 0, :4] = torch.tensor([0.0, -0.0, 1e30, -1e-30])
        tvs[0, 1, :3] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    got = variance(tvs)
    expected = torch.var(tvs, dim=0, unbiased=False)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    assert torch.equal(got.isnan(), expected.isnan())


SCE_CHUNKED = [
    "sce(a - pre, b - pre, c - pre, select_topk=0.3)",
    'sce(a - pre, b - pre, select_topk=0.5, count="mergekit")',
    "sce(a - pre, b - pre, c - pre)",  # select_topk 1: no selection, the squares' pass only
    "sce(a - pre, b - pre, select_topk=0.0)",
    "pre + sce(a - pre, 2*(b - pre), select_topk=0.01)",
]


@pytest.mark.parametrize("inputs", ["float32", "bfloat16"])
@pytest.mark.parametrize("recipe", SCE_CHUNKED)
def test_sce_chunks_equal_the_whole_kernel(monkeypatch, recipe, inputs):
    """sce in chunks (a radix select of the variances, the squares' block sums, then the merge)
    equals the whole-tensor kernel bit for bit, with chunk ends inside rows and, on bf16 values
    (quarter steps), many variances tied at the threshold."""
    from chunking import chunk_in

    g = torch.Generator().manual_seed(7)
    shapes = {"w": (413, 97), "v": (5000,)}
    binds = {}
    for name in ("pre", "a", "b", "c"):
        m = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        if inputs == "bfloat16":
            m = {k: torch.round(t * 4) / 4 for k, t in m.items()}
        binds[name] = m
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    names = chunk_in(monkeypatch, 10007)
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    assert "w" in names
    for k in shapes:
        assert torch.equal(chunked[k], whole[k]), k


def test_sce_chunks_select_exactly_k_entries():
    """Exactly k entries are selected (the tied ones first by position), against a naive sort."""
    from tvlang.ops.sce import SceChunks

    g = torch.Generator().manual_seed(3)
    xs = [torch.round(torch.randn(3001, generator=g) * 2) / 2 for _ in range(3)]
    form = SceChunks(3, 3001, 0.2, "floor")
    cuts = [0, 1000, 1999, 3001]
    for p in range(form.passes):
        for lo, hi in zip(cuts, cuts[1:]):
            form.observe(p, [x[lo:hi] for x in xs])
        form.end_pass(p)
    form.restart()
    var = torch.var(torch.stack(xs), dim=0, unbiased=False)
    from tvlang.ops.common import keep_count

    k = keep_count(0.2, int(torch.count_nonzero(var)))
    kth = float(var.sort(descending=True).values[k - 1])
    assert int((var > kth).sum()) < k < int((var >= kth).sum())  # the k-th is tied: some tied entries left out
    order = sorted(range(3001), key=lambda i: (-float(var[i]), i))  # largest first, ties by position
    expected = torch.zeros(3001, dtype=torch.bool)
    expected[order[:k]] = True
    got = torch.cat([form._selected(torch.stack([x[lo:hi] for x in xs]))[0] != 0 for lo, hi in zip(cuts, cuts[1:])])
    assert torch.equal(got, expected & (xs[0] != 0))


def test_sce_edge_cases():
    z = torch.zeros(3)
    assert torch.equal(sce([z, z], ctx(), select_topk=0.5), z)
    one = T([1e-4, -1e-4])  # mean square 1e-8 < 1e-6: uniform weights
    assert torch.allclose(sce([one, 2 * one], ctx()), T([1.5e-4, -1.5e-4]))
    assert torch.equal(sce([T([1.0, 2.0])], ctx(), select_topk=0.5), torch.zeros(2))  # one input: no variance


def test_ram_hand_computed():
    a, b, c = T([1.0, 2.0, 0.0, 1e-6]), T([3.0, 0.0, 0.0, 5.0]), T([2.0, 0.0, 0.0, 0.0])
    assert torch.equal(ram([a, b, c], ctx()), T([2.0, 2.0, 0.0, 5.0]))
    assert torch.equal(ram([a, b, c], ctx(), epsilon=1.5), T([2.5, 2.0, 0.0, 5.0]))


def test_ramplus_hand_computed():
    a, b = T([1.0, 2.0, 0.0, 0.0]), T([3.0, 0.0, 0.0, 4.0])
    # a: shared 1, unique 1 -> rho 1, clamped to alpha .2 -> 1 + .5*.2; b the same
    assert torch.allclose(ramplus_tl([a, b], ctx(), r=0.5), T([2.0, 2.2, 0.0, 4.4]))
    # an input with no unique entry: rho = shared/epsilon, capped at alpha; nothing to boost
    assert torch.allclose(ramplus_tl([a, a], ctx(), r=0.5, alpha=3.0), a)
    # no shared entries: rho 0, no boost (ram)
    assert torch.equal(ramplus_tl([T([1.0, 0.0]), T([0.0, 2.0])], ctx()), T([1.0, 2.0]))
    # epsilon 0 and an input that contributes nowhere (0 shared / 0 unique): its factor is 1, not
    # a division by zero (mergekit's 0/0 makes the whole tensor NaN there); the others as ram
    z = T([0.0, 0.0, 0.0, 0.0])
    assert torch.equal(ramplus_tl([a, b, z], ctx(), r=0.5, epsilon=0.0), T([2.0, 2.2, 0.0, 4.4]))


def test_arcee_fusion_hand_computed():
    base = torch.zeros(2, 4)
    model = T([[0.1, 0.1, 0.1, 3.0], [0.0, 0.2, 0.0, 0.0]])
    got = arcee_fusion([base, model], ctx())
    p = torch.softmax(model, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    scores = model.abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = scores.reshape(-1).sort().values  # n = 8: indices 1, 3, 5
    fence = ordered[3] + 1.5 * (ordered[5] - ordered[1])
    assert torch.equal(got, torch.where(scores >= fence, model, base))
    assert torch.equal(got, T([[0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(arcee_fusion([model, model], ctx()), model)  # no change: importance 0 >= 0


def test_dare_l1_rescale_keeps_the_l1_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 50, generator=g)
    got = dare([x], ctx(), p=0.7, rescale_by="l1")
    plain = dare([x], ctx(), p=0.7, rescale=False)
    assert torch.equal(got != 0, plain != 0)  # the same mask
    assert math.isclose(float(got.abs().sum()), float(x.abs().sum()), rel_tol=1e-6)
    assert torch.allclose(got, plain * (x.abs().sum() / plain.abs().sum()), rtol=1e-6)
    assert torch.equal(dare([x], ctx(), p=0.7, rescale=False, rescale_by="l1"), plain)
    assert torch.equal(dare([torch.zeros(5)], ctx(), p=0.5, rescale_by="l1"), torch.zeros(5))
    # a tensor whose every entry is dropped stays zero (mergekit: below 1e-7, no scaling)
    assert torch.equal(dare([x], ctx(), p=1.0, rescale_by="l1"), torch.zeros_like(x))


def test_della_l1_rescale_keeps_the_l1_norm():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 30, generator=g)
    got = della([x], ctx(), density=0.5, rescale_by="l1", elect="none", merge="sum")
    assert math.isclose(float(got.abs().sum()), float(x.abs().sum()), rel_tol=1e-6)


def test_dare_linear_and_della_linear_are_the_named_forms():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, generator=g), torch.randn(30, generator=g)
    # one stream for both inputs, as dare_ties: the first input is dropped as dare drops it,
    # the second from where the first's words end; then the plain sum
    z = torch.zeros(30)
    first = dare_linear([a, z], ctx(), p=0.5, seed=3)
    second = dare_linear([z, b], ctx(), p=0.5, seed=3)
    assert torch.equal(first, dare([a], ctx(), p=0.5, seed=3))
    assert not torch.equal(second != 0, first != 0)
    assert torch.allclose(dare_linear([a, b], ctx(), p=0.5, seed=3), first + second)
    assert torch.equal(dare_ties([a, z], ctx(), p=0.5, seed=3, merge="sum"), first)
    got = dare_linear([a, b], ctx(), p=0.0, weights=[0.25, 0.5])
    assert torch.allclose(got, 0.25 * a + 0.5 * b)
    assert torch.allclose(dare_linear([a, b], ctx(), p=0.0, weights=[0.25, 0.5], merge="weighted_mean"),
                          (0.25 * a + 0.5 * b) / 0.75)
    assert torch.equal(della_linear([a, b], ctx(), density=0.6, seed=4, weights=[0.3, 0.7]),
                       della([a, b], ctx(), density=0.6, seed=4, weights=[0.3, 0.7], elect="none", merge="sum"))


def test_bad_options_name_the_operator():
    with pytest.raises(TvlangError, match="dare: option 'rescale_by' must be one of"):
        dare([T([1.0])], ctx(), p=0.5, rescale_by="l2")
    with pytest.raises(TvlangError, match="sce: option 'select_topk' must be in"):
        sce([T([1.0])], ctx(), select_topk=1.5)
    with pytest.raises(TvlangError, match="arcee_fusion"):
        tvlang.compile("arcee_fusion(a, b - a)")


# -- mergekit 0.1.5's own methods on the same tensors ------------------------------------

mk_base = pytest.importorskip("mergekit.merge_methods.base")


def _mk(method, tensors, **parameters):
    group = mk_base.TensorGroup.from_tensors(tensors, base_index=0)
    return method([group], parameters=parameters)[0]


def _models(seed, shape=(24, 40), n=3, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + torch.randn(shape, generator=g) * scale for _ in range(n)]


@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.25, 0.0])
@pytest.mark.parametrize("shape", [(24, 40), (50,)])
def test_sce_matches_mergekit(select_topk, shape):
    from mergekit.merge_methods.sce import sce_merge

    models = _models(5, shape)
    base = models[0]
    want = _mk(sce_merge, models, select_topk=select_topk)
    got = base + sce([m - base for m in models[1:]], ctx(), select_topk=select_topk, count="mergekit")
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("epsilon", [1e-5, 0.01])
def test_ram_and_ramplus_match_mergekit(epsilon):
    from mergekit.merge_methods.ram import ram_merge, ramplus_tl_merge

    models = _models(6)
    base = models[0]
    # sparse task vectors, so that unique, shared and empty entries all occur
    g = torch.Generator().manual_seed(7)
    models = [base] + [base + (m - base) * (torch.rand(base.shape, generator=g) < 0.4) for m in models[1:]]
    deltas = [m - base for m in models[1:]]
    want = _mk(ram_merge, models, epsilon=epsilon)
    assert torch.allclose(base + ram(deltas, ctx(), epsilon=epsilon), want, atol=1e-6, rtol=0)
    for r, alpha in ((0.1, 0.2), (0.5, 2.0)):
        want = _mk(ramplus_tl_merge, models, r=r, alpha=alpha, epsilon=epsilon)
        got = base + ramplus_tl(deltas, ctx(), r=r, alpha=alpha, epsilon=epsilon)
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(24, 40), (64,), (7, 3, 5)])
def test_arcee_fusion_matches_mergekit(shape):
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method

    base, model = _models(8, shape, n=1, scale=0.3)
    want = _mk(arcee_fusion_merge_method, [base, model])
    got = arcee_fusion([base, model], ctx())
    assert torch.equal(got, want)
    assert 0 < int(torch.count_nonzero(got - base)) < base.numel()


def test_dare_l1_statistics_match_mergekit():
    """Random masks differ (mergekit draws from torch's global generator): the kept fraction and
    the L1 norm after rescaling agree."""
    from mergekit.merge_methods import registry

    models = _models(9, (64, 64), n=1, scale=0.05)
    base, ft = models
    torch.manual_seed(0)
    want = _mk(registry.get("dare_linear"), models, weight={1: 1.0}, density={1: 0.3}) - base
    got = dare_linear([ft - base], ctx(), p=0.7, rescale_by="l1")
    delta_l1 = float((ft - base).abs().sum())
    assert math.isclose(float(want.abs().sum()), delta_l1, rel_tol=1e-4)
    assert math.isclose(float(got.abs().sum()), delta_l1, rel_tol=1e-5)
    kept_mk, kept_tv = float((want != 0).float().mean()), float((got != 0).float().mean())
    assert abs(kept_mk - 0.3) < 0.03 and abs(kept_tv - 0.3) < 0.03


# -- the streamed recipe against a naive eager computation --------------------------------

def _state_dicts():
    g = torch.Generator().manual_seed(12)
    shapes = {"model.embed.weight": (30, 20), "model.layers.0.mlp.weight": (17, 13), "model.norm.weight": (9,)}
    pre = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    out = {"pre": pre}
    for key in "abc":
        out[key] = {n: pre[n] + torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}
    return out


def _naive_sce(deltas, select_topk):
    tvs = torch.stack(deltas).double()
    if select_topk < 1:
        var = tvs.var(0, unbiased=False).reshape(-1)
        k = math.floor(select_topk * int((var != 0).sum()) + 1e-9)
        mask = torch.zeros_like(var)
        mask[torch.sort(var, descending=True, stable=True).indices[:k]] = 1
        tvs = tvs * mask.view(tvs.shape[1:])
    w = torch.stack([(tv ** 2).mean() for tv in tvs])
    w = torch.full_like(w, 1 / len(w)) if w.sum() < 1e-6 else w / w.sum()
    s = torch.where(tvs.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(tvs) == s).double()
    ww = w.view(-1, *[1] * (tvs.dim() - 1)) * agree
    return ((tvs * ww).sum(0) / ww.sum(0).clamp(min=1e-6)).float()


@pytest.mark.parametrize("recipe,naive", [
    ("pre + sce(a - pre, b - pre, c - pre, select_topk=0.3)",
     lambda d, p: p + _naive_sce(d, 0.3)),
    ("pre + ram(a - pre, b - pre, c - pre, epsilon=0.03)",
     lambda d, p: p + sum(x * (x.abs() > 0.03) for x in d) / sum((x.abs() > 0.03).float() for x in d).clamp(min=1)),
    ("arcee_fusion(pre, a)", None),
])
def test_streamed_equals_naive(recipe, naive):
    binds = _state_dicts()
    got = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    for name, pre in binds["pre"].items():
        deltas = [binds[k][name] - pre for k in "abc"]
        if naive is None:
            a = binds["a"][name]
            want = arcee_fusion([pre, a], ctx(name))
        else:
            want = naive(deltas, pre)
        assert torch.allclose(got[name], want, atol=1e-6, rtol=0), name


def test_ramplus_streamed_equals_the_kernel():
    binds = _state_dicts()
    got = tvlang.compile("pre + ramplus_tl(a - pre, b - pre, r=0.3, epsilon=0.04)").evaluate(binds, allow_unused=True)
    for name, pre in binds["pre"].items():
        want = pre + ramplus_tl([binds[k][name] - pre for k in "ab"], ctx(name), r=0.3, epsilon=0.04)
        assert torch.allclose(got[name], want, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("recipe", [
    "pre + dare_linear(a - pre, b - pre, p=0.5, seed=2, weights=[0.3, 0.6])",
    'pre + dare_linear(a - pre, b - pre, p=0.5, rescale_by="l1")',
    'pre + dare_ties(a - pre, b - pre, c - pre, p=0.3, rescale_by="l1", merge="sum")',
    'dare(a - pre, 0.4, rescale_by="l1")',
    "pre + ram(a - pre, b - pre, c - pre, epsilon=0.03)",
])
def test_chunked_forms_equal_whole(monkeypatch, recipe):
    """dare_linear (the dare_ties masks) and ram (element-wise) run in chunks, rescale_by="l1"
    with a pass for the norms first: the same results either way."""
    from tvlang.ops import dare as dare_module
    from tvlang.run import chunked as chunk_module

    binds = _state_dicts()
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    monkeypatch.setattr(dare_module, "CHUNK", 10)
    monkeypatch.setattr(chunk_module, "CHUNK_MIN", 7)
    monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 64)
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name
