"""The geometric merges: multislerp, karcher, nuslerp, nearswap and model_stock(filter_wise).

Three kinds of check: small cases computed by hand; the kernels against mergekit 0.1.5's own
merge methods on random tensors (skipped without mergekit); and the optimized, streamed
pipeline (whole tensors and chunks of a few entries) against a naive eager evaluation that
spells each method out with torch vector operations, as mergekit writes it.
"""

from __future__ import annotations

import math

import pytest
import torch

import tvlang
from chunking import chunk_in
from tvlang.errors import TvlangError
from tvlang.ops.context import TensorContext
from tvlang.ops.nearswap import nearswap
from tvlang.ops.nuslerp import nuslerp
from tvlang.ops.sphere import karcher, multislerp
from tvlang.ops.stock import model_stock

CTX = TensorContext("w")
T = torch.tensor
R2 = math.sqrt(0.5)


def close(got: torch.Tensor, want, atol: float = 1e-6) -> None:
    want = want if isinstance(want, torch.Tensor) else torch.tensor(want, dtype=got.dtype)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=atol)


# -- by hand ------------------------------------------------------------------------------------

def test_multislerp_by_hand():
    # Orthogonal directions, equal weights: direction (1, 1)/sqrt(2), norm the mean norm (1 + 3)/2.
    close(multislerp([T([1.0, 0.0]), T([0.0, 3.0])], CTX), [2 * R2, 2 * R2])
    # Weights 3:1 normalized to 0.75, 0.25: direction (3, 1)/sqrt(10), norm 0.75*2 + 0.25*1.
    direction = T([3.0, 1.0]) / math.sqrt(10)
    close(multislerp([T([2.0, 0.0]), T([0.0, 1.0])], CTX, weights=[3, 1]), 1.75 * direction)
    # Not normalized: the same direction, norm 3*2 + 1*1.
    close(multislerp([T([2.0, 0.0]), T([0.0, 1.0])], CTX, weights=[3, 1], normalize_weights=False), 7 * direction)
    # One input: itself, whatever its weight.
    close(multislerp([T([2.0, -1.0])], CTX, weights=[0.1]), [2.0, -1.0])
    # Two opposite directions that balance out: mergekit's fallback, the weighted sum.
    close(multislerp([T([1.0, 0.0]), T([-3.0, 0.0])], CTX), [-1.0, 0.0])


def test_multislerp_with_balanced_directions_is_an_error_naming_the_tensor():
    vectors = [T([1.0, 0.0]), T([-1.0, 0.0]), T([0.0, 1.0]), T([0.0, -1.0])]
    with pytest.raises(TvlangError, match="weighted mean of the inputs' directions is zero") as caught:
        multislerp(vectors, TensorContext("layers.0.w"))
    assert caught.value.tensor == "layers.0.w"


def test_karcher_by_hand():
    # On a circle the Karcher mean is the weighted mean angle: 0 and 90 degrees at 3:1 -> 22.5
    # degrees (the normalized mean of the two would be at 18.4 degrees), norm 0.75*1 + 0.25*1.
    angle = math.radians(22.5)
    close(karcher([T([1.0, 0.0]), T([0.0, 1.0])], CTX, weights=[0.75, 0.25]), [math.cos(angle), math.sin(angle)])
    # No step: the normalized weighted mean of the directions.
    close(karcher([T([1.0, 0.0]), T([0.0, 1.0])], CTX, weights=[0.75, 0.25], max_iter=0),
          T([3.0, 1.0]) / math.sqrt(10))
    # Equal weights (1/n each): by symmetry (1, 1, 1)/sqrt(3), scaled by the mean norm 2.
    eye = [T([2.0, 0.0, 0.0]), T([0.0, 2.0, 0.0]), T([0.0, 0.0, 2.0])]
    close(karcher(eye, CTX), T([2.0, 2.0, 2.0]) / math.sqrt(3))
    # A zero tensor takes no part in the direction, but counts in the norm: 0.5*0 + 0.5*2.
    close(karcher([T([0.0, 0.0]), T([0.0, 2.0])], CTX), [0.0, 1.0])
    close(karcher([T([0.0, 0.0]), T([0.0, 0.0])], CTX), [0.0, 0.0])


