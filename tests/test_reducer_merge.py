"""Reducers split among copies and merged give the bits of one reducer fed everything.

The Ray executor runs a reduction pass as map tasks: each gets a copy of the reducers
as they stand before the pass, feeds it a range of tensors, and the driver merges the
copies (``merge``). These tests do that by hand (pickle copies, no Ray) for every
reducer class, in several splits and merge orders, and compare with one stream and
with a naive float64 computation.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvlang.language.builtins import BUILTINS
from tvlang.language.rows import resolve
from tvlang.ops.context import TensorContext
from tvlang.ops.reduce import CosReducer, DotReducer, ExactSum, NormReducer
from tvlang.ops.threshold import MagnitudeThreshold


def tensors(seed: int) -> list[tuple[str, list[torch.Tensor]]]:
    """Seven named tensors (two inputs each) of awkward sizes: above and below a 16384-entry block."""
    g = torch.Generator().manual_seed(seed)
    sizes = [40_000, 3, 16_384, 70_001, 1, 999, 20_000]
    out = []
    for i, n in enumerate(sizes):
        a = torch.randn(n, generator=g) * (10.0 ** (i - 3))
        b = torch.randn(n, generator=g).bfloat16().float()
        out.append((f"t{i}", [a, b]))
    return out


def stream(reducer, items, passes=None):
    """One reducer fed every tensor, pass by pass."""
    for p in range(passes or reducer.passes):
        for name, ts in items:
            reducer.update(p, ts, TensorContext(name))
        reducer.end_pass(p)
    return reducer.result()


def split(reducer, items, groups, order):
    """Copies of ``reducer`` fed ``groups`` of the items each pass, merged in ``order``."""
    for p in range(reducer.passes):
        copies = []
        for group in groups:
            copy = pickle.loads(pickle.dumps(reducer))  # what a Ray task is handed
            for name, ts in (items[i] for i in group):
                copy.update(p, ts, TensorContext(name))
            copies.append(pickle.loads(pickle.dumps(copy)))  # what it hands back
        for index in order:
            reducer.merge(p, copies[index])
        reducer.end_pass(p)
    return reducer.result()


FACTORIES = {
    "norm": lambda: NormReducer(),
    "dot": lambda: DotReducer(),
    "cos": lambda: CosReducer(),
    "threshold": lambda: MagnitudeThreshold(0.3),
    "threshold-mergekit": lambda: MagnitudeThreshold(0.01, "mergekit"),
}
SPLITS = [
    ([[0, 1, 2, 3, 4, 5, 6]], [0]),
    ([[0, 1, 2], [3, 4], [5, 6]], [0, 1, 2]),
    ([[0, 1, 2], [3, 4], [5, 6]], [2, 0, 1]),
    ([[0], [1], [2], [3], [4], [5], [6]], [6, 5, 4, 3, 2, 1, 0]),
    ([[0, 1, 2, 3, 4, 5, 6], []], [1, 0]),  # an empty copy merges as nothing
]


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_merged_copies_give_the_bits_of_one_stream(kind):
    items = tensors(1)
    one = stream(FACTORIES[kind](), items)
    for groups, order in SPLITS:
        assert split(FACTORIES[kind](), items, groups, order) == one, (groups, order)
    # and the order of the tensors in the stream does not matter either
    assert stream(FACTORIES[kind](), items[::-1]) == one


def test_the_values_are_a_naive_float64_computation():
    items = tensors(2)
    a = torch.cat([ts[0].double() for _, ts in items])
    b = torch.cat([ts[1].double() for _, ts in items])
    assert math.isclose(stream(NormReducer(), items), float(a.norm()), rel_tol=1e-13)
    assert math.isclose(stream(DotReducer(), items), float(a @ b), rel_tol=1e-12)
    assert math.isclose(stream(CosReducer(), items), float(a @ b / (a.norm() * b.norm())), rel_tol=1e-12)
    k = math.floor(0.3 * a.numel())
    assert stream(MagnitudeThreshold(0.3), items) == float(torch.sort(a.float().abs(), descending=True).values[k - 1])


def test_thread_count_does_not_change_the_bits():
    """A Ray worker computes with one thread, the driver with several: the same values."""
    g = torch.Generator().manual_seed(5)
    items = [("big", [torch.randn(3_000_000, generator=g), torch.randn(3_000_000, generator=g)])]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = [stream(f(), items) for f in (NormReducer, DotReducer, CosReducer)]
        torch.set_num_threads(1)
        one = [stream(f(), items) for f in (NormReducer, DotReducer, CosReducer)]
    finally:
        torch.set_num_threads(threads)
    assert many == one


def test_every_reducer_of_the_builtins_can_merge():
    """Every reduce row (norm, dot, cos) names a reducer with merge; the scope='model' threshold has it too."""
    rows = [row for row in BUILTINS.values() if row.stage == "reduce"]
    assert {row.name for row in rows} >= {"norm", "dot", "cos"}
    for row in rows:
        assert callable(getattr(resolve(row.kernel), "merge", None)), row.name
    assert callable(getattr(MagnitudeThreshold, "merge", None))


def test_exact_sum_merges_in_any_order():
    s, t, whole = ExactSum(), ExactSum(), ExactSum()
    values = [1e16, 1.0, -1e16, 5e-324, 3.5, -2.25e-300, 1.7e308]
    for x in values[:3]:
        s.add(x)
    for x in values[3:]:
        t.add(x)
    for x in values:
        whole.add(x)
    t.merge(s)
    assert t.value() == whole.value() == math.fsum(values)
    big = ExactSum()
    big.add_all([1.7e308, 1.7e308])
    assert big.value() == math.inf  # past the largest float: inf, not an error
    special = ExactSum()
    special.add_all([math.inf, 1.0])
    assert special.value() == math.inf


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), max_size=40), st.integers(0, 40))
def test_exact_sum_is_the_correctly_rounded_sum(values, cut):
    left, right = ExactSum(), ExactSum()
    left.add_all(values[:cut])
    right.add_all(values[cut:])
    right.merge(left)
    try:
        expected = math.fsum(values)
    except OverflowError:
        return  # fsum's intermediate overflow: no reference value
    assert right.value() == expected
