"""dare, random_like, della sampling: rules, determinism, order independence."""

import math

import pytest
import torch

from tvlang.errors import TvlangError
from tvlang.ops.context import TensorContext, seed_for
from tvlang.ops.dare import dare, random_like
from tvlang.ops.della import della_sample, rank_order

T = torch.tensor


def test_seed_derivation_is_stable():
    # fixed values: a change here changes every random result tvlang has written
    assert seed_for(0, "w") == 7078118292366486485
    assert seed_for(1, "model.layers.0.mlp.weight") == 3016449019455965237
    assert seed_for(2.0, "w") == seed_for(2, "w")


def test_dare_hand_computed():
    # the words drawn for ('w', seed 0) are 2800579674 2107414477 433079038 156013486
    # (/2**32: .652 .491 .101 .036): r < ceil(.4 * 2**32) drops entries 2 and 3
    import numpy

    words = numpy.random.PCG64(seed_for(0, "w")).random_raw(2).view(numpy.uint32)
    assert words.tolist() == [2800579674, 2107414477, 433079038, 156013486]
    got = dare([T([1.0, 2.0, 3.0, 4.0])], TensorContext("w"), p=0.4)
    assert torch.allclose(got, T([1.0 / 0.6, 2.0 / 0.6, 0.0, 0.0]))
    got = dare([T([1.0, 2.0, 3.0, 4.0])], TensorContext("w"), p=0.4, rescale=False)
    assert torch.equal(got, T([1.0, 2.0, 0.0, 0.0]))
    # the threshold is exact: a word equal to ceil(p * 2**32) is kept, one below dropped
    p = 2107414477 / 2**32
    assert torch.equal(dare([T([1.0, 2.0, 3.0, 4.0])], TensorContext("w"), p=p, rescale=False), T([1.0, 2.0, 0.0, 0.0]))
    p = 2107414478 / 2**32
    assert torch.equal(dare([T([1.0, 2.0, 3.0, 4.0])], TensorContext("w"), p=p, rescale=False), T([1.0, 0.0, 0.0, 0.0]))


def test_dare_edges():
    x = torch.randn(3, 4)
    assert torch.equal(dare([x], TensorContext("w"), p=1.0), torch.zeros(3, 4))
    assert torch.equal(dare([x], TensorContext("w"), p=0.0), x)
    assert torch.equal(dare([torch.zeros(5)], TensorContext("w"), p=0.3), torch.zeros(5))
    with pytest.raises(TvlangError, match="option 'p' must be in \\[0, 1\\]"):
        dare([x], TensorContext("w"), p=-0.1)
    with pytest.raises(TvlangError, match="option 'seed' must be an integer"):
        dare([x], TensorContext("w"), p=0.1, seed=1.5)


def test_dare_statistics():
    x = torch.full((200_000,), 3.0)
    out = dare([x], TensorContext("big"), p=0.9)
    kept = out != 0
    frac = kept.float().mean().item()
    assert abs(frac - 0.1) < 6 * math.sqrt(0.09 / 200_000)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 30.0))


def _names():
    return [f"model.layers.{i}.mlp.weight" for i in range(6)]


@pytest.mark.parametrize("kernel, options", [(dare, {"p": 0.5, "seed": 4}), (random_like, {"seed": 4})])
def test_results_do_not_depend_on_processing_order(kernel, options):
    g = torch.Generator().manual_seed(0)
    data = {name: torch.randn(8, 8, generator=g) for name in _names()}
    forward = {n: kernel([data[n]], TensorContext(n), **options) for n in _names()}
    backward = {n: kernel([data[n]], TensorContext(n), **options) for n in reversed(_names())}
    for n in _names():
        assert torch.equal(forward[n], backward[n])
    # different tensor names and different seeds give different draws
    a = kernel([data[_names()[0]]], TensorContext("a"), **options)
    b = kernel([data[_names()[0]]], TensorContext("b"), **options)
    assert not torch.equal(a, b)
    c = kernel([data[_names()[0]]], TensorContext("a"), **{**options, "seed": 5})
    assert not torch.equal(a, c)


def test_random_like_matches_norm():
    x = torch.randn(30, 20) * 7
    out = random_like([x], TensorContext("w"), seed=1)
    assert math.isclose(out.norm().item(), x.norm().item(), rel_tol=1e-5)
    assert abs(torch.nn.functional.cosine_similarity(out.view(-1), x.view(-1), dim=0).item()) < 0.2
    assert torch.equal(random_like([torch.zeros(4)], TensorContext("w")), torch.zeros(4))
    half = random_like([x.half()], TensorContext("w"), seed=1)
    assert half.dtype == torch.float16


def test_della_sample_probabilities_hand_computed():
    # one row, |x| ascending ranks: .1 -> 0, .3 -> 1, .5 -> 2, 1 -> 3, 2 -> 4
    # density .5, epsilon .2: p = .3 + .4 * rank / 4
    # the words for ('w', seed 0) are 2800579674 2107414477 433079038 156013486 ... (as dare's);
    # / 2**32: .652 .491 .101 .036 .987: kept where u < p: entries 1 (.491 < .5), 2 (.101 < .4), 3 (.036 < .7)
    import numpy

    x = T([0.1, -0.5, 0.3, 2.0, -1.0])
    bits = numpy.random.PCG64(seed_for(0, "w"))
    words = numpy.random.PCG64(seed_for(0, "w")).random_raw(3).view(numpy.uint32)[:5]
    u = torch.from_numpy(words.astype(numpy.float64)) / 2**32
    assert [round(v, 3) for v in u.tolist()] == [0.652, 0.491, 0.101, 0.036, 0.987]
    prob = T([0.0, 2.0, 1.0, 4.0, 3.0]) * (0.4 / 4) + 0.3  # in float32, as the kernel
    out = della_sample(x, 0.5, 0.2, bits, True, torch.empty(5))
    assert torch.equal(out, torch.where(u < prob.double(), x / prob, torch.zeros(5)))
    assert torch.allclose(out, T([0.0, -1.0, 0.3 / 0.4, 2.0 / 0.7, 0.0]))
    bits = numpy.random.PCG64(seed_for(0, "w"))
    assert torch.equal(della_sample(x, 0.5, 0.2, bits, False, torch.empty(5)), T([0.0, -0.5, 0.3, 2.0, 0.0]))


