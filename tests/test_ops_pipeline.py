"""The operators through the whole pipeline (compile -> plan -> streaming evaluation)."""

import pytest
import torch

from chunking import chunk_in as _chunk_in

tvlang = pytest.importorskip("tvlang")
if not hasattr(tvlang, "compile"):  # pragma: no cover - the API lands separately
    pytest.skip("tvlang.compile not available", allow_module_level=True)

NAMES = ["model.embed.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.norm.weight"]


def _models():
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (5, 5), (5, 5), (7,)]
    pre = {n: torch.randn(s, generator=g) for n, s in zip(NAMES, shapes)}
    fts = [{n: pre[n] + torch.randn(s, generator=g) * (i + 1) for n, s in zip(NAMES, shapes)} for i in range(2)]
    return pre, fts


def test_ties_model_scope_trims_over_the_whole_model():
    pre, (a, b) = _models()
    plan = tvlang.compile('ties(a - pre, b - pre, density=0.3, scope="model")')
    out = plan.evaluate({"pre": pre, "a": a, "b": b})
    deltas = [{n: m[n] - pre[n] for n in NAMES} for m in (a, b)]
    trimmed = []
    for d in deltas:
        flat = torch.cat([d[n].reshape(-1) for n in NAMES]).abs()
        k = int(0.3 * flat.numel())
        t = torch.sort(flat, descending=True).values[k - 1]
        trimmed.append({n: torch.where(d[n].abs() >= t, d[n], 0.0) for n in NAMES})
    for n in NAMES:
        x, y = trimmed[0][n], trimmed[1][n]
        s = torch.where(x + y >= 0, 1.0, -1.0)
        agree_x, agree_y = (x * s > 0).float(), (y * s > 0).float()
        want = (x * agree_x + y * agree_y) / torch.clamp(agree_x + agree_y, min=1)
        assert torch.allclose(out[n], want, atol=1e-6), n
    kept = sum(int(torch.count_nonzero(trimmed[0][n])) for n in NAMES)
    assert kept == int(0.3 * sum(pre[n].numel() for n in NAMES))


def test_schedule_and_select_through_the_pipeline():
    pre, (a, _) = _models()
    out = tvlang.compile('schedule(a - pre, [0, 1])').evaluate({"pre": pre, "a": a})
    assert torch.allclose(out["model.layers.0.mlp.weight"], torch.zeros(5, 5))
    layer_1 = "model.layers.1.mlp.weight"
    assert torch.allclose(out[layer_1], a[layer_1] - pre[layer_1])
    assert torch.allclose(out["model.embed.weight"], a["model.embed.weight"] - pre["model.embed.weight"])
    out = tvlang.compile('select(a - pre, "*.layers.*")').evaluate({"pre": pre, "a": a})
    assert torch.equal(out["model.norm.weight"], torch.zeros(7))




def test_elementwise_kernels_in_chunked_programs_equal_whole_tensor_kernels(monkeypatch):
    """dare, select, pick and schedule run inside the evaluator's chunked programs (pieces of 7
    entries, dare's blocks of 5): the results equal the kernels called on whole tensors."""
    from tvlang.ops import dare as dare_module
    from tvlang.ops.context import TensorContext
    from tvlang.ops.dare import dare
    from tvlang.ops.select import pick, schedule, select

    pre, (a, b) = _models()
    recipe = ('pre + dare(a - pre, 0.5, seed=1) + 0.5*select(b - pre, "*.layers.*") + schedule(b - pre, [0, 1])'
              ' + pick("*.norm.*", a - pre, b - pre)')
    binds = {"pre": pre, "a": a, "b": b}
    monkeypatch.setattr(dare_module, "CHUNK", 5)
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    chunked_calls = _chunk_in(monkeypatch, 7)
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    assert chunked_calls == NAMES  # every tensor (7 entries or more) ran in chunks
    for n in NAMES:
        ctx = TensorContext(n, num_layers=2)
        d_a, d_b = a[n] - pre[n], b[n] - pre[n]
        want = (pre[n] + dare([d_a], ctx, p=0.5, seed=1) + 0.5 * select([d_b], ctx, pattern="*.layers.*")
                + schedule([d_b], ctx, values=[0.0, 1.0]) + pick([d_a, d_b], ctx, pattern="*.norm.*"))
        assert torch.allclose(whole[n], want, atol=1e-6), n
        assert torch.allclose(chunked[n], want, atol=1e-6), n
    run_chunked = {}
    out = tvlang.compile(recipe)
    for name, tensor in out.stream(binds):
        run_chunked[name] = tensor
    assert all(torch.equal(run_chunked[n], chunked[n]) for n in NAMES)