def test_nuslerp_by_hand():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    close(nuslerp([a, b], CTX, t=0.5), [R2, R2])
    close(nuslerp([a, b], CTX, t=0.0), [1.0, 0.0])
    close(nuslerp([a, b], CTX, t=1.0), [0.0, 1.0])
    # A zero vector has no direction: mergekit's formula treats it as orthogonal (sin(pi/4)*b).
    close(nuslerp([T([0.0, 0.0]), T([0.0, 2.0])], CTX, t=0.5), [0.0, 2 * R2])
    # Colinear: linear.
    close(nuslerp([T([1.0, 1.0]), T([2.0, 2.0])], CTX, t=0.25), [1.25, 1.25])
    # Rows: row 0 orthogonal, row 1 colinear.
    rows_a, rows_b = T([[1.0, 0.0], [1.0, 1.0]]), T([[0.0, 1.0], [2.0, 2.0]])
    close(nuslerp([rows_a, rows_b], CTX, t=0.5, flatten=False), [[R2, R2], [1.5, 1.5]])
    # Columns (row_wise): the same vectors, transposed.
    close(nuslerp([rows_a.T, rows_b.T], CTX, t=0.5, flatten=False, row_wise=True), [[R2, 1.5], [R2, 1.5]])
    # flatten wins over row_wise, as in mergekit; a 1-D tensor is one vector either way.
    assert torch.equal(nuslerp([rows_a, rows_b], CTX, t=0.3, row_wise=True), nuslerp([rows_a, rows_b], CTX, t=0.3))
    assert torch.equal(nuslerp([a, b], CTX, t=0.3, flatten=False, row_wise=True), nuslerp([a, b], CTX, t=0.3))


def test_nearswap_by_hand():
    base, other = T([0.0, 0.0, 0.0, 1.0]), T([0.05, 0.2, -1.0, 1.0])
    # |diff| 0.05 <= t: other's value; 0.2: moved by 0.1/0.2; 1.0: by 0.1/1; equal entries stay.
    close(nearswap([base, other], CTX, t=0.1), [0.05, 0.1, -0.1, 1.0])
    assert torch.equal(nearswap([base, other], CTX, t=0.0), base)
    assert torch.equal(nearswap([base, other], CTX, t=5.0), other)


def test_model_stock_filter_wise_by_hand():
    base = torch.zeros(2, 2)
    first, second = T([[1.0, 0.0], [1.0, 0.0]]), T([[1.0, 1.0], [-1.0, 0.0]])
    # Row 0: cos 1/sqrt(2), t = 2c/(1 + c) = 0.8284 of the mean (1, 0.5); row 1: cos -1 -> clamped
    # to 0 -> the base row.
    t = 2 * R2 / (1 + R2)
    close(model_stock([base, first, second], CTX, filter_wise=True), [[t, t / 2], [0.0, 0.0]])
    # Tensor-wise, the two rows share one cosine (here 1/sqrt(2) * 1/sqrt(2)... of the flattened
    # offsets: (1, 0, 1, 0) . (1, 1, -1, 0) = 0 -> t = 0 -> the base).
    close(model_stock([base, first, second], CTX), [[0.0, 0.0], [0.0, 0.0]])
    # A 1-D tensor is one vector: filter_wise changes nothing.
    vectors = [T([0.0, 0.0]), T([1.0, 0.0]), T([1.0, 1.0])]
    assert torch.equal(model_stock(vectors, CTX, filter_wise=True), model_stock(vectors, CTX))


def test_bad_options_are_errors_naming_the_operator():
    with pytest.raises(TvlangError, match="multislerp: option 'weights' has 3 values for 2 inputs"):
        tvlang.compile("multislerp(a, b, weights=[1, 2, 3])")
    with pytest.raises(TvlangError, match="multislerp: normalize_weights divides by the sum of the weights"):
        tvlang.compile("multislerp(a, b, weights=[1, -1])")
    with pytest.raises(TvlangError, match=r"argument 'max_iter' of karcher\(\) must be a whole number"):
        tvlang.compile("karcher(a, b, max_iter=2.5)")
    with pytest.raises(TvlangError, match=r"nearswap: option 't' must be in \[0, inf\]"):
        tvlang.compile("nearswap(a, b, -1)")


# -- the naive eager references: mergekit's formulas, with torch vector operations -------------

