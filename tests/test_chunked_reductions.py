"""Reduction passes in chunks (issue 19): the whole-model scalars (norm, dot, cos, scope="model"
thresholds) are fed chunk by chunk, and give exactly the numbers of a whole-tensor pass, so the
results do not change; the scalars equal a naive eager computation."""

from __future__ import annotations

import math

import pytest
import torch

import tvlang
from tvlang.run import chunked as chunk_module
from tvlang.run import session as session_module

SHAPES = {"emb": (13, 11), "w": (6, 5, 4), "bias": (9,), "tiny": (3,)}
NAMES = list(SHAPES)


def models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    out = [pre]
    for scale in (1.0, 3.0, 0.01):
        out.append({n: pre[n] + scale * torch.randn(s, generator=g).bfloat16().float() for n, s in SHAPES.items()})
    pre, a, b, c = out
    return {"pre": pre, "a": a, "b": b, "c": c}


def chunk_in(monkeypatch, elements: int) -> list[tuple[str, bool]]:
    """Tensors of 7 entries or more run in chunks of ``elements``; the list gets (tensor name,
    whether it was a reduction pass) for each tensor computed in chunks."""
    seen: list[tuple[str, bool]] = []
    real = session_module.execute_chunked

    def spy(session, program, linear, name, raw, kernels, *, pieces, feed=None):
        seen.append((name, feed is not None))
        return real(session, program, linear, name, raw, kernels, pieces=pieces, feed=feed)

    monkeypatch.setattr(session_module, "execute_chunked", spy)
    monkeypatch.setattr(chunk_module, "CHUNK_MIN", 7)
    monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", elements)
    return seen


RECIPES = [
    "pre + (1/norm(a - pre))*(a - pre)",
    "pre + (dot(a - pre, b - pre)/(norm(b - pre)*norm(b - pre)))*(b - pre)",
    "pre + cos(a - pre, c - pre)*(c - pre) + cos(a, b)*(b - pre)",
    "pre + ties(a - pre, b - pre, density=0.3, scope=\"model\")",
    "pre + topk(c - pre, 0.2, scope=\"model\") + 0.1*norm(ties(a - pre, b - pre, density=0.5))*(a - pre)",
]


@pytest.mark.parametrize("elements", [4, 37])
@pytest.mark.parametrize("recipe", RECIPES)
def test_reduction_passes_in_chunks_give_the_same_results(monkeypatch, recipe, elements):
    bound = models(1)
    whole = tvlang.compile(recipe).evaluate(bound, allow_unused=True)
    seen = chunk_in(monkeypatch, elements)
    chunked = tvlang.compile(recipe).evaluate(bound, allow_unused=True)
    reduced = {name for name, reduction in seen if reduction}
    assert reduced == {"emb", "w", "bias"}, "every tensor of 7 entries or more fed its reducers in chunks"
    for name in NAMES:
        assert torch.equal(chunked[name], whole[name]), name


def test_scalars_equal_a_naive_eager_computation(monkeypatch):
    bound = models(2)
    pre, a, b = bound["pre"], bound["a"], bound["b"]
    da = torch.cat([(a[n] - pre[n]).double().reshape(-1) for n in NAMES])
    db = torch.cat([(b[n] - pre[n]).double().reshape(-1) for n in NAMES])
    chunk_in(monkeypatch, 5)
    def scalar(expr):
        return tvlang.compile(expr).scalar(bound, allow_unused=True)

    assert math.isclose(scalar("norm(a - pre)"), float(da.norm()), rel_tol=1e-12)
    # (the optimizer may expand dot and cos over the differences: float32 rounding of a, b, pre)
    assert math.isclose(scalar("dot(a - pre, b - pre)"), float(da @ db), rel_tol=1e-6)
    assert math.isclose(tvlang.compile("cos(a - pre, b - pre)").scalar(bound, allow_unused=True),
                        float(da @ db / (da.norm() * db.norm())), rel_tol=1e-6)
    # the model-wide threshold: the k-th largest |x| over every tensor, k = floor(0.3 * 170)
    out = tvlang.compile("topk(a - pre, 0.3, scope=\"model\")").evaluate(bound, allow_unused=True)
    t = float(torch.sort(da.float().abs(), descending=True).values[math.floor(0.3 * da.numel()) - 1])
    for n in NAMES:
        d = a[n] - pre[n]
        assert torch.equal(out[n], torch.where(d.abs() >= t, d, torch.zeros_like(d))), n


def test_a_reducer_sees_a_tensor_whole_or_in_pieces_alike():
    from tvlang.ops.context import TensorContext
    from tvlang.ops.reduce import CosReducer

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40_000, generator=g) * 1e3, torch.randn(40_000, generator=g)
    values = set()
    for cut in (1 << 20, 7, 16_384, 10_000):
        r = CosReducer()
        for name in ("u", "v"):
            for start in range(0, x.numel(), cut):
                r.update(0, [x[start:start + cut], y[start:start + cut]], TensorContext(name))
        values.add(r.result())
    assert len(values) == 1
