"""WindowSelect, the k-th largest |x| in one pass from a window guessed from a sample, against a
naive sort: the same value and tie split as the radix select, whether the window holds the k-th
largest (one pass), misses it (three passes), outgrows its limit or gets no usable sample (two);
and the chunked evaluator's sample, end to end, against the whole-tensor kernels."""

from __future__ import annotations

import math
import random

import pytest
import torch

import tvlang
from chunking import chunk_in
from test_radix_select import naive
from tvlang.ops.common import bits_to_float
from tvlang.ops.threshold import WindowSelect
from tvlang.run import chunked


def run(select: WindowSelect, pieces: list[torch.Tensor], sample: list[torch.Tensor] | None) -> int:
    """Feed ``select`` as the evaluator does; the number of passes it took."""
    if sample is not None:
        for piece in sample:
            select.sample(piece)
        select.end_sample()
    passes = 0
    while passes < select.passes:
        for piece in pieces:
            select.update(passes, piece)
        select.end_pass(passes)
        passes += 1
    return passes


def check(select: WindowSelect, x: torch.Tensor, ranks: list[int]) -> None:
    for k in ranks:
        kth, need, tied = naive(x, k)
        got, want = select.value(k), bits_to_float(kth)
        assert got == want or (math.isnan(got) and math.isnan(want)), k
        assert select.tied(k) == (need, tied), k