def eager_multislerp(xs, weights, normalize=True, eps=1e-8):
    if len(xs) == 1:
        return xs[0]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    flat = torch.stack([x.double().reshape(-1) for x in xs])
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units @ mean)[:, None] * mean
    tangent = (tangents * w[:, None]).sum(0)
    length = tangent.norm() + eps
    result = mean * torch.cos(length) + tangent * torch.sin(length) / length
    return (result * (norms.squeeze(-1) * w).sum()).reshape(xs[0].shape)


def eager_karcher(xs, max_iter=10, tol=1e-5):
    flat = [x.double().reshape(-1) for x in xs]
    alphas = [1 / len(xs)] * len(xs)
    norms = [f.norm() for f in flat]
    units = [f / n for f, n in zip(flat, norms)]
    mean = sum(a * u for a, u in zip(alphas, units))
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            dot = torch.clamp(mean @ u, -1, 1)
            theta = torch.arccos(dot)
            if theta < tol:
                continue
            tangent += a * theta / torch.sin(theta) * (u - dot * mean)
        length = tangent.norm()
        if length < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * tangent / length
        mean = mean / mean.norm()
    return (sum(a * n for a, n in zip(alphas, norms)) * mean).reshape(xs[0].shape)


def eager_nuslerp(a, b, t, flatten=True, row_wise=False):
    v0, v1 = a.double(), b.double()
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    n0 = v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos(((v0 / n0) * (v1 / n1)).sum(-1, keepdim=True).clamp(-1, 1))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(a.shape)


def eager_nearswap(a, b, t):
    a, b = a.double(), b.double()
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * b + (1 - weight) * a


NAMES = ["model.embed.weight", "model.layers.0.mlp.weight", "model.layers.1.attn.weight", "model.norm.weight"]
SHAPES = [(6, 4), (5, 7), (3, 4, 5), (9,)]


def models(count: int = 4):
    g = torch.Generator().manual_seed(11)
    pre = {n: torch.randn(s, generator=g) for n, s in zip(NAMES, SHAPES)}
    shared = {n: torch.randn(s, generator=g) * 0.3 for n, s in zip(NAMES, SHAPES)}
    out = [pre]
    for _ in range(count - 1):
        out.append({n: pre[n] + shared[n] + torch.randn(s, generator=g) * 0.3 for n, s in zip(NAMES, SHAPES)})
    return out


CASES = [
    ("pre + multislerp(a - pre, b - pre, c - pre, weights=[0.5, 0.3, 0.2])",
     lambda p, a, b, c: p + eager_multislerp([a - p, b - p, c - p], [0.5, 0.3, 0.2])),
    ("multislerp(a, b, c, weights=[1, 2, 0.5], normalize_weights=false, eps=1e-6)",
     lambda p, a, b, c: eager_multislerp([a, b, c], [1, 2, 0.5], normalize=False, eps=1e-6)),
    ("karcher(pre, a, b, c)", lambda p, a, b, c: eager_karcher([p, a, b, c])),
    ("karcher(a - pre, b - pre, max_iter=30, tol=1e-9)",
     lambda p, a, b, c: eager_karcher([a - p, b - p], max_iter=30, tol=1e-9)),
    ("pre + nuslerp(a - pre, b - pre, 0.3)", lambda p, a, b, c: p + eager_nuslerp(a - p, b - p, 0.3)),
    ("nuslerp(a, c, 0.7, flatten=false)", lambda p, a, b, c: eager_nuslerp(a, c, 0.7, flatten=False)),
    ("nuslerp(a, c, 0.7, flatten=false, row_wise=true)",
     lambda p, a, b, c: eager_nuslerp(a, c, 0.7, flatten=False, row_wise=True)),
    ("nearswap(pre, a, 0.2) - pre", lambda p, a, b, c: eager_nearswap(p, a, 0.2) - p),
]




@pytest.mark.parametrize("recipe, eager", CASES, ids=[c[0] for c in CASES])
def test_streamed_result_equals_the_eager_computation(recipe, eager, monkeypatch):
    pre, a, b, c = models()
    binds = {"pre": pre, "a": a, "b": b, "c": c}
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    for name in NAMES:
        want = eager(pre[name], a[name], b[name], c[name]).float()
        close(whole[name], want, atol=2e-6)
    chunked_names = chunk_in(monkeypatch, 7)
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    if "row_wise=true" in recipe:  # per column: whole tensors, but a vector is one column
        assert chunked_names == ["model.norm.weight"]
    else:  # per row: chunks of whole rows (one row of 4, of 7, of 5 entries)
        assert chunked_names == NAMES, "every tensor ran in chunks of 7 entries"
    for name in NAMES:
        close(chunked[name], whole[name], atol=1e-6)
        if "flatten=false" in recipe:  # each row on its own: the same bits
            assert torch.equal(chunked[name], whole[name]), name