CHUNKED_RECIPES = [
    "pre + ties(a - pre, b - pre, c - pre, density=0.3)",
    'pre + ties(0.4*(a - pre), 0.6*(b - pre), density=0.5, elect="frequency", merge="sum")',
    'ties(a - pre, b - pre, density=0.2, weights=[0.3, 0.7], merge="weighted_mean", elect_on="unweighted")',
    'pre + ties(a - pre, b - pre, density=0.25, scope="model")',
    "ties(a - pre, b - pre, density=0) + ties(a - pre, c - pre, density=1)",
    "topk(a - pre, 0.1) + topk(b - pre, 0) + topk(c - pre, 1)",
    'topk(a - pre, 0.3, scope="model")',
    "breadcrumbs(a - pre, 0.3, 0.05) + breadcrumbs(b - pre, 0.9, 0.2) + breadcrumbs(c - pre, 0.5, 0)",
    "pre + dare_ties(a - pre, b - pre, c - pre, p=0.5, seed=4)",
    'pre + 0.5*dare_ties(a - pre, b - pre, p=0.3, merge="sum", rescale=false)',
    "ties(dare(a - pre, 0.5, seed=1), dare(b - pre, 0.5, seed=2), density=0.4)",
]


def _quantized_models(quantized: bool = True):
    """Deltas on a grid of quarter steps, so many magnitudes tie at every threshold (or,
    not ``quantized``, all distinct); one all-zero tensor and one of a single entry."""
    g = torch.Generator().manual_seed(11)
    shapes = {"model.embed.weight": (30, 20), "model.layers.0.mlp.weight": (17, 13),
              "model.layers.1.mlp.weight": (9, 40), "model.layers.1.zero.weight": (8, 8), "model.one.weight": (1,)}
    pre = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [pre]
    for i in range(3):
        step = (lambda d: torch.round(d * 3) / 4) if quantized else (lambda d: d)
        ft = {n: pre[n] + step(torch.randn(s, generator=g)) for n, s in shapes.items()}
        ft["model.layers.1.zero.weight"] = pre["model.layers.1.zero.weight"].clone()
        models.append(ft)
    return dict(zip(("pre", "a", "b", "c"), models))


@pytest.mark.parametrize("quantized", [True, False], ids=["ties", "distinct"])
@pytest.mark.parametrize("recipe", CHUNKED_RECIPES)
def test_threshold_kernels_in_chunked_programs_equal_whole_tensor_kernels(monkeypatch, recipe, quantized):
    """ties, topk, breadcrumbs and dare_ties in chunked programs (chunks of 64 entries, thresholds
    found by radix select over the chunks in two passes) give exactly the whole-tensor kernels'
    results, ties at the threshold and edge densities included."""
    from tvlang.ops import dare as dare_module

    binds = _quantized_models(quantized)
    monkeypatch.setattr(dare_module, "CHUNK", 10)
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    chunked_names = _chunk_in(monkeypatch, 64)
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    assert sorted(chunked_names) == sorted(n for n, t in binds["pre"].items() if t.numel() >= 7)
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name


def test_nested_threshold_kernels_run_whole(monkeypatch):
    """ties over topk's result cannot be chunked (topk has no result while ties looks at its input):
    the program runs on whole tensors, with the same result."""
    from tvlang.run import chunked as chunk_module
    from tvlang.run import evaluate

    binds = _quantized_models()
    recipe = "ties(topk(a - pre, 0.5), b - pre, density=0.5)"
    whole = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    monkeypatch.setattr(chunk_module, "CHUNK_MIN", 7)
    monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(evaluate.Session, "_execute_chunked", None)  # would fail if called
    chunked = tvlang.compile(recipe).evaluate(binds, allow_unused=True)
    assert all(torch.equal(chunked[n], whole[n]) for n in whole)
    f64 = tvlang.compile("ties(a - pre, b - pre, density=0.5)").evaluate(binds, dtype="float64", allow_unused=True)
    assert f64["model.embed.weight"].dtype == torch.float32  # float64 compute runs whole (exact float64 thresholds)
