"""Differential tests against PEFT's ``peft.utils.merge_utils`` (skipped without peft).

PEFT prunes each task tensor to exactly ``int(density * n)`` entries, elects
signs on the *unweighted* pruned tensors, then weights them and divides by
the number of agreeing tensors. tvlang reproduces that with
``weights=[...], elect_on="unweighted", merge="mean"``. On continuous random
data there are no magnitude ties, so the kept sets agree exactly.
"""

import math

import pytest
import torch

merge_utils = pytest.importorskip("peft.utils.merge_utils")

from tvlang.ops.context import TensorContext  # noqa: E402
from tvlang.ops.dare import dare  # noqa: E402
from tvlang.ops.prune import topk  # noqa: E402
from tvlang.ops.ties import sign_merge, ties  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The density 1.0 is greater")

CASES = [(0.2, (10, 20)), (0.5, (64,)), (0.1, (5, 8, 10)), (1.0, (7, 3)), (0.25, (1000,))]


def _inputs(seed, shape, count=3):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g) for _ in range(count)]
    weights = (torch.rand(count, generator=g) * 1.5 + 0.1).tolist()
    return tensors, weights


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_matches_peft(case, method):
    density, shape = CASES[case]
    tensors, weights = _inputs(case, shape)
    want = merge_utils.ties(tensors, torch.tensor(weights), density, method)
    got = ties(tensors, TensorContext("w"), density=density, elect=method, weights=weights,
               elect_on="unweighted", merge="mean")
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("density, shape", CASES)
def test_magnitude_prune_matches_peft(density, shape):
    tensors, weights = _inputs(7, shape)
    want = merge_utils.magnitude_prune(tensors, torch.tensor(weights), density)
    got = sum(w * topk([x], TensorContext("w"), density=density) for w, x in zip(weights, tensors))
    assert torch.allclose(got, want, atol=1e-6)
    for x in tensors:
        assert torch.equal(topk([x], TensorContext("w"), density=density), merge_utils.prune(x, density, "magnitude"))


def test_weighted_election_differs_from_peft_as_documented():
    # a large-weight input outvotes two small ones only when the election is weighted
    tensors = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-1.0])]
    weights = [0.1, 0.1, 1.0]
    peft = merge_utils.ties(tensors, torch.tensor(weights), 1.0, "total")
    assert torch.allclose(peft, torch.tensor([0.1]))  # (0.1 + 0.1) / 2
    ours = ties(tensors, TensorContext("w"), density=1.0, weights=weights)
    assert torch.equal(ours, torch.tensor([-1.0]))


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_merge_matches_peft_on_the_same_masks(method):
    tensors, weights = _inputs(3, (40, 25))
    torch.manual_seed(1234)
    want = merge_utils.dare_ties(tensors, torch.tensor(weights), 0.3, method)
    torch.manual_seed(1234)
    pruned = [merge_utils.prune(x, 0.3, "random", rescale=True) for x in tensors]
    got = sign_merge(pruned, elect=method, merge="mean", weights=weights, elect_on="unweighted",
                     out=torch.empty(40, 25))
    assert torch.allclose(got, want, atol=1e-6)


def test_dare_rescaling_statistics_match_peft():
    n, density = 400_000, 0.2
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    theirs = merge_utils.prune(x, density, "random", rescale=True)
    ours = dare([x], TensorContext("w"), p=1 - density)
    tolerance = 6 * math.sqrt(density * (1 - density) / n)
    for out in (theirs, ours):
        kept = out != 0
        assert abs(kept.float().mean().item() - density) < tolerance
        assert torch.allclose(out[kept], x[kept] / density)  # same rescaling of survivors
    # both keep the expected value: mean of out/x over all entries is ~1
    ratio_ours = (ours / x).mean().item()
    ratio_theirs = (theirs / x).mean().item()
    assert abs(ratio_ours - 1) < 0.05 and abs(ratio_theirs - 1) < 0.05
