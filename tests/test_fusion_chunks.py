"""arcee_fusion's chunk form (issue 19: no recipe holds a whole tensor): pieces of whole rows,
a sample of rows for the quartiles' windows, a pass for the rows' KL and the importances inside
the windows (two more, a radix select, where a window misses), then the fusion. The same
results as the whole-tensor kernel, exactly: at chunk ends, on bf16 inputs, with NaN and
infinities, and where a quartile falls among the negative importances (rows whose KL rounds
below 0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tvlang
from chunking import chunk_in
from tvlang.ops.context import TensorContext
from tvlang.ops.fusion import FusionPasses, arcee_fusion, arcee_fusion_chunks, fence, importance, quartile_ranks

# rows of 11, 4, 9, 40 and 50 entries ('v' a vector: one row); 'tiny' stays whole
SHAPES = {"emb": (13, 11), "w": (6, 5, 4), "bias": (9,), "row": (2, 40), "v": (50,), "tiny": (3,)}


def models(seed: int, bf16: bool = False) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    model = {n: base[n] + torch.randn(s, generator=g) * torch.rand(s, generator=g) ** 4 for n, s in SHAPES.items()}
    if bf16:
        base = {n: t.bfloat16() for n, t in base.items()}
        model = {n: t.bfloat16() for n, t in model.items()}
    return base, model


def naive(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """arcee_fusion from its definition: scores, a full sort, the fence, the mask."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    scores = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(scores.reshape(-1)).values
    n = ordered.numel()
    q1, q2, q3 = (ordered[int(torch.tensor(f) * (n - 1))] for f in (0.25, 0.5, 0.75))
    return base + (model - base) * (scores >= q2 + 1.5 * (q3 - q1))


def drive(form: FusionPasses, base: torch.Tensor, model: torch.Tensor, rows_per_piece: int,
          sample_rows: list[range] | None = None) -> torch.Tensor:
    """The evaluator's protocol by hand: a sample of the rows in ``sample_rows`` (none: an empty
    one), passes over pieces of whole rows (as many as the form says, after each pass), then the
    results."""
    m = form.row
    step = rows_per_piece * m
    flat_b, flat_m = base.reshape(-1), model.reshape(-1)
    for rows in sample_rows or []:
        form.sample([flat_b[rows.start * m:rows.stop * m], flat_m[rows.start * m:rows.stop * m]])
    form.end_sample()
    p = 0
    while p < form.passes:
        for start in range(0, flat_b.numel(), step):
            form.observe(p, [flat_b[start:start + step], flat_m[start:start + step]])
        form.end_pass(p)
        p += 1
    form.restart()
    out = torch.empty_like(flat_b)
    for start in range(0, flat_b.numel(), step):
        form.apply([flat_b[start:start + step], flat_m[start:start + step]], out[start:start + step])
    return out.view(base.shape)


def test_recipe_in_chunks_equals_the_whole_kernel_and_the_definition(monkeypatch):
    for bf16 in (False, True):
        base, model = models(3, bf16)
        bound = {"base": base, "model": model}
        whole = tvlang.compile("arcee_fusion(base, model)").evaluate(bound)
        for elements in (12, 37, 200):
            names = chunk_in(monkeypatch, elements)
            chunked = tvlang.compile("arcee_fusion(base, model)").evaluate(bound)
            # chunks are cut at row ends: a row longer than a chunk runs whole
            row = {"emb": 11, "w": 4, "bias": 9, "row": 40, "v": 50}
            assert names == [n for n, m in row.items() if m <= elements], (bf16, elements)
            for name in SHAPES:
                assert torch.equal(chunked[name], whole[name]), (bf16, elements, name)
        for name in SHAPES:  # computed in float32, written back in the inputs' dtype
            want = naive(base[name].float(), model[name].float()).to(base[name].dtype)
            assert torch.equal(whole[name], want), name


def test_fusion_in_a_larger_recipe_streams_and_agrees(monkeypatch):
    base, model = models(5)
    bound = {"base": base, "model": model}
    recipe = "0.5*arcee_fusion(base, 2*model - base) + 0.5*base"
    whole = tvlang.compile(recipe).evaluate(bound)
    names = chunk_in(monkeypatch, 37)
    chunked = tvlang.compile(recipe).evaluate(bound)
    assert names == ["emb", "w", "bias"]
    for name in SHAPES:
        assert torch.equal(chunked[name], whole[name]), name
        want = 0.5 * naive(base[name], 2 * model[name] - base[name]) + 0.5 * base[name]
        torch.testing.assert_close(chunked[name], want, rtol=0, atol=1e-6)


