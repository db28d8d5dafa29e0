"""Chunk forms of della, della_linear, slerp, model_stock and random_like (issue 19): the
chunked programs give exactly the whole-tensor kernels' results, at chunk ends that cut rows
and blocks, on bf16-valued data with ties and in float64; and the streamed recipes equal a
naive eager computation written here in torch and numpy."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

import tvlang
from chunking import chunk_in
from tvlang.ops.context import TensorContext, seed_for
from tvlang.ops.sums import BLOCK, BlockSums
from tvlang.run import chunked as chunk_module

# rows of 11, 20, 9 and 40 entries; 'v' is one row of 50 (a vector), 'tiny' under CHUNK_MIN
SHAPES = {"emb": (13, 11), "w": (6, 5, 4), "bias": (9,), "row": (2, 40), "v": (50,), "tiny": (3,)}
NAMES = list(SHAPES)


def models(seed: int = 0, bf16: bool = False) -> list[dict[str, torch.Tensor]]:
    """pre, a, b, c; the fine-tunes' deltas are bf16-valued (many equal magnitudes) and
    quarter steps in 'emb' (more ties)."""
    g = torch.Generator().manual_seed(seed)
    pre = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    out = [pre]
    for _ in range(3):
        ft = {}
        for n, s in SHAPES.items():
            d = torch.randn(s, generator=g).bfloat16().float()
            if n == "emb":
                d = torch.round(d * 4) / 4
            ft[n] = pre[n] + d
        out.append(ft)
    if bf16:
        out = [{n: t.bfloat16() for n, t in m.items()} for m in out]
    return out




def binds(ms):
    pre, a, b, c = ms
    return {"pre": pre, "a": a, "b": b, "c": c}


DELLA = [
    "pre + della(a - pre, b - pre, c - pre, density=0.6, epsilon=0.2, seed=3)",
    "pre + della(a - pre, b - pre, density=0.5, epsilon=0.1, rescale=false, elect=\"frequency\", lambda=0.7)",
    "pre + della_linear(a - pre, b - pre, density=0.5, epsilon=0.1, weights=[0.3, 0.7], lambda=1.5, seed=1)",
    "pre + della(a - pre, b - pre, density=1.0) + della(c - pre, density=0.0)",
    "pre + 0.5*della(2*(a - pre), density=0.4, epsilon=0.3, seed=2) + dare(b - pre, 0.5, seed=4)",
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bf16", [False, True], ids=["f32-inputs", "bf16-inputs"])
@pytest.mark.parametrize("recipe", DELLA)
def test_della_chunks_equal_the_whole_kernel(monkeypatch, recipe, bf16, dtype):
    b = binds(models(1, bf16))
    whole = tvlang.compile(recipe).evaluate(b, dtype=dtype, allow_unused=True)
    names = chunk_in(monkeypatch, 37)  # cuts rows of 11 and 20 unless the chunks follow them
    chunked = tvlang.compile(recipe).evaluate(b, dtype=dtype, allow_unused=True)
    # rows up to 37 entries run in chunks (of 33, 20 and 36 entries: whole rows); a row of 40
    # or 50 is longer than a chunk, so those tensors run whole
    assert names == ["emb", "w", "bias"]
    for name in NAMES:
        assert torch.equal(chunked[name], whole[name]), name


def test_della_chunks_are_cut_at_row_ends(monkeypatch):
    seen: list[int] = []
    real = chunk_module.run_chunk

    def spy(session, program, linear, steps, coefs, flat, kernels, start, stop, **kw):
        seen.append(stop - start)
        return real(session, program, linear, steps, coefs, flat, kernels, start, stop, **kw)

    chunk_in(monkeypatch, 37)
    monkeypatch.setattr(chunk_module, "run_chunk", spy)
    pre, a, b, c = models()
    tvlang.compile("pre + della(a - pre, density=0.5)").evaluate({"pre": {"emb": pre["emb"]}, "a": {"emb": a["emb"]}})
    assert seen == [33, 33, 33, 33, 11]  # 3 rows of 11 per chunk; 143 entries
    assert chunk_module.chunk_size({0: type("K", (), {"row": 38})()}) is None


def test_della_l1_rescale_runs_in_chunks_and_agrees(monkeypatch):
    """rescale_by="l1" takes a pass for the norms first (more: tests/test_chunk_forms_l1.py)."""
    recipe = "pre + della(a - pre, b - pre, density=0.5, rescale_by=\"l1\", seed=2)"
    b = binds(models(2))
    whole = tvlang.compile(recipe).evaluate(b, allow_unused=True)
    names = chunk_in(monkeypatch, 37)
    chunked = tvlang.compile(recipe).evaluate(b, allow_unused=True)
    assert names == ["emb", "w", "bias"]
    assert all(torch.equal(chunked[n], whole[n]) for n in NAMES)


# -- the naive eager DELLA ---------------------------------------------------------------------

def eager_della(deltas, name, *, density, epsilon, seed=0, rescale=True, elect="total", merge="mean",
                weights=None, lam=1.0, l1=False):
    """DELLA from its definition: per row ranks by a double stable argsort, probabilities,
    one 32-bit PCG64 word per entry (input i after input i-1's words), TIES merge in float64;
    ``l1``: each sample's kept entries (unscaled) times the delta's L1 norm over theirs."""
    n = len(deltas)
    numel = deltas[0].numel()
    shape = deltas[0].shape
    m = numel // shape[0] if len(shape) >= 2 else numel
    half = (numel + 1) // 2
    raw = numpy.random.PCG64(seed_for(seed, name)).random_raw(n * half)
    samples = []
    for i, d in enumerate(deltas):
        rows = d.reshape(-1, m).float()
        words = raw[i * half:(i + 1) * half].view(numpy.uint32)[:numel]
        u = torch.from_numpy(words.astype(numpy.float64)).view(rows.shape) / 2**32
        rank = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1, stable=True)
        p = rank.float() * (2 * epsilon / (m - 1)) + (density - epsilon) if m > 1 else torch.full_like(rows, density)
        keep = u < p.double()
        s = torch.where(keep, rows / p if rescale and not l1 else rows, torch.zeros_like(rows)).double().reshape(-1)
        if l1:
            s = s * (float(rows.double().abs().sum()) / float(s.abs().sum()))
        samples.append(s)
    w = weights or [1.0] * n
    vals = torch.stack([wi * s for wi, s in zip(w, samples)])
    if elect == "none":
        out = vals.sum(0)
        if merge == "mean":
            out = out / n
    else:
        sign = torch.where(vals.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(vals) == sign) & (vals != 0)
        out = (vals * agree).sum(0)
        if merge == "mean":
            out = out / agree.sum(0).clamp(min=1)
    return (lam * out).reshape(shape)


def test_streamed_della_equals_a_naive_eager_della(monkeypatch):
    pre, a, b, c = models(3)
    recipes = {
        "pre + della(a - pre, b - pre, c - pre, density=0.6, epsilon=0.2, seed=3)":
            dict(density=0.6, epsilon=0.2, seed=3),
        "pre + della_linear(a - pre, b - pre, density=0.5, epsilon=0.1, weights=[0.3, 0.7], lambda=1.5, seed=1)":
            dict(density=0.5, epsilon=0.1, seed=1, elect="none", merge="sum", weights=[0.3, 0.7], lam=1.5),
        'pre + della(a - pre, b - pre, c - pre, density=0.4, epsilon=0.2, rescale_by="l1", seed=3)':
            dict(density=0.4, epsilon=0.2, seed=3, l1=True),
        'pre + della_linear(a - pre, b - pre, density=0.5, epsilon=0.1, rescale_by="l1", weights=[0.3, 0.7])':
            dict(density=0.5, epsilon=0.1, elect="none", merge="sum", weights=[0.3, 0.7], l1=True),
    }
    chunk_in(monkeypatch, 37)
    for recipe, options in recipes.items():
        got = tvlang.compile(recipe).evaluate(binds((pre, a, b, c)), allow_unused=True)
        inputs = (a, b, c) if "c - pre" in recipe else (a, b)
        for name in NAMES:
            want = pre[name].double() + eager_della([m[name] - pre[name] for m in inputs], name, **options)
            torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-6)
            # the same entries kept: where the merge is zero in one it is zero in the other
            assert torch.equal(got[name] == pre[name], (want - pre[name].double()).abs() < 1e-12), name


# -- slerp, model_stock, random_like ------------------------------------------------------------

PASSES = [
    "slerp(a, b, 0.3)",
    "slerp(pre, c, 0.8)",
    "model_stock(pre, a, b, c)",
    "model_stock(pre, a, b)",
    "pre + random_like(a - pre, seed=5)",
    "pre + 0.5*random_like(2*(b - pre)) + slerp(a - pre, c - pre, 0.5)",
    # counts of shared and unique entries first (whole numbers: any cuts give the same)
    "pre + ramplus_tl(a - pre, b - pre, c - pre, r=0.5, alpha=0.8, epsilon=0.5)",
    "ramplus_tl(a - pre, 0.5*(b - pre), epsilon=1.0) + ram(a - pre, c - pre, epsilon=0.3)",
]


@pytest.mark.parametrize("elements", [4, 37, BLOCK + 3])
@pytest.mark.parametrize("recipe", PASSES)
def test_pass_chunk_forms_equal_the_whole_kernels(monkeypatch, recipe, elements):
    ms = models(4)
    ms[2]["emb"] = 2 * ms[1]["emb"]  # a and b colinear there: slerp's linear branch
    whole = tvlang.compile(recipe).evaluate(binds(ms), allow_unused=True)
    names = chunk_in(monkeypatch, elements)
    chunked = tvlang.compile(recipe).evaluate(binds(ms), allow_unused=True)
    assert names == [n for n in NAMES if n != "tiny"]
    for name in NAMES:
        assert torch.equal(chunked[name], whole[name]), name


def test_block_sums_do_not_depend_on_the_pieces():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * BLOCK + 77, generator=g) * torch.exp(5 * torch.randn(3 * BLOCK + 77, generator=g))
    totals = set()
    for cut in (1, 5, BLOCK - 1, BLOCK, 2 * BLOCK + 1, x.numel()):
        acc = BlockSums(products=False)
        for start in range(0, x.numel(), cut):
            acc.add("x", [x[start:start + cut]])
        totals.add(acc.value())
    assert len(totals) == 1
    assert math.isclose(totals.pop(), math.fsum(v * v for v in x.double().tolist()), rel_tol=1e-12)



def test_model_stock_offset_sums_do_not_depend_on_the_pieces():
    from tvlang.ops.coefficients import stock_pairs
    from tvlang.ops.stock import _OffsetSums
    g = torch.Generator().manual_seed(1)
    count = 3 * BLOCK + 77
    xs = [torch.randn(count, generator=g) * torch.exp(3 * torch.randn(count, generator=g)) for _ in range(3)]
    totals = set()
    for cut in (1, 5, BLOCK - 1, BLOCK, 2 * BLOCK + 1, count):
        acc = _OffsetSums(3)
        for start in range(0, count, cut):
            acc.add([x[start:start + cut] for x in xs])
        totals.add(tuple(acc.totals()))
    assert len(totals) == 1
    got = totals.pop()
    for value, (i, j) in zip(got, stock_pairs(3)):
        exact = math.fsum(a * b for a, b in zip(xs[i].double().tolist(), xs[j].double().tolist()))
        assert math.isclose(value, exact, rel_tol=1e-12, abs_tol=1e-12 * math.sqrt(got[i] * got[j])), (i, j)

def eager_slerp(a, b, t):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    cos = float(a @ b / (na * nb))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def eager_stock(base, models):
    base = base.double().reshape(-1)
    offsets = [m.double().reshape(-1) - base for m in models]
    n = len(models)
    cos = [float(offsets[i] @ offsets[j] / (offsets[i].norm() * offsets[j].norm()))
           for i in range(n) for j in range(i + 1, n)]
    c = min(1.0, max(0.0, sum(cos) / len(cos)))
    t = n * c / (1 + (n - 1) * c)
    return t * sum(m.double().reshape(-1) for m in models) / n + (1 - t) * base


def eager_random_like(x, name, seed):
    noise = numpy.random.Generator(numpy.random.PCG64(seed_for(seed, name))).standard_normal(
        x.numel(), dtype=numpy.float32)
    noise = torch.from_numpy(noise).double()
    return noise * (x.double().norm() / noise.norm())


@pytest.mark.parametrize("bf16", [False, True], ids=["f32-inputs", "bf16-inputs"])
def test_streamed_pass_kernels_equal_naive_eager_ones(monkeypatch, bf16):
    pre, a, b, c = models(5, bf16)
    b["emb"] = (-3 * a["emb"].float()).to(b["emb"].dtype)  # anti-colinear: linear branch
    chunk_in(monkeypatch, 37)
    bound = binds((pre, a, b, c))
    got = {  # float32 results, also from bf16 inputs (computed in float32)
        "slerp": tvlang.compile("slerp(a, b, 0.3)").evaluate(bound, out_dtype="float32", allow_unused=True),
        "stock": tvlang.compile("model_stock(pre, a, b, c)").evaluate(bound, out_dtype="float32", allow_unused=True),
        "noise": tvlang.compile("pre + random_like(a - pre, seed=5)").evaluate(bound, out_dtype="float32",
                                                                                allow_unused=True),
    }
    for name in NAMES:
        p, x, y, z = (m[name].float() for m in (pre, a, b, c))
        shape = p.shape
        torch.testing.assert_close(got["slerp"][name].double(), eager_slerp(x, y, 0.3).view(shape), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(got["stock"][name].double(), eager_stock(p, [x, y, z]).view(shape), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(got["noise"][name].double(),
                                   p.double() + eager_random_like(x - p, name, 5).view(shape), rtol=1e-5, atol=1e-5)


def test_random_like_noise_is_keyed_by_seed_and_name():
    from tvlang.ops.dare import random_like

    x = torch.randn(100)
    a = random_like([x], TensorContext("w"), seed=1)
    assert torch.equal(a, random_like([x], TensorContext("w"), seed=1))
    assert not torch.equal(a, random_like([x], TensorContext("v"), seed=1))
    assert not torch.equal(a, random_like([x], TensorContext("w"), seed=2))
    torch.testing.assert_close(a.double(), eager_random_like(x, "w", 1))


@pytest.mark.parametrize("elements", [4, 11, 37, BLOCK + 3])
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16-inputs"])
def test_model_stock_filter_wise_chunks_of_whole_rows_equal_the_whole_kernel(monkeypatch, elements, bf16):
    """filter_wise: chunks of whole rows (the last dimension) with no pass; a vector is one row
    (the per-tensor ratio, a pass first); a row longer than a chunk runs whole."""
    ms = models(6, bf16=bf16)
    ms[2]["emb"][3] = ms[1]["emb"][3]  # one row where two offsets are equal (cos 1)
    recipe = "model_stock(pre, a, b, c, filter_wise=true)"
    whole = tvlang.compile(recipe).evaluate(binds(ms))
    names = chunk_in(monkeypatch, elements)
    chunked = tvlang.compile(recipe).evaluate(binds(ms))
    assert names == [n for n in NAMES if n != "tiny" and (len(SHAPES[n]) < 2 or SHAPES[n][-1] <= elements)]
    for name in NAMES:
        assert torch.equal(chunked[name], whole[name]), name
    per_tensor = tvlang.compile("model_stock(pre, a, b, c)").evaluate(binds(ms))
    assert torch.equal(chunked["v"], per_tensor["v"]) and not torch.equal(chunked["emb"], per_tensor["emb"])