def test_della_sample_rows_and_edges():
    import numpy

    bits = numpy.random.PCG64(0)
    x = T([[1.0, 2.0], [3.0, -4.0]])
    assert torch.equal(della_sample(x, 1.0, 0.1, bits, True, torch.empty(2, 2)), x)
    assert torch.equal(della_sample(x, 0.0, 0.1, bits, True, torch.empty(2, 2)), torch.zeros(2, 2))
    # epsilon 0: every entry kept with probability density, rescaled by 1/density
    out = della_sample(torch.ones(100_000), 0.25, 0.0, bits, True, torch.empty(100_000))
    assert set(out.unique().tolist()) <= {0.0, 4.0}
    assert abs((out != 0).float().mean().item() - 0.25) < 0.01
    # one-entry rows get probability density
    col = della_sample(torch.ones(50_000, 1), 0.5, 0.3, bits, False, torch.empty(50_000, 1))
    assert abs(col.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("shape", [(1, 7), (5, 9), (3, 1), (64, 33), (4, 2), (3, 64), (2, 65), (1, 5000)])
def test_della_rank_order_matches_a_stable_row_argsort(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x[0, 0] = -x[0, -1]  # equal magnitudes: ranked by position
    if shape[1] >= 8:  # zeros of both signs, infinities, a NaN, runs of one value
        x[-1, 1:8] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 0.0, -math.inf])
        x[0, 2::3] = 0.25
    for rows in (x, x.double()):
        assert torch.equal(rank_order(rows), torch.argsort(rows.abs(), dim=1, stable=True))


@pytest.mark.parametrize("shape", [(2, 40), (7, 33), (64, 33)])
def test_della_rank_order_split_between_two_threads_is_the_same(monkeypatch, shape):
    """Blocks of at least SPLIT_SORT entries sort half their rows on a helper thread."""
    from tvlang.ops import della as della_module

    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    x[:, ::4] = 0.5  # ties in every row: ranked by position
    x[-1, :3] = torch.tensor([math.inf, -0.0, math.nan])
    submitted = []
    real = della_module._sort_thread

    def counting():
        pool = real()
        return type("P", (), {"submit": lambda self, *a: submitted.append(1) or pool.submit(*a)})()

    monkeypatch.setattr(della_module, "_sort_thread", counting)
    monkeypatch.setattr(della_module, "SPLIT_SORT", 10)
    split = rank_order(x)
    assert submitted == [1]
    monkeypatch.setattr(della_module, "SPLIT_SORT", 10**9)
    assert torch.equal(split, rank_order(x))
    assert submitted == [1]  # the second sorted on this thread alone
    assert torch.equal(split, torch.argsort(x.abs(), dim=1, stable=True))


@pytest.mark.parametrize("piece", [1, 5, 64, 100, 1000])
def test_dropper_in_pieces_equals_dare_on_the_whole_tensor(monkeypatch, piece):
    """The mask is drawn in blocks counted from the tensor's start, whatever the pieces."""
    from tvlang.ops import dare as dare_module

    monkeypatch.setattr(dare_module, "CHUNK", 64)  # blocks of 64: pieces cross block ends
    x = torch.randn(10, 100, generator=torch.Generator().manual_seed(1))
    ctx = TensorContext("model.layers.0.mlp.weight")
    want = dare([x], ctx, p=0.6, seed=3)
    # hand-rolled: 32 words per block of 64 entries (the last block: 20 words for 40 entries),
    # low half of each 64-bit word first; r >= ceil(p * 2**32) kept and scaled by 1/(1-p)
    import numpy

    bits = numpy.random.PCG64(seed_for(3, "model.layers.0.mlp.weight"))
    raw = numpy.concatenate([bits.random_raw(min(32, (1000 - s) // 2)) for s in range(0, 1000, 64)])
    r = torch.tensor(numpy.stack([raw & 0xFFFFFFFF, raw >> 32], axis=1).reshape(-1).astype(numpy.int64))
    assert r.numel() == 1000
    kept = r >= math.ceil(0.6 * 2**32)
    assert torch.allclose(want.reshape(-1), torch.where(kept, x.reshape(-1) / 0.4, 0.0), rtol=1e-6, atol=0)
    from tvlang.ops.chunks import dare_chunks

    kernel = dare_chunks(ctx, x.numel(), 1, x.dtype, p=0.6, seed=3)
    flat, out = x.reshape(-1), torch.empty(1000)
    for start in range(0, 1000, piece):
        kernel.apply([flat[start:start + piece]], out[start:start + piece])
    assert torch.equal(out, want.reshape(-1))
    with pytest.raises(ValueError, match="dare: 1001 entries handed over, the tensor has 1000"):
        kernel.apply([torch.ones(1)], torch.empty(1))
    kernel.restart()  # from the first entry again: the same mask
    kernel.apply([flat], out)
    assert torch.equal(out, want.reshape(-1))