def negative_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Most rows shifted by a constant (the same softmax: a KL of a rounding error, either
    sign), a few changed for real."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 24, generator=g)
    shift = torch.randn(64, 1, generator=g)
    model = base + shift
    model[::9] += torch.randn(8, 24, generator=g)
    return base, model


def test_quartiles_among_negative_importances():
    seen_negative = False
    for seed in range(6):
        base, model = negative_rows(seed)
        scores = importance(model, base)
        form = arcee_fusion_chunks.__wrapped__(TensorContext("w", shape=tuple(base.shape)), base.numel(), 2,
                                               torch.float32)
        got = drive(form, base, model, rows_per_piece=5)
        negatives = int((scores < 0).sum())
        assert form.negative == negatives
        seen_negative = seen_negative or negatives > form.ranks[0]  # Q1 from the negated select
        assert torch.equal(form.threshold, fence(scores)), seed
        assert torch.equal(got, arcee_fusion([base, model], TensorContext("w"))), seed
        assert torch.equal(got, naive(base, model)), seed
    assert seen_negative  # the data does what this test is about


def test_nan_and_infinities_rank_as_in_the_sort():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(40, 16, generator=g)
    model = base + torch.randn(40, 16, generator=g)
    model[3, 2] = float("inf")  # that row's softmax: NaN, so NaN importances
    model[5, 1] = float("nan")
    base[9, 0] = float("-inf")
    scores = importance(model, base)
    assert scores.isnan().any()
    for rows in (1, 7, 40):
        form = arcee_fusion_chunks.__wrapped__(TensorContext("w", shape=(40, 16)), 640, 2, torch.float32)
        got = drive(form, base, model, rows)
        assert torch.equal(form.threshold, fence(scores)) or (form.threshold.isnan() and fence(scores).isnan())
        want = arcee_fusion([base, model], TensorContext("w"))
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), rows


def test_a_sampled_window_gives_the_quartiles_in_one_pass_and_misses_fall_back():
    """Rows sampled across the tensor: one pass before the fusion (the windows hold the quartiles);
    a sample of unlike rows (windows that miss): three passes; a quartile among negative
    importances: two. The same threshold and results as the whole kernel every way."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(3000, 40, generator=g)
    model = base + torch.randn(3000, 40, generator=g) * torch.rand(3000, 1, generator=g)
    scores = importance(model, base)
    want = arcee_fusion([base, model], TensorContext("w"))
    spread = [range(start, start + 20) for start in range(0, 3000, 200)]
    cases = [(spread, 1), ([range(0, 1)], 2), ([range(5, 8)] * 40, 3)]
    model_far = model.clone()
    model_far[:8] = base[:8] + 50 * torch.randn(8, 40, generator=g)  # unlike every other row
    for sample, passes in cases:
        pair = (base, model_far) if passes == 3 else (base, model)
        form = arcee_fusion_chunks.__wrapped__(TensorContext("w", shape=(3000, 40)), 120_000, 2, torch.float32)
        got = drive(form, *pair, rows_per_piece=37, sample_rows=sample)
        assert form.passes == passes, (sample, form.passes)  # (a one-row sample is too thin: the radix select)
        expected = want if passes != 3 else arcee_fusion([base, model_far], TensorContext("w"))
        assert torch.equal(got, expected)
        assert torch.equal(form.threshold, fence(scores if passes != 3 else importance(model_far, base)))
    for seed in range(6):  # negative quartiles beside a window
        base, model = negative_rows(seed)
        if int((importance(model, base) < 0).sum()) <= quartile_ranks(base.numel())[0]:
            continue
        form = arcee_fusion_chunks.__wrapped__(TensorContext("w", shape=tuple(base.shape)), base.numel(), 2,
                                               torch.float32)
        got = drive(form, base, model, rows_per_piece=5, sample_rows=[range(0, 64)])
        assert form.lower_wanted and form.passes == 2
        assert torch.equal(got, arcee_fusion([base, model], TensorContext("w"))), seed
        break
    else:
        raise AssertionError("no seed puts Q1 among the negative importances")


def test_whole_where_the_select_cannot_order_or_no_rows():
    ctx = TensorContext("w", shape=(4, 4))
    assert arcee_fusion_chunks.__wrapped__(ctx, 16, 2, torch.float64) is None
    assert arcee_fusion_chunks.__wrapped__(TensorContext("w", shape=(0, 4)), 0, 2, torch.float32) is None
    assert arcee_fusion_chunks.__wrapped__(ctx, 16, 2, torch.float32).row == 4
    assert arcee_fusion_chunks.__wrapped__(TensorContext("w"), 16, 2, torch.float32).row == 16  # shape unknown