def spread_sample(x: torch.Tensor, blocks: int = 16, size: int = 512) -> list[torch.Tensor]:
    starts = [i * (x.numel() - size) // (blocks - 1) for i in range(blocks)]
    return [x[s:s + size] for s in starts]


@pytest.mark.parametrize("case", range(10))
def test_one_pass_when_the_window_holds_the_kth_largest(case):
    rng = random.Random(case)
    g = torch.Generator().manual_seed(case)
    n = rng.choice([60_000, 200_000, 333_333])
    x = torch.randn(n, generator=g) * rng.choice([1e-3, 1.0, 1e4])
    if case % 2:
        x = x.to(torch.bfloat16).float()  # few distinct magnitudes: many entries tied at the threshold
    cuts = sorted(rng.sample(range(1, n), 5))
    pieces = [x[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
    ranks = sorted({n // 5, n // 2, rng.randint(n // 10, n // 3)})
    select = WindowSelect(n, ranks)
    assert run(select, pieces, spread_sample(x)) == 1
    assert not select.fell_back
    check(select, x, ranks)


def test_a_sample_unlike_the_tensor_falls_back_to_the_radix_passes():
    """Magnitudes near 1 where the sample looks, 1000 elsewhere: the window misses."""
    n = 100_000
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + torch.rand(n, generator=g)
    sample = spread_sample(x)
    for piece in sample:
        piece.copy_(torch.rand(piece.numel(), generator=g))
    x[::7] = -x[::7]
    select = WindowSelect(n, [n // 5, n // 2])
    assert run(select, [x[:40_000], x[40_000:]], sample) == 3
    assert select.fell_back
    check(select, x, [n // 5, n // 2])


def test_gathered_entries_past_the_limit_fall_back():
    n = 50_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    select = WindowSelect(n, [n // 5], limit=100)
    assert run(select, [x[:1000], x[1000:]], spread_sample(x)) == 3
    assert select.fell_back
    check(select, x, [n // 5])


@pytest.mark.parametrize("sample", [None, "tiny", "wide"])
def test_no_usable_sample_is_the_radix_select(sample):
    """No sample, one too small for a narrow window, or a rank whose window would reach the
    smallest magnitudes (more than an eighth of the entries): the radix select's two passes."""
    n = 20_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(2))
    x[torch.arange(n) % 3 == 0] = 0.0  # a third zeros: the k-th largest for k near n is 0
    ranks = [n // 5, n - 10] if sample == "wide" else [n // 5]
    pieces = {None: None, "tiny": [x[:50]], "wide": [x]}[sample]
    select = WindowSelect(n, ranks)
    assert run(select, [x[:7_777], x[7_777:]], pieces) == 2
    assert not select.fell_back
    check(select, x, ranks)


def test_infinities_nan_and_zeros_inside_the_window():
    n = 40_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    x[5] = float("inf")
    x[9] = float("nan")
    x[100:200] = 0.0
    ranks = [1, 2, 3, n // 4]
    select = WindowSelect(n, ranks)
    run(select, [x], spread_sample(x))
    check(select, x, ranks)


def test_sample_ranges_spread_over_the_tensor():
    blocks, size = chunked.SAMPLE_BLOCKS, chunked.SAMPLE_BLOCK
    assert chunked.sample_ranges(100) == [(0, 100)]
    assert chunked.sample_ranges(blocks * size) == [(0, blocks * size)]
    ranges = chunked.sample_ranges(10**8)
    assert len(ranges) == blocks and ranges[0] == (0, size) and ranges[-1] == (10**8 - size, 10**8)
    assert all(b - a == size for a, b in ranges) and all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


# -- end to end: the evaluator's sample, chunks, and the whole-tensor kernels ----------------


def models(n: int, structured: bool) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    pre = {"w": torch.randn(n, generator=g), "small": torch.randn(3, 5, generator=g)}
    out = {"pre": pre}
    for i, name in enumerate("ab"):
        delta = torch.randn(n, generator=g) * (i + 1)
        if structured:  # where the sample looks, deltas 1000 times smaller than elsewhere
            for start, stop in chunked.sample_ranges(n):
                delta[start:stop] *= 1e-3
        out[name] = {"w": pre["w"] + delta, "small": pre["small"] + torch.randn(3, 5, generator=g)}
    return out


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("recipe", [
    "pre + ties(a - pre, b - pre, density=0.2)",
    "pre + topk(a - pre, 0.3) + 0.5*(b - pre)",
    "pre + breadcrumbs(b - pre, density=0.4, gamma=0.05) - 0.1*(a - pre)",
])
def test_chunked_thresholds_with_a_sample_equal_the_whole_kernels(monkeypatch, recipe, structured):
    monkeypatch.setattr(chunked, "SAMPLE_BLOCKS", 8)
    monkeypatch.setattr(chunked, "SAMPLE_BLOCK", 1024)
    n = 60_001
    inputs = {k: v for k, v in models(n, structured).items() if k in recipe}
    whole = tvlang.compile(recipe).evaluate(inputs)
    passes: list[int] = []
    real = chunked.run_chunk

    def spy(*args, **kwargs):
        if kwargs.get("outputs") is None and not kwargs.get("sampling"):
            passes.append(kwargs.get("pass_index", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked, "run_chunk", spy)
    names = chunk_in(monkeypatch, 4096, minimum=1000)
    got = tvlang.compile(recipe).evaluate(inputs)
    assert names == ["w"]
    assert max(passes) + 1 == (3 if structured else 1)  # a window missed: the radix passes after
    assert torch.equal(got["w"], whole["w"]) and torch.equal(got["small"], whole["small"])


def test_no_sample_through_another_kernel(monkeypatch):
    """``ties(dare(...), ...)``: dare's draws expect their pieces in order, so no sample: the
    radix select's two passes, and the whole kernel's result."""
    inputs = models(30_000, False)
    recipe = "pre + ties(dare(a - pre, 0.5, seed=3), b - pre, density=0.3)"
    whole = tvlang.compile(recipe).evaluate(inputs)
    sampled: list[bool] = []
    real = chunked.run_chunk

    def spy(*args, **kwargs):
        sampled.append(bool(kwargs.get("sampling")))
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked, "run_chunk", spy)
    chunk_in(monkeypatch, 4096, minimum=1000)
    got = tvlang.compile(recipe).evaluate(inputs)
    assert sampled and not any(sampled)
    assert torch.equal(got["w"], whole["w"])


def test_no_sample_on_a_gpu():
    """On a GPU the radix select's histograms stay on the device: no sample (no numpy gathers)."""
    from tvlang.ops.chunks import breadcrumbs_chunks, ties_chunks, topk_chunks
    from tvlang.ops.context import TensorContext

    options = dict(elect="total", merge="mean", weights=[], elect_on="weighted", scope="tensor", count="floor")
    for device, sampling in (("cpu", True), ("cuda", False)):
        ctx = TensorContext("w", device=device)
        assert ties_chunks(ctx, 10_000, 2, torch.float32, density=0.2, **options).sampling is sampling
        topk = topk_chunks(ctx, 10_000, 1, torch.float32, density=0.2, scope="tensor", count="floor")
        assert topk.sampling is sampling
        assert breadcrumbs_chunks(ctx, 10_000, 1, torch.float32, density=0.5, gamma=0.1,
                                  count="floor").sampling is sampling
