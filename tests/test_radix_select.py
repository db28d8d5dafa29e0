"""RadixSelect, the exact k-th largest |x| over pieces in two passes, against a naive sort of the
bit patterns of |x| (NaN above inf): the value, and how many of the entries tied at it the top
k hold, on pieces cut anywhere, with many ties (bfloat16 values), zeros, infinities and NaN."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tvlang.ops.common import bits_to_float
from tvlang.ops.threshold import RadixSelect


def naive(x: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(bit pattern of the k-th largest |x|, need, tied)."""
    bits = x.float().reshape(-1).view(torch.int32).bitwise_and(0x7FFFFFFF)
    ordered = torch.sort(bits, descending=True).values
    kth = int(ordered[k - 1])
    above = int((bits > kth).sum())
    return kth, k - above, int((bits == kth).sum())


def select(pieces: list[torch.Tensor], ranks: list[int]) -> RadixSelect:
    r = RadixSelect()
    for piece in pieces:
        r.update(0, piece)
    for k in ranks:
        r.want(k)
    for piece in pieces:
        r.update(1, piece)
    return r


@pytest.mark.parametrize("case", range(12))
def test_values_and_ties_equal_a_naive_sort(case):
    rng = random.Random(case)
    g = torch.Generator().manual_seed(case)
    n = rng.choice([1, 7, 1000, 70_000, 300_000])
    x = torch.randn(n, generator=g) * rng.choice([1e-3, 1.0, 1e4])
    if case % 3 == 0:
        x = x.to(torch.bfloat16)  # few distinct magnitudes: a bin is one value, tied many times
    elif case % 3 == 1:
        x[torch.rand(n, generator=g) < 0.3] = 0.0
        x[: min(n, 3)] = torch.tensor([float("inf"), float("nan"), -float("inf")])[: min(n, 3)]
    cuts = sorted(rng.sample(range(1, n), min(n - 1, 4))) if n > 1 else []
    pieces = [x[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
    ranks = sorted({1, n, rng.randint(1, n), max(1, n // 5), max(1, n // 2)})
    r = select(pieces, ranks)
    for k in ranks:
        kth, need, tied = naive(x, k)
        got, want = r.value(k), bits_to_float(kth)
        assert got == want or (math.isnan(got) and math.isnan(want)), (case, k)
        assert r.tied(k) == (need, tied), (case, k)


def test_a_bin_holding_most_entries():
    """The k-th largest falls in the bin of zeros, which holds nearly every entry."""
    x = torch.zeros(200_000)
    x[::1000] = torch.arange(1, 201, dtype=torch.float32)
    r = select([x[:123_457], x[123_457:]], [100, 300])
    assert r.value(100) == 101.0 and r.tied(100) == (1, 1)
    assert r.value(300) == 0.0 and r.tied(300) == (100, 199_800)