def test_a_gram_merge_streams_to_disk(tmp_path):
    pre, a, b, c = models()
    plan = tvlang.compile("pre + multislerp(a - pre, b - pre, weights=[0.6, 0.4])")
    plan.run({"pre": pre, "a": a, "b": b}, str(tmp_path / "out.safetensors"))
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "out.safetensors"))
    for name in NAMES:
        close(written[name], (pre[name] + eager_multislerp([a[name] - pre[name], b[name] - pre[name]], [0.6, 0.4])))


# -- against mergekit's own kernels -----------------------------------------------------------

@pytest.fixture(scope="module")
def mk():
    pytest.importorskip("mergekit")
    import importlib

    from mergekit.merge_methods.base import TensorGroup

    # The package binds each method's name to the method object, which hides the module.
    mk_karcher, mk_stock, mk_multislerp, mk_nearswap, mk_nuslerp = (
        importlib.import_module(f"mergekit.merge_methods.{name}")
        for name in ("karcher", "model_stock", "multislerp", "nearswap", "nuslerp"))

    def run(method, tensors, base_index=None, **parameters):
        group = TensorGroup.from_tensors(tensors, base_index=base_index)
        return method([group], parameters=parameters)[0]

    return {
        "run": run, "multislerp": mk_multislerp.multislerp, "karcher": mk_karcher.karcher_merge_method,
        "karcher_tensors": mk_karcher.karcher_merge_tensors, "nuslerp": mk_nuslerp.nuslerp_merge_method,
        "nearswap": mk_nearswap.nearswap_merge, "model_stock": mk_stock.model_stock_merge_method,
    }


@pytest.mark.parametrize("shape", [(6, 4), (16,), (3, 4, 5)])
def test_kernels_equal_mergekit(mk, shape):
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g) * 0.05
    # A shared direction: every row's task vectors have a positive mean cosine (where it is
    # negative, model_stock returns the base row: docs/mergekit.md).
    xs = [base + shared + torch.randn(shape, generator=g) * 0.02 for _ in range(3)]
    run = mk["run"]
    deltas = [x - base for x in xs]

    want = run(mk["multislerp"], [base, *xs], base_index=0, weight=[0.5, 0.2, 0.3])
    close(base + multislerp(deltas, CTX, weights=[0.5, 0.2, 0.3]), want)
    want = run(mk["multislerp"], xs, weight=[1.0, 2.0, 0.5], normalize_weights=False, eps=1e-6)
    close(multislerp(xs, CTX, weights=[1.0, 2.0, 0.5], normalize_weights=False, eps=1e-6), want)

    close(karcher([base, *xs], CTX), run(mk["karcher"], [base, *xs]))
    close(karcher(deltas, CTX, max_iter=3, tol=1e-7), run(mk["karcher"], deltas, max_iter=3, tol=1e-7))
    want = mk["karcher_tensors"](deltas, [0.2, 0.5, 0.3], max_iter=10, tol=1e-5)
    close(karcher(deltas, CTX, weights=[0.2, 0.5, 0.3]), want)

    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        options = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
        want = run(mk["nuslerp"], [base, xs[0], xs[1]], base_index=0, weight=[0.4, 0.6], **options)
        close(base + nuslerp(deltas[:2], CTX, t=0.6, flatten=flatten, row_wise=row_wise), want)
        want = run(mk["nuslerp"], xs[:2], weight=[0.4, 0.6], **options)
        close(nuslerp(xs[:2], CTX, t=0.6, flatten=flatten, row_wise=row_wise), want)

    # The same float32 operations in the same order: equal bit for bit.
    assert torch.equal(nearswap([base, xs[0]], CTX, t=0.05), run(mk["nearswap"], [base, xs[0]], base_index=0, t=0.05))

    for filter_wise in (False, True):
        want = run(mk["model_stock"], [base, *xs], base_index=0, filter_wise=filter_wise)
        close(model_stock([base, *xs], CTX, filter_wise=filter_wise), want)
