"""rescale_by="l1" on the magnitude pruners (issue 14: mergekit's ``rescale: true`` with ties,
breadcrumbs and breadcrumbs_ties): each input's kept entries are scaled so that it keeps its L1
norm. The chunk forms take one pass more, once the thresholds are known, for the norms; they
give exactly the whole-tensor kernels' results (at chunk ends that cut the norms' blocks, with
many entries tied at the thresholds, on bf16 inputs), and both equal a naive eager computation
(a full sort, torch's float64 sums). The mergekit comparisons are tests/fixtures/mergekit/
*_rescale*.yml."""

from __future__ import annotations

import pytest
import torch

import tvlang
from chunking import chunk_in
from test_chunk_forms_l1 import ELEMENTS, SHAPES, models
from tvlang.run import chunked as chunk_module

RECIPES = [
    'pre + ties(a - pre, b - pre, c - pre, density=0.3, rescale_by="l1")',
    'pre + ties(a - pre, b - pre, density=0.6, weights=[0.7, -0.4], merge="sum", rescale_by="l1", count="mergekit")',
    'topk(a - pre, 0.25, rescale_by="l1")',
    'pre + breadcrumbs(a - pre, 0.8, gamma=0.05, rescale_by="l1") + 0.5*breadcrumbs(b - pre, 0.5, rescale_by="l1")',
    # mergekit's breadcrumbs_ties with rescale: true, as tvlang import writes it
    'pre + ties(breadcrumbs(a - pre, 0.8, gamma=0.05, rescale_by="l1"), '
    'breadcrumbs(b - pre, 0.7, rescale_by="l1"), density=1, merge="sum")',
    'pre + ties(a - pre, b - pre, density=0.4, scope="model", rescale_by="l1")',
    'pre + ties(a - pre, b - pre, density=1, rescale_by="l1") + topk(c - pre, 0.0, rescale_by="l1")',
]


@pytest.mark.parametrize("inputs", ["float32", "bfloat16"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_l1_magnitude_chunks_equal_the_whole_kernels(monkeypatch, recipe, inputs):
    binds = models(6, inputs)
    whole = tvlang.compile(recipe).evaluate(binds, dtype="float32", allow_unused=True)
    names = chunk_in(monkeypatch, ELEMENTS)
    chunked = tvlang.compile(recipe).evaluate(binds, dtype="float32", allow_unused=True)
    assert names == list(SHAPES)
    for name in SHAPES:
        assert torch.equal(chunked[name], whole[name]), name


def rank_order(x: torch.Tensor) -> torch.Tensor:
    """Flat indices by decreasing |x|, equal magnitudes by position (a stable sort)."""
    return torch.sort(x.reshape(-1).abs(), descending=True, stable=True).indices


def eager_keep(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``x`` with only the entries ranked ``lo .. hi-1`` by magnitude, scaled to ``x``'s L1 norm
    (float64 sums; unscaled where a norm is below 1e-7)."""
    flat = x.reshape(-1).double()
    kept = torch.zeros_like(flat)
    index = rank_order(x)[lo:hi]
    kept[index] = flat[index]
    before, after = flat.abs().sum(), kept.abs().sum()
    if before >= 1e-7 and after >= 1e-7:
        kept = kept * (before / after)
    return kept.view(x.shape)


def test_topk_and_breadcrumbs_equal_a_naive_eager_computation(monkeypatch):
    binds = models(7)
    pre, a, b = binds["pre"], binds["a"], binds["b"]
    chunk_in(monkeypatch, ELEMENTS)
    got = {key: tvlang.compile(recipe).evaluate(binds, allow_unused=True) for key, recipe in (
        ("t", 'topk(a - pre, 0.25, rescale_by="l1")'), ("c", 'breadcrumbs(b - pre, 0.5, gamma=0.1, rescale_by="l1")'))}
    for name in SHAPES:
        d = a[name] - pre[name]
        n = d.numel()
        torch.testing.assert_close(got["t"][name].double(), eager_keep(d, 0, n // 4), rtol=1e-6, atol=1e-6)
        d = b[name] - pre[name]
        top = n // 10
        torch.testing.assert_close(got["c"][name].double(), eager_keep(d, top, top + n // 2), rtol=1e-6, atol=1e-6)
        # the norm is restored: |kept| sums to |d|'s
        assert abs(float(got["c"][name].double().abs().sum()) / float(d.double().abs().sum()) - 1) < 1e-6


def test_ties_l1_equals_a_naive_eager_ties():
    binds = models(8)
    pre = binds["pre"]
    got = tvlang.compile('pre + ties(a - pre, b - pre, c - pre, density=0.3, rescale_by="l1")').evaluate(
        binds, allow_unused=True)
    for name in SHAPES:
        deltas = [binds[k][name] - pre[name] for k in "abc"]
        kept = torch.stack([eager_keep(d, 0, int(0.3 * d.numel())) for d in deltas])
        sign = torch.where(kept.sum(0) >= 0, 1.0, -1.0).double()
        agree = (kept * sign) > 0
        merged = (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(got[name].double(), pre[name].double() + merged, rtol=1e-5, atol=1e-5)


def test_the_l1_pass_comes_after_the_threshold_and_only_where_entries_are_pruned(monkeypatch):
    seen: list[str] = []
    real = chunk_module.run_chunk

    def spy(*args, **kwargs):
        seen.append("sample" if kwargs.get("sampling") else
                    f"pass{kwargs['pass_index']}" if kwargs.get("observing") else "main")
        return real(*args, **kwargs)

    chunk_in(monkeypatch, ELEMENTS)
    monkeypatch.setattr(chunk_module, "run_chunk", spy)
    one = {k: {"w": m["w"]} for k, m in models(9).items()}  # 50,419 entries: 6 chunks
    tvlang.compile('pre + ties(a - pre, b - pre, density=0.3, rescale_by="l1")').evaluate(one, allow_unused=True)
    assert [s for s in dict.fromkeys(seen)] == ["sample", "pass0", "pass1", "main"]
    assert seen.count("pass1") == seen.count("main") == 6
    seen.clear()
    tvlang.compile('pre + ties(a - pre, b - pre, density=0.3)').evaluate(one, allow_unused=True)
    assert [s for s in dict.fromkeys(seen)] == ["sample", "pass0", "main"]
    seen.clear()  # density 1 keeps every entry: no threshold, no norms, no pass
    tvlang.compile('pre + ties(a - pre, b - pre, density=1, rescale_by="l1")').evaluate(one, allow_unused=True)
    assert set(seen) == {"main"}
