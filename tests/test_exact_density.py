"""Exact density: topk, ties and breadcrumbs keep exactly k entries, ties at a threshold
broken by flat index (the earlier entry first), in whole-tensor kernels and chunk forms;
count="mergekit" is mergekit 0.1.5's rule. Checked on bf16-valued deltas, where many
magnitudes tie, against a naive stable sort and against mergekit's own sparsify."""

import pytest
import torch

import tvlang
from tvlang.ops.common import keep_count, truncated_count
from tvlang.ops.context import TensorContext
from tvlang.ops.prune import breadcrumbs, topk
from tvlang.ops.ties import ties


def ctx(name="w"):
    return TensorContext(name)


def bf16_delta(shape, seed, scale=1e-3):
    """A fine-tuning-sized delta rounded to bfloat16 (as a bf16 checkpoint's difference is):
    a few hundred distinct magnitudes over thousands of entries."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16).float()


def naive_top(x, k, skip=0):
    """The entries ranked skip+1 .. skip+k by |x| (largest first, equal ones by position)."""
    order = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(x.numel())
    mask[order[skip:skip + k]] = 1.0
    return x * mask.view(x.shape)


def test_count_rules():
    assert keep_count(0.29, 100) == 29 and keep_count(0.29, 100, "mergekit") == 28
    assert keep_count(0.01, 50) == 0 and keep_count(0.01, 50, "mergekit") == 1  # max(1, int(0.5))
    assert keep_count(0.0, 50, "mergekit") == 0 and keep_count(1.0, 50, "mergekit") == 50
    assert keep_count(0.5, 0, "mergekit") == 0
    assert truncated_count(0.01, 50) == 0 and truncated_count(0.7, 10) == 7


def test_bf16_deltas_have_many_ties_and_keep_exactly_k():
    x = bf16_delta((256, 384), seed=1)
    n = x.numel()
    distinct = torch.unique(x.abs()).numel()
    assert distinct < n // 50  # many ties: the setting of the issue
    for density in (0.01, 0.1, 0.3, 0.5, 0.77):
        k = keep_count(density, n)
        want = naive_top(x, k)
        got = topk([x], ctx(), density=density)
        assert int(torch.count_nonzero(got)) == k
        assert torch.equal(got, want), density
        got = ties([x], ctx(), density=density)  # one input: the trim alone
        assert torch.equal(got, want), density


def test_bf16_keeps_exactly_k_in_bf16_compute_too():
    x = bf16_delta((64, 96), seed=2)
    want = naive_top(x, keep_count(0.2, x.numel()))
    got = topk([x.to(torch.bfloat16)], ctx(), density=0.2)
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), want)
    got = ties([x.to(torch.bfloat16), x.to(torch.bfloat16)], ctx(), density=0.2)
    assert torch.equal(got.float(), want)


@pytest.mark.parametrize("density,gamma", [(0.3, 0.05), (0.5, 0.2), (0.9, 0.1), (0.2, 0.0)])
def test_bf16_breadcrumbs_keep_exactly_the_ranked_window(density, gamma):
    x = bf16_delta((128, 96), seed=3)
    n = x.numel()
    keep, top = keep_count(density, n), keep_count(gamma, n)
    top = min(top, n - keep)
    got = breadcrumbs([x], ctx(), density=density, gamma=gamma)
    assert int(torch.count_nonzero(got)) == keep
    assert torch.equal(got, naive_top(x, keep, skip=top))


def test_breadcrumbs_mergekit_count():
    x = torch.tensor([0.1, -0.5, 0.3, 2.0, -1.0])
    # int(0.9*5) = 4 kept, int(0.01*5) = 0 outliers (mergekit 0.1.5 keeps these too)
    got = breadcrumbs([x], ctx(), density=0.9, count="mergekit")
    assert torch.equal(got, torch.tensor([0.0, -0.5, 0.3, 2.0, -1.0]))
    # int(0.29*100) = 28 in mergekit, 29 with the floor rule
    y = torch.arange(1.0, 101.0)
    assert int(torch.count_nonzero(breadcrumbs([y], ctx(), density=0.29, gamma=0.0, count="mergekit"))) == 28
    assert int(torch.count_nonzero(breadcrumbs([y], ctx(), density=0.29, gamma=0.0))) == 29


def test_topk_mergekit_count_keeps_at_least_one():
    x = torch.tensor([0.5, -3.0, 1.0, 2.0])
    assert torch.equal(topk([x], ctx(), density=0.1), torch.zeros(4))
    assert torch.equal(topk([x], ctx(), density=0.1, count="mergekit"), torch.tensor([0.0, -3.0, 0.0, 0.0]))
    assert torch.equal(ties([x], ctx(), density=0.1, count="mergekit"), torch.tensor([0.0, -3.0, 0.0, 0.0]))


def test_matches_mergekit_sparsify_magnitude():
    sparsify = pytest.importorskip("mergekit.sparsify")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 70, generator=g)  # no ties: mergekit's unstable sort picks the same set
    for density in (0.003, 0.1, 0.29, 0.5):
        want = sparsify.magnitude(x, density)
        assert torch.equal(topk([x], ctx(), density=density, count="mergekit"), want), density
    for density, gamma in ((0.3, 0.05), (0.9, 0.01), (0.29, 0.0)):
        want = sparsify.magnitude_outliers(x, density, gamma=gamma)
        assert torch.equal(breadcrumbs([x], ctx(), density=density, gamma=gamma, count="mergekit"), want)
    # bf16-valued: mergekit breaks ties in its sort's order, tvlang by position; both keep exactly k,
    # and agree on every entry above the threshold
    y = bf16_delta((40, 70), seed=5)
    want = sparsify.magnitude(y, 0.2)
    got = topk([y], ctx(), density=0.2, count="mergekit")
    assert int(torch.count_nonzero(got)) == int(torch.count_nonzero(want)) == int(0.2 * y.numel())
    t = float(got.abs()[got != 0].min())
    assert torch.equal(torch.where(y.abs() > t, got, 0.0), torch.where(y.abs() > t, want, 0.0))


def _models():
    names = {"model.embed.weight": (40, 30), "model.layers.0.mlp.weight": (33, 21), "model.norm.weight": (50,)}
    pre = {n: bf16_delta(s, seed=10 + i, scale=1.0) for i, (n, s) in enumerate(names.items())}
    out = {"pre": pre}
    for j, key in enumerate("abc"):
        out[key] = {n: pre[n] + bf16_delta(s, seed=20 + 3 * j + i) for i, (n, s) in enumerate(names.items())}
    return out


def naive_ties(deltas, k_of):
    trimmed = torch.stack([naive_top(d, k_of(d.numel())) for d in deltas]).double()
    s = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(trimmed) == s).double()
    return ((trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)).float()


@pytest.mark.parametrize("count", ["floor", "mergekit"])
def test_streamed_and_chunked_equal_a_naive_eager_ties(monkeypatch, count):
    """The optimized, streamed ties (whole tensors, then chunks of 50 entries found by radix
    select) equals a naive eager computation with a stable sort, on bf16-valued deltas."""
    from tvlang.run import chunked as chunk_module

    binds = _models()
    recipe = f'ties(a - pre, b - pre, c - pre, density=0.3, count="{count}")'
    whole = tvlang.compile(recipe).evaluate(binds)
    monkeypatch.setattr(chunk_module, "CHUNK_MIN", 7)
    monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 50)
    chunked = tvlang.compile(recipe).evaluate(binds)
    for name, pre in binds["pre"].items():
        deltas = [binds[m][name] - pre for m in "abc"]
        want = naive_ties(deltas, lambda n: keep_count(0.3, n, count))
        assert torch.allclose(whole[name], want, atol=1e-7, rtol=0), name
        assert torch.equal(chunked[name], whole[name]), name


@pytest.mark.parametrize("recipe", [
    'topk(a - pre, 0.2, count="mergekit") + topk(b - pre, 0.01, count="mergekit")',
    'breadcrumbs(a - pre, 0.3, 0.05, count="mergekit") + breadcrumbs(b - pre, 0.5, 0.3)',
    "breadcrumbs(c - pre, 0.4, 0.2)",
])
def test_chunk_forms_equal_whole_kernels_with_ties(monkeypatch, recipe):
    from tvlang.run import chunked as chunk_module

    binds = _models()
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    monkeypatch.setattr(chunk_module, "CHUNK_MIN", 7)
    monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 37)
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name
