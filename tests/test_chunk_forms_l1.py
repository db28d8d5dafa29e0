"""rescale_by="l1" in chunks (issue 19): dare, dare_ties, dare_linear, della and della_linear
run chunk by chunk, a pass first for each input's L1 norms before and after its drop, and give
exactly the whole-tensor kernels' results, at chunk ends that cut the norms' blocks (tensors
of several ``BLOCK``s) and dare's mask blocks, on bf16 inputs with ties, in float32 and
float64; a dare recipe equals a naive eager computation written here (masks from the PCG64
words, norms summed by torch in float64)."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

import tvlang
from chunking import chunk_in
from tvlang.ops import dare as dare_module
from tvlang.ops.context import seed_for
from tvlang.ops.sums import BLOCK

# 'w': rows of 127 (della chunks of whole rows: 78 rows, 9906 entries); 'v': one row longer
# than a chunk (della runs it whole; dare in chunks); 'small': one short block
SHAPES = {"w": (397, 127), "v": (3 * BLOCK + 5,), "small": (9, 11)}
ELEMENTS = 10007  # not a multiple of BLOCK nor of dare's mask blocks: chunk ends cut both


def models(seed: int, inputs: str = "float32") -> dict[str, dict[str, torch.Tensor]]:
    """pre, a, b, c; the deltas in quarter steps in 'w' (many equal magnitudes), bf16-valued in
    'small', and of magnitudes from 2**-24 to 2**24 in 'v' (pre is 0 there), whose float64
    sums round: a sum in another order would give other bits (seen in float64 results). All in
    ``inputs`` dtype."""
    g = torch.Generator().manual_seed(seed)
    pre = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    pre["v"].zero_()
    out = {"pre": pre}
    for key in "abc":
        ft = {}
        for n, s in SHAPES.items():
            d = torch.randn(s, generator=g)
            if n == "v":
                d = d * torch.exp2(torch.randint(-24, 25, s, generator=g).float())
            ft[n] = pre[n] + (torch.round(d * 4) / 4 if n == "w" else d.bfloat16().float() if n == "small" else d)
        out[key] = ft
    dtype = getattr(torch, inputs)
    return {k: {n: t.to(dtype) for n, t in m.items()} for k, m in out.items()}


CHUNKED = [
    'dare(a - pre, 0.4, rescale_by="l1", seed=5)',
    'pre + dare(a - pre, p=0.7, rescale_by="l1")',
    'pre + dare_ties(a - pre, b - pre, c - pre, p=0.3, rescale_by="l1", merge="sum", seed=2)',
    'pre + dare_ties(a - pre, b - pre, p=0.6, rescale_by="l1", elect="frequency", weights=[0.5, -0.8])',
    'pre + dare_linear(a - pre, b - pre, p=0.5, rescale_by="l1", weights=[0.3, 0.7], seed=1)',
    'pre + della(a - pre, b - pre, density=0.6, epsilon=0.2, rescale_by="l1", seed=3)',
    'pre + della(a - pre, b - pre, c - pre, density=0.4, epsilon=0.1, rescale_by="l1", merge="sum", lambda=0.7)',
    'pre + della_linear(a - pre, b - pre, density=0.5, epsilon=0.1, rescale_by="l1", weights=[0.3, 0.7], lambda=1.5)',
    # a random kernel without a pass feeding one with a pass: the upstream drop is drawn in both
    'pre + dare(dare(a - pre, 0.2, seed=1), 0.3, rescale_by="l1")',
    # p = 0 and density = 1: norms equal, a factor of exactly 1
    'pre + dare(a - pre, 0.0, rescale_by="l1") + della(b - pre, density=1.0, rescale_by="l1")',
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("inputs", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("recipe", CHUNKED)
def test_l1_chunks_equal_the_whole_kernel(monkeypatch, recipe, inputs, dtype):
    binds = models(1, inputs)
    whole = tvlang.compile(recipe).evaluate(binds, dtype=dtype, allow_unused=True)
    names = chunk_in(monkeypatch, ELEMENTS)
    monkeypatch.setattr(dare_module, "CHUNK", 4096)  # dare's mask blocks, cut by the chunk ends too
    chunked = tvlang.compile(recipe).evaluate(binds, dtype=dtype, allow_unused=True)
    # della's rows of 3*BLOCK+5 entries ('v') are longer than a chunk: that tensor runs whole
    assert names == (["w", "small"] if "della" in recipe else ["w", "v", "small"])
    for name in SHAPES:
        assert chunked[name].dtype == whole[name].dtype
        assert torch.equal(chunked[name], whole[name]), name
        assert bool(chunked[name].isfinite().all()), name


@pytest.mark.parametrize("inputs", ["float32", "bfloat16"])
@pytest.mark.parametrize("recipe", [r for r in CHUNKED if "della" in r and "density=1.0" not in r])
def test_della_l1_keep_flags_saved_by_the_pass_equal_drawing_again(monkeypatch, recipe, inputs):
    """della with rescale_by="l1" keeps its pass's keep flags (a bit per entry) for the main
    pass instead of ranking and drawing again: the same results, chunked and whole, as with
    no flags kept (SAVED_BITS_LIMIT 0: every entry ranked and drawn twice)."""
    from tvlang.ops import della as della_module

    binds = models(2, inputs)
    results = {}
    for limit in (della_module.SAVED_BITS_LIMIT, 0):
        monkeypatch.setattr(della_module, "SAVED_BITS_LIMIT", limit)
        whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
        with monkeypatch.context() as m:
            chunk_in(m, ELEMENTS)
            chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
        results[limit] = (whole, chunked)
    kept, again = results[della_module.SAVED_BITS_LIMIT], results[0]
    for name in SHAPES:
        for a, b in zip(kept, again):
            assert torch.equal(a[name], b[name]), name
    # and the flags are kept at all: the main pass ranks nothing
    ranked = []
    real, real_native = della_module.rank_order, della_module.Magprune._native

    def native(self, x, out, flags):  # the compiled helper's ranking, where it is built
        done = real_native(self, x, out, flags)
        if done:
            ranked.append(x.numel() // self.m)
        return done

    monkeypatch.setattr(della_module, "SAVED_BITS_LIMIT", 64 << 20)
    monkeypatch.setattr(della_module, "rank_order", lambda rows: ranked.append(rows.shape[0]) or real(rows))
    monkeypatch.setattr(della_module.Magprune, "_native", native)
    chunk_in(monkeypatch, ELEMENTS)
    tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    inputs_count = recipe.count(" - pre")
    rows = {"w": SHAPES["w"][0], "small": SHAPES["small"][0], "v": 1}  # 'v' is one row (run whole)
    assert sum(ranked) == inputs_count * sum(rows.values())  # each row of each input ranked once


@pytest.mark.parametrize("inputs", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("recipe", [r for r in CHUNKED if "dare" in r])
def test_dare_l1_keep_flags_saved_by_the_pass_equal_drawing_again(monkeypatch, recipe, inputs):
    """dare, dare_ties and dare_linear with rescale_by="l1" keep the pass's keep flags (a bit
    per entry) for the main pass instead of drawing the masks again: the same results as with
    no flags kept (SAVED_BITS_LIMIT 0) and as the whole kernel, and the main pass draws no words."""
    from tvlang.ops import chunks as chunks_module

    binds = models(3, inputs)
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    results, draws = {}, {}
    kept = chunks_module.SAVED_BITS_LIMIT
    for limit in (kept, 0):
        monkeypatch.setattr(chunks_module, "SAVED_BITS_LIMIT", limit)
        drawn = []
        real = dare_module.Dropper._draw
        with monkeypatch.context() as m:
            m.setattr(dare_module.Dropper, "_draw", lambda self, size: drawn.append(size) or real(self, size))
            chunk_in(m, ELEMENTS)
            results[limit] = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
        draws[limit] = sum(drawn)
    for name in SHAPES:
        assert torch.equal(results[0][name], whole[name]), name
        assert torch.equal(results[kept][name], whole[name]), name
    # words drawn: each input of the l1 drop once (its pass), and again in the main pass only
    # without kept flags; the inner dare of dare(dare(...)) is drawn in both passes
    if "0.0" not in recipe:
        entries = sum(math.prod(shape) for shape in SHAPES.values())
        nested = "dare(dare(" in recipe
        l1_inputs = 1 if nested else recipe.count(" - pre")
        assert draws[kept] == (l1_inputs + 2 * nested) * entries
        assert draws[0] == (2 * l1_inputs + 2 * nested) * entries


def test_l1_chunk_forms_take_a_pass_first(monkeypatch):
    """The pass before the main one observes every chunk of the inputs; without l1 there is none."""
    from tvlang.run import chunked as chunk_module

    seen: list[tuple[str, int]] = []
    real = chunk_module.run_chunk

    def spy(*args, **kwargs):
        seen.append(("pass" if kwargs.get("observing") else "main", args[-1] - args[-2]))
        return real(*args, **kwargs)

    chunk_in(monkeypatch, ELEMENTS)
    monkeypatch.setattr(chunk_module, "run_chunk", spy)
    binds = models(2)
    one = {k: {"w": m["w"]} for k, m in binds.items()}
    tvlang.compile('pre + della(a - pre, density=0.5, rescale_by="l1")').evaluate(one, allow_unused=True)
    chunks = [9906] * 5 + [397 * 127 - 5 * 9906]  # whole rows of 127
    assert seen == [("pass", n) for n in chunks] + [("main", n) for n in chunks]
    seen.clear()
    tvlang.compile("pre + della(a - pre, density=0.5)").evaluate(one, allow_unused=True)
    assert seen == [("main", n) for n in chunks]


@pytest.mark.parametrize("recipe", [
    'pre + dare(ties(a - pre, b - pre, density=0.5), 0.3, rescale_by="l1")',
    'pre + ties(dare(a - pre, 0.3, rescale_by="l1"), b - pre, density=0.5)',
    'pre + dare(della(a - pre, density=0.5, rescale_by="l1"), 0.3, rescale_by="l1")',
    "pre + ties(topk(a - pre, 0.5), b - pre, density=0.5)",
])
def test_a_pass_that_would_need_another_passes_results_runs_whole(monkeypatch, recipe):
    """A kernel that looks at its whole input first cannot take it from another such kernel
    (that one has no results while the first looks): those tensors run whole, the same results."""
    binds = models(3)
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    names = chunk_in(monkeypatch, ELEMENTS)
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    assert names == []
    for name in SHAPES:
        assert torch.equal(chunked[name], whole[name]), name


@pytest.mark.parametrize("recipe", [
    # mergekit's breadcrumbs_ties, as tvlang import writes it: ties at density 1 has no pass
    "pre + ties(breadcrumbs(a - pre, 0.8, gamma=0.05), breadcrumbs(b - pre, 0.8, gamma=0.05), density=1,"
    " merge=\"sum\")",
    'pre + dare(ties(a - pre, b - pre, density=1), 0.3, rescale_by="l1")',
])
def test_a_kernel_without_a_pass_with_these_options_takes_anothers_results_in_chunks(monkeypatch, recipe):
    """What decides is whether a form looks first with the options given (its passes), not its
    name: ties at density 1 keeps everything and looks at nothing first, so it can take the
    results of a kernel that does, and the tensors run in chunks, with the same results."""
    binds = models(4)
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    names = chunk_in(monkeypatch, ELEMENTS)
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    assert names == ["w", "v", "small"]
    for name in SHAPES:
        assert torch.equal(chunked[name], whole[name]), name


def eager_drop(deltas: list[torch.Tensor], name: str, p: float, seed: float) -> list[torch.Tensor]:
    """Each delta with DARE's entries dropped (one 32-bit word per entry, low half of each PCG64
    output first, dropped below ceil(p * 2**32); input i from where input i-1's words end),
    then scaled back to its own L1 norm, sums by torch in float64."""
    numel = deltas[0].numel()
    half = (numel + 1) // 2
    assert numel < 1 << 18  # one mask block: the words are the stream's first ones
    raw = numpy.random.PCG64(seed_for(seed, name)).random_raw(len(deltas) * half)
    out = []
    for i, d in enumerate(deltas):
        words = torch.from_numpy(raw[i * half:(i + 1) * half].view(numpy.uint32)[:numel].astype(numpy.int64))
        kept = torch.where(words >= math.ceil(p * 2**32), d.reshape(-1).double(), 0.0)
        factor = float(d.double().abs().sum()) / float(kept.abs().sum())
        out.append((kept * factor).view(d.shape))
    return out


def test_streamed_dare_l1_equals_a_naive_eager_one(monkeypatch):
    binds = models(4)
    pre, a, b = binds["pre"], binds["a"], binds["b"]
    chunk_in(monkeypatch, ELEMENTS)
    one = tvlang.compile('pre + dare(a - pre, 0.7, rescale_by="l1", seed=9)').evaluate(binds, allow_unused=True)
    linear = tvlang.compile('pre + dare_linear(a - pre, b - pre, p=0.4, rescale_by="l1", weights=[0.3, 0.7])'
                            ).evaluate(binds, allow_unused=True)
    for name in SHAPES:
        (kept,) = eager_drop([a[name] - pre[name]], name, 0.7, 9)
        torch.testing.assert_close(one[name].double(), pre[name].double() + kept, rtol=1e-6, atol=1e-6)
        assert torch.equal(one[name] != pre[name], kept != 0), name  # the same entries kept
        # the kept entries carry the delta's whole L1 norm
        got = (one[name].double() - pre[name].double()).abs().sum()
        assert math.isclose(float(got), float((a[name] - pre[name]).double().abs().sum()), rel_tol=1e-5), name
        ka, kb = eager_drop([a[name] - pre[name], b[name] - pre[name]], name, 0.4, 0)
        # float32 sums of terms of up to 2**26 ('v') cancel: the error is relative to the terms
        terms = pre[name].double().abs() + (0.3 * ka).abs() + (0.7 * kb).abs()
        error = (linear[name].double() - (pre[name].double() + 0.3 * ka + 0.7 * kb)).abs()
        assert bool((error <= 1e-6 * terms + 1e-6).all()), name
