"""topk, breadcrumbs, magnitude thresholds (per tensor and whole model)."""

import math
import random

import pytest
import torch

from tvlang.errors import TvlangError
from tvlang.ops.common import _radix, keep_count, kth_largest_abs
from tvlang.ops.context import TensorContext
from tvlang.ops.prune import breadcrumbs, topk
from tvlang.ops.threshold import MagnitudeThreshold

T = torch.tensor


def ctx(name="w", **reduced):
    return TensorContext(name, "cpu", dict(reduced))


def test_keep_count_rule():
    assert keep_count(0.2, 10) == 2
    assert keep_count(0.29, 100) == 29  # int(0.29 * 100) would be 28
    assert keep_count(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001, not 8
    assert keep_count(0.25, 3) == 0
    assert keep_count(0.5, 3) == 1
    assert keep_count(1.0, 5) == 5
    assert keep_count(0.0, 5) == 0


def test_topk_hand_computed():
    x = T([[0.5, -3.0, 1.0], [2.0, -0.25, 0.0]])
    assert torch.equal(topk([x], ctx(), density=0.5), T([[0.0, -3.0, 1.0], [2.0, 0.0, 0.0]]))
    assert torch.equal(topk([x], ctx(), density=1.0), x)
    assert torch.equal(topk([x], ctx(), density=0.0), torch.zeros(2, 3))
    assert torch.equal(topk([x], ctx(), density=0.2), T([[0.0, -3.0, 0.0], [0.0, 0.0, 0.0]]))


def test_topk_breaks_ties_at_threshold_by_position_and_zero_tensors():
    # k = 1 of three entries tied at |x| = 1: the first in flat order stays
    assert torch.equal(topk([T([1.0, -1.0, 1.0, 0.5])], ctx(), density=0.25), T([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(topk([T([0.5, -1.0, 1.0, 1.0])], ctx(), density=0.5), T([0.0, -1.0, 1.0, 0.0]))
    assert torch.equal(topk([torch.zeros(4)], ctx(), density=0.5), torch.zeros(4))
    assert torch.equal(topk([T([-7.0])], ctx(), density=1.0), T([-7.0]))
    assert torch.equal(topk([T([-7.0])], ctx(), density=0.9), T([0.0]))


def test_topk_model_scope():
    x = T([0.5, -3.0, 1.0])
    assert torch.equal(topk([x], ctx(**{"threshold:0": 1.0}), density=0.1, scope="model"), T([0.0, -3.0, 1.0]))
    assert torch.equal(topk([x], ctx(**{"threshold:0": math.inf}), density=0.0, scope="model"), torch.zeros(3))
    with pytest.raises(TvlangError, match="was not computed"):
        topk([x], ctx(), density=0.1, scope="model")


def test_topk_float16_input():
    x = T([0.5, -3.0, 1.0, 2.0], dtype=torch.float16)
    out = topk([x], ctx(), density=0.5)
    assert out.dtype == torch.float16
    assert torch.equal(out, T([0.0, -3.0, 0.0, 2.0], dtype=torch.float16))


def test_breadcrumbs_hand_computed():
    x = T([0.5, -3.0, 1.0, 2.0])
    # 4 entries, density .5 -> keep 2, gamma .25 -> drop the 1 largest (-3)
    assert torch.equal(breadcrumbs([x], ctx(), density=0.5, gamma=0.25), T([0.0, 0.0, 1.0, 2.0]))


def test_breadcrumbs_small_tensor_keeps_entries():
    # 5 entries: keep floor(4.5) = 4; gamma .01 drops floor(.05) = 0 outliers.
    # mergekit's slice indices[n_bot:-0] is empty there and wipes the tensor.
    x = T([0.1, -0.5, 0.3, 2.0, -1.0])
    assert torch.equal(breadcrumbs([x], ctx(), density=0.9), T([0.0, -0.5, 0.3, 2.0, -1.0]))


def test_breadcrumbs_outliers_give_way_to_density():
    # keep 4 + drop 2 > 5 entries: only 1 outlier (2.0) is dropped
    x = T([0.1, -0.5, 0.3, 2.0, -1.0])
    assert torch.equal(breadcrumbs([x], ctx(), density=0.8, gamma=0.5), T([0.1, -0.5, 0.3, 0.0, -1.0]))
    assert torch.equal(breadcrumbs([x], ctx(), density=1.0, gamma=0.5), x)
    assert torch.equal(breadcrumbs([x], ctx(), density=0.0, gamma=0.5), torch.zeros(5))


def test_breadcrumbs_ties():
    # all four equal, ranked by position: the first is the outlier, the next two are kept
    assert torch.equal(breadcrumbs([torch.ones(4)], ctx(), density=0.5, gamma=0.25), T([0.0, 1.0, 1.0, 0.0]))
    # ties at the lower cut: only the first one
    x = T([3.0, 1.0, -1.0, 0.5])
    assert torch.equal(breadcrumbs([x], ctx(), density=0.25, gamma=0.25), T([0.0, 1.0, 0.0, 0.0]))
    # ties at the outlier cut: the first ones are the outliers, the later ones are kept
    x = T([2.0, -2.0, 2.0, 1.0, 0.5])
    assert torch.equal(breadcrumbs([x], ctx(), density=0.4, gamma=0.2), T([0.0, -2.0, 2.0, 0.0, 0.0]))
    assert torch.equal(breadcrumbs([x], ctx(), density=0.6, gamma=0.4), T([0.0, 0.0, 2.0, 1.0, 0.5]))




@pytest.mark.parametrize("layout", ["random", "sorted", "ties", "sparse"])
def test_kth_largest_abs_large_tensors_is_exact(layout):
    g = torch.Generator().manual_seed(1)
    n = 300_000
    if layout == "random":
        x = torch.randn(n, generator=g)
    elif layout == "sorted":  # the strided sample sees a biased picture
        x = torch.sort(torch.randn(n, generator=g)).values
        x[: n // 2] *= 100
    elif layout == "ties":
        x = torch.randint(-20, 21, (n,), generator=g).float()
    else:
        x = torch.zeros(n)
        x[torch.randint(0, n, (500,), generator=g)] = torch.randn(500, generator=g)
    mag = x.abs()
    # reference: a full sort (torch.kthvalue is quadratic on some layouts)
    ordered = torch.sort(mag, descending=True).values
    for k in (1, 7, n // 5, n // 2, n - 3, n):
        want = float(ordered[k - 1])
        assert kth_largest_abs(x, k) == want, (layout, k)
        assert _radix(mag, k) == want, (layout, k)  # the fallback on its own


def _global(tensors, density):
    r = MagnitudeThreshold(density)
    for p in range(r.passes):
        for i, t in enumerate(tensors):
            r.update(p, [t], ctx(f"t{i}"))
        r.end_pass(p)
    return r.result()


def test_global_threshold_matches_concatenation():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for case in range(60):
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        tensors = []
        for _ in range(rng.randint(1, 5)):
            shape = (rng.randint(1, 40), rng.randint(1, 30))
            x = torch.randn(shape, generator=g) * rng.choice([1e-3, 1.0, 50.0])
            if rng.random() < 0.4:  # many ties
                x = torch.round(x * 2) / 2
            tensors.append(x.to(dtype))
        density = rng.choice([0.0, 1.0, rng.random(), 0.5, 0.01])
        flat = torch.cat([t.reshape(-1).float().abs() for t in tensors])
        k = keep_count(density, flat.numel())
        want = math.inf if k == 0 else float(torch.sort(flat, descending=True).values[k - 1])
        assert _global(tensors, density) == want, (case, dtype, density)


def test_global_threshold_drives_model_scope_topk():
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(30, generator=g), torch.randn(4, 5, generator=g) * 3]
    t = _global(tensors, 0.2)
    outs = [topk([x], ctx(f"t{i}", **{"threshold:0": t}), density=0.2, scope="model") for i, x in enumerate(tensors)]
    kept = sum(int(torch.count_nonzero(o)) for o in outs)
    assert kept == keep_count(0.2, 50) == 10
    flat = torch.cat([x.reshape(-1) for x in tensors])
    top10 = set(torch.topk(flat.abs(), 10).indices.tolist())
    kept_idx = set(torch.nonzero(torch.cat([o.reshape(-1) for o in outs])).view(-1).tolist())
    assert kept_idx == top10


def test_global_threshold_no_tensors_and_zero_tensors():
    assert _global([], 0.5) == math.inf
    assert _global([torch.zeros(10)], 0.5) == 0.0
