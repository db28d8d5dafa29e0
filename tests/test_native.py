"""The compiled helper (tvlang/ops/native.c, loaded by tvlang/ops/native.py) computes what the
numpy and torch paths compute: DARE's masks bit for bit, with the generator left in the same
state; TIES' sign merge with unit weights with the same float32 values (NaN where the torch
path has NaN; the sign of a NaN is not compared), at tile ends, with -0.0, infinities and NaN;
the threshold window pass's gathered entries and counts.
Recipes run with ``TVLANG_NATIVE=0`` and without write the same bytes.

Where a C compiler is found (every CI machine: Linux with ``cc``) the install must have built
the helper, so these tests cannot pass by comparing the fallback with itself."""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import shutil
import sys
from pathlib import Path

import numpy
import pytest
import torch

import tvlang
from chunking import chunk_in
from tvlang.ops import magprune, native
from tvlang.ops.dare import Dropper
from tvlang.ops.della import Magprune
from tvlang.ops.prune import trim
from tvlang.ops.sums import BLOCK, block_values
from tvlang.ops.threshold import WindowSelect
from tvlang.ops.ties import sign_merge

ROOT = Path(__file__).resolve().parent.parent
COMPILER = shutil.which(os.environ.get("CC") or "cc") is not None and sys.platform.startswith("linux")


needs_helper = pytest.mark.skipif(native.library() is None, reason="the helper is not built here")


def test_the_install_built_the_helper_where_a_compiler_is_found():
    if not COMPILER:
        pytest.skip("no C compiler here: tvlang runs on numpy and torch alone")
    assert native.LIBRARY.is_file(), "pip install -e . should have run hatch_build.py"
    assert native.library() is not None


def test_without_the_helper_nothing_calls_it(monkeypatch):
    monkeypatch.setenv("TVLANG_NATIVE", "0")
    assert native.library() is None
    bits = numpy.random.PCG64(3)
    state = bits.state
    assert native.drop_mask_f32(bits, 10, 1 << 31, 2.0) is None
    assert native.normal_f32(bits, 10) is None
    assert bits.state == state  # untouched: the numpy path draws from where it was
    x = torch.ones(8)
    assert native.sign_merge_f32([x], "total", "mean", torch.empty(8)) is None


@pytest.fixture(params=["scalars", "vectors"])
def pcg_ways(request):
    """The helper's bulk PCG64 outputs drawn both ways (tv_pcg64_wide): eight lanes as scalars, and
    as AVX-512 vectors where the processor has them; back to the processor's way after."""
    if native.library() is None:
        pytest.skip("the helper is not built here")
    wide = request.param == "vectors"
    if native.pcg64_wide(wide) != wide:
        native.pcg64_wide(True)
        pytest.skip("no AVX-512 (F and DQ) on this processor")
    yield request.param
    native.pcg64_wide(True)


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 31, 33, 127, 128, 129, 130, 1000, 4097])
def test_pcg64_words_are_numpys_outputs_split(pcg_ways, n):
    """tv_pcg64_words (della's words; the same bulk draw as the keep bits' and the Gaussians'):
    numpy's outputs, each split low half first, from any state (a high half waiting or not), every
    count around the blocks of eight outputs and of 64; the state and the half left where numpy's
    ``random_raw`` would leave them."""
    lib = native.library()
    for seed, half in [(1, None), (2, 0xDEADBEEF), (20261201, 7)]:
        bits = numpy.random.PCG64(seed)
        bits.advance(seed * 1000)
        words = numpy.zeros(6, dtype=numpy.uint64)
        words[:4] = native.state_words(bits)
        if half is not None:
            words[4], words[5] = 1, half
        got = numpy.empty(n, dtype=numpy.uint32)
        lib.tv_pcg64_words(words.ctypes.data, n, got.ctypes.data)
        lead = [] if half is None or n == 0 else [half]
        raw = bits.random_raw(-(-(n - len(lead)) // 2))
        want = numpy.array(lead + list(raw.view(numpy.uint32)[: n - len(lead)]), dtype=numpy.uint32)
        assert got.tobytes() == want.tobytes(), (seed, n)
        assert (int(words[0]) | int(words[1]) << 64) == bits.state["state"]["state"], (seed, n)
        odd = (n - len(lead)) % 2 == 1
        assert int(words[4]) == (1 if odd or (half is not None and n == 0) else 0), (seed, n)
        if odd:
            assert int(words[5]) == int(raw[-1] >> numpy.uint64(32)), (seed, n)


def numpy_masks(bits, n: int, threshold: int, scale: float) -> numpy.ndarray:
    """The numpy path by hand: words low half first, compared, converted, scaled."""
    words = bits.random_raw((n + 1) // 2).view(numpy.uint32)[:n]
    mask = (words >= numpy.uint32(threshold)).astype(numpy.float32)
    return mask * numpy.float32(scale) if scale != 1.0 else mask


@needs_helper
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 15, 16, 17, 1000, (1 << 18) + 3])
def test_drop_masks_equal_numpy_and_leave_the_same_state(n):
    for seed, skip, threshold, scale in [(1, 0, 3865470567, 10.0), (2, 12345, 1 << 31, 1.0), (3, 7, 1, 1 / 0.3)]:
        ours, theirs = numpy.random.PCG64(seed), numpy.random.PCG64(seed)
        ours.advance(skip)
        theirs.advance(skip)
        got = native.drop_mask_f32(ours, n, threshold, scale)
        want = numpy_masks(theirs, n, threshold, scale)
        assert got.dtype == numpy.float32 and numpy.array_equal(got.view(numpy.uint32), want.view(numpy.uint32))
        assert ours.state == theirs.state, (n, seed)
        # and the next draw goes on from there
        assert numpy.array_equal(ours.random_raw(3), theirs.random_raw(3))


@needs_helper
@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 15, 16, 17, 127, 128, 129, 1000, (1 << 18) + 3])
def test_keep_bits_are_the_masks_packed(pcg_ways, n):
    """The fused DARE calls' keep bits: the float32 masks' nonzero entries in numpy's packbits order,
    the generator left where the masks leave it (words drawn 128 entries at a time, then compared
    eight at a time as signed numbers: thresholds at the ends and at the sign bit)."""
    for seed, threshold in [(1, 3865470567), (2, 1 << 31), (3, 1), (4, 0), (5, (1 << 32) - 1), (6, (1 << 31) - 1)]:
        ours, theirs = numpy.random.PCG64(seed), numpy.random.PCG64(seed)
        got = native.keep_bits(ours, n, threshold)
        want = numpy_masks(theirs, n, threshold, 1.0) != 0
        assert got.dtype == numpy.uint8 and got.size == -(-n // 8)
        assert numpy.array_equal(numpy.unpackbits(got, count=n).astype(bool), want), (n, seed)
        assert ours.state == theirs.state, (n, seed)


@needs_helper
@pytest.mark.skipif(native.linear_steps() is None, reason="the fused loops are the torch-free executor's (AVX2, FMA)")
@pytest.mark.parametrize("first", [1.0, 0.7])
def test_fused_loops_equal_the_steps_one_by_one(first):
    """The torch-free executor's fused loops against its steps one at a time: ``fma(b, c, a) * mask``
    then ``fma(that, c2, base * first)`` (float masks; keep bits, from any bit, in the whole-call
    loop with one input), and the sign
    merge then ``fma(merged, c2, base * first)``; specials in every input."""
    lib = native.linear_steps()
    n = 4099
    a, b, base = parts_with_specials(3, n, seed=int(first * 10))
    mask = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.3, 1 / 0.7, 0.0).float()
    packed = numpy.packbits(mask.numpy() != 0)
    x = a.clone()
    lib.tv_axpy_f32(x.data_ptr(), b.data_ptr(), -1.0, n)
    dropped = x * mask
    start = base * first if first != 1.0 else base.clone()
    lib.tv_axpy_f32(start.data_ptr(), dropped.data_ptr(), 0.5, n)
    for bit in (0, 3, 8):
        m = n - bit
        floats = torch.empty(m)
        lib.tv_drop_axpy_f32(a[bit:].data_ptr(), b[bit:].data_ptr(), -1.0, mask[bit:].data_ptr(), base[bit:].data_ptr(),
                             first, 0.5, m, floats.data_ptr())
        bits = fused_call(lib, [(a[bit:], b[bit:], -1.0)], [(1, 0.0, 0.0)], [(packed, bit)], [[]], 1 / 0.7, (0, 0),
                          (base[bit:], first, 0.5), m)  # a plain dare with keep bits: the whole-call loop
        assert same_values(floats, start[bit:]) and same_values(bits, start[bit:]), bit
        sub = torch.empty(m)
        lib.tv_sub_bits_f32(a[bit:].data_ptr(), b[bit:].data_ptr(), -1.0, packed.ctypes.data, bit, 1 / 0.7, m,
                            sub.data_ptr())
        assert same_values(sub, dropped[bit:]), bit
    parts = parts_with_specials(3, n, seed=5)
    merged = torch.empty(n)
    assert native.sign_merge_f32(parts, "total", "mean", merged) is not None
    expected = base * first if first != 1.0 else base.clone()
    lib.tv_axpy_f32(expected.data_ptr(), merged.data_ptr(), 2.0, n)
    out = torch.empty(n)
    pointers = (ctypes.c_void_p * 3)(*[p.data_ptr() for p in parts])
    lib.tv_sign_merge_add_f32(pointers, 3, n, 0, native.MERGE_CODES["mean"], base.data_ptr(), first, 2.0,
                              out.data_ptr())
    assert same_values(out, expected)


@needs_helper
def test_dropper_masks_are_the_same_with_and_without_the_helper(monkeypatch):
    n = 3 * (1 << 18) + 11  # blocks of CHUNK, and a short last one
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))

    def drop(pieces: list[int], rescale: bool, flags: list | None = None) -> torch.Tensor:
        dropper = Dropper(0.7, numpy.random.PCG64(42), rescale, n)
        out, start = torch.empty(n), 0
        for size in pieces:
            dropper.apply(x[start:start + size], out[start:start + size], flags)
            start += size
        return out

    for rescale in (True, False):
        fast_flags: list = []
        fast = drop([n], rescale, fast_flags)
        cut = drop([5, 1 << 18, 100003, n - 5 - (1 << 18) - 100003], rescale)
        monkeypatch.setenv("TVLANG_NATIVE", "0")
        slow_flags: list = []
        slow = drop([n], rescale, slow_flags)
        monkeypatch.delenv("TVLANG_NATIVE")
        assert torch.equal(fast.view(torch.int32), slow.view(torch.int32)), rescale
        assert torch.equal(cut.view(torch.int32), slow.view(torch.int32)), rescale
        assert numpy.array_equal(numpy.concatenate(fast_flags), numpy.concatenate(slow_flags))
        assert 0.25 < float((fast != 0).float().mean()) < 0.35  # kept with probability 0.3


@needs_helper
@pytest.mark.parametrize("seed", [0, 1, 20261130])
def test_gaussians_equal_numpys_in_any_pieces_and_leave_the_same_state(pcg_ways, seed):
    ours, theirs = numpy.random.PCG64(seed), numpy.random.PCG64(seed)
    numpy.random.Generator(ours).random(1, dtype=numpy.float32)  # start with a high half waiting
    numpy.random.Generator(theirs).random(1, dtype=numpy.float32)
    rng = numpy.random.Generator(theirs)
    drawn = 0
    for n in [1, 2, 3, 0, 7, 1023, 1024, 1025, 100_003, 1 << 20, 5]:
        got = native.normal_f32(ours, n)
        want = rng.standard_normal(n, dtype=numpy.float32)
        assert got.dtype == numpy.float32 and got.tobytes() == want.tobytes(), (seed, n)
        assert ours.state == theirs.state, (seed, n)
        drawn += n
    # the pieces include draws from the tail beyond R and from the wedges (the slow paths)
    whole = numpy.random.Generator(numpy.random.PCG64(seed)).standard_normal(drawn + 1, dtype=numpy.float32)
    assert (numpy.abs(whole) > native.ZIGGURAT_R).sum() > 100
    out = numpy.full(10, 7.0, dtype=numpy.float32)
    assert native.normal_f32(ours, 4, out) is not None
    assert out[:4].tobytes() == rng.standard_normal(4, dtype=numpy.float32).tobytes() and (out[4:] == 7.0).all()


def _emitting(word: int, inc: int) -> numpy.random.PCG64:
    """A PCG64 whose next output is ``word``: its state after the step has a rotation of 0 and
    halves whose xor is ``word``; the state before is that minus the increment over the
    multiplier (odd, so invertible modulo 2**128)."""
    multiplier = (0x2360ED051FC65DA4 << 64) | 0x4385DF649FCCF645
    high = 0x0123456789ABCDEF  # top six bits 0: no rotation
    after = (high << 64) | (high ^ word)
    bits = numpy.random.PCG64(0)
    bits.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                  "state": {"state": ((after - inc) * pow(multiplier, -1, 1 << 128)) % (1 << 128), "inc": inc}}
    return bits


@needs_helper
def test_every_ziggurat_bound_and_width_is_numpys():
    """Each layer's 23-bit bound k and width w, checked against numpy's own draws from words made
    to hit them: a = 1 draws exactly w; a = k - 1 is taken at once (one output used, its high half
    left waiting) and a = k is not (the high half is used, or more words are drawn)."""
    k, w, _ = native.ziggurat_tables()
    inc = numpy.random.PCG64(5).state["state"]["inc"]
    for layer in range(256):
        for a, sign in [(1, 0), (int(k[layer]) - 1, 1), (int(k[layer]), 0)]:
            if a < 0:
                continue
            word = (0x9E3779B9 << 32) | (a << 9) | (sign << 8) | layer
            theirs, ours = _emitting(word, inc), _emitting(word, inc)
            step = _emitting(word, inc)
            step.random_raw(1)
            want = numpy.random.Generator(theirs).standard_normal(1, dtype=numpy.float32)
            got = native.normal_f32(ours, 1)
            assert got.tobytes() == want.tobytes() and ours.state == theirs.state, (layer, a)
            at_once = theirs.state["state"] == step.state["state"] and theirs.state["has_uint32"] == 1
            assert at_once == (a < int(k[layer])), (layer, a)
            if a == 1 and at_once:
                assert want[0] == w[layer]  # 1 * w, exactly
    assert native.ziggurat_tables()[0][1] == 0  # layer 1 is never taken at once


def steps_one_by_one(lib, inputs, forms, bits, windows, scale, options, taker, n):
    """tv_fused_merge_f32's reference: each step of it as its own helper call or torch operation,
    the tie windows as tvlang.ops.common.TieWindow counts them (``windows``: per input, lists of
    ``[bits, start, stop, seen]``, their counts moved on)."""
    parts = []
    for (a, b, coef), (form, lo, hi), (packed, offset), ties in zip(inputs, forms, bits, windows):
        x = a[:n].clone()
        if b is not None:
            lib.tv_axpy_f32(x.data_ptr(), b.data_ptr(), coef, n)
        part = torch.empty(n)
        if form == 0:
            part = x.clone()
        elif form == 1:
            kept = torch.from_numpy(numpy.unpackbits(packed)[offset:offset + n].astype(bool))
            part = x * torch.where(kept, torch.tensor(scale), torch.tensor(0.0))
        elif form == 6:  # the L1 rule's two torch calls: times the flags, then times the factor
            kept = torch.from_numpy(numpy.unpackbits(packed)[offset:offset + n].astype(bool))
            part = torch.mul(x, kept).mul_(lo)
        elif form == 2:
            lib.tv_hardshrink_f32(x.data_ptr(), n, lo, part.data_ptr())
        elif form == 3:
            lib.tv_band_f32(x.data_ptr(), n, lo, hi, part.data_ptr())
        elif form == 4:
            lib.tv_hardshrink_f32(x.data_ptr(), n, lo, part.data_ptr())
            part = x - part
        else:
            part = torch.zeros(n)
        for tie in ties:
            at = torch.nonzero((x.view(torch.int32) & 0x7FFFFFFF) == tie[0]).flatten().tolist()
            for number, j in enumerate(at, start=tie[3] + 1):
                part[j] = x[j] if tie[1] < number <= tie[2] else 0.0
            tie[3] += len(at)
        parts.append(part)
    value = parts[0]
    if len(parts) > 1:
        value = torch.empty(n)
        frequency, merge = options
        lib.tv_sign_merge_f32((ctypes.c_void_p * len(parts))(*[p.data_ptr() for p in parts]), len(parts), n,
                              frequency, merge, value.data_ptr())
    if taker is None:
        return value
    base, first, c = taker
    out = base[:n] * first if first != 1.0 else base[:n].clone()
    lib.tv_axpy_f32(out.data_ptr(), value.data_ptr(), c, n)
    return out


def fused_fields(inputs, forms, bits, windows) -> ctypes.Array:
    """The helper's ``fused_input`` array for each input ``(a, b, coef)``, its ``(form, lo, hi)``, its
    keep bits ``(packed, offset)`` and its tie windows ``[bits, start, stop, seen]``."""
    fields = (native.FusedInput * len(inputs))()
    for field, (a, b, coef), (form, lo, hi), (packed, offset), ties in zip(fields, inputs, forms, bits, windows):
        field.a, field.b = a.data_ptr(), b.data_ptr() if b is not None else None
        field.cb, field.form, field.lo, field.hi = coef, form, lo, hi
        field.packed, field.offset, field.windows = packed.ctypes.data, offset, len(ties)
        for w, (pattern, start, stop, seen) in enumerate(ties):
            field.bits[w], field.start[w], field.stop[w], field.seen[w] = pattern, start, stop, seen
    return fields


def carry_seen(fields, windows) -> None:
    """The windows' counts as the helper left them in ``fields``, moved on in ``windows``."""
    for field, ties in zip(fields, windows):
        for w, tie in enumerate(ties):
            tie[3] = int(field.seen[w])


def fused_call(lib, inputs, forms, bits, windows, scale, options, taker, n):
    """tv_fused_merge_f32 over the same, its windows' counts moved on in ``windows``; what it returns
    checked: whether an entry it wrote is not finite."""
    fields = fused_fields(inputs, forms, bits, windows)
    out = torch.empty(n)
    bad = lib.tv_fused_merge_f32(fields, len(inputs), n, scale, *options, taker[0].data_ptr() if taker else None,
                                 taker[1] if taker else 1.0, taker[2] if taker else 1.0, out.data_ptr())
    assert bad == int(not torch.isfinite(out).all())
    carry_seen(fields, windows)
    return out


def _magnitude(value: float) -> int:
    return int(numpy.float32(value).view(numpy.int32))


LEVELS = torch.tensor([0.25, -0.25, 0.5, -0.5, 0.75, 1.5])  # the magnitudes of tied_parts' ties


def tied_parts(k: int, n: int, seed: int, g: torch.Generator) -> list[torch.Tensor]:
    """``parts_with_specials`` with a third of the entries at a few magnitudes (``LEVELS``): ties at
    the windows' values (:func:`some_windows`)."""
    parts = parts_with_specials(k, n, seed=seed)
    for x in parts:
        at = torch.randint(0, n, (n // 3,), generator=g)
        x[at] = LEVELS[torch.randint(0, len(LEVELS), (n // 3,), generator=g)]
    return parts


def some_windows(k: int) -> list[list[list]]:
    """Each of ``k`` inputs' tie windows ``[bits, start, stop, seen]``: none, one, or two, by turns."""
    return [[] if i % 3 == 2 else [[_magnitude(0.5), 2, 9, 3]] if i % 3 == 0
            else [[_magnitude(0.25), 0, math.inf, 1], [_magnitude(0.75), 4, 5, 0]] for i in range(k)]


@needs_helper
@pytest.mark.skipif(native.linear_steps() is None, reason="the fused loops are the torch-free executor's (AVX2, FMA)")
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 16])
def test_whole_calls_in_one_loop_equal_the_steps_one_by_one(k):
    """tv_fused_merge_f32 (a ties, dare_ties or breadcrumbs call with the axpy steps before it and
    the step after it) against those steps one at a time: every form of trim or drop, alone and
    shared by every input (the unrolled loops), keep bits from bits at like and unlike places within
    a byte, tie windows whose counts go on from call to call, every election and merge, with and
    without a taker; lengths about the vectors of eight and the tiles of 512; specials in every
    input, and entries tied at a few magnitudes. Form 6 (keep bits, then the L1 rule's factor, each
    input its own: 1, 3.7, an infinity, 1e-30) among the others and shared by every input."""
    lib = native.linear_steps()
    n_max = 4099 + 16
    g = torch.Generator().manual_seed(k)
    seen_nan = seen_window = False
    for n in (1, 7, 8, 9, 511, 512, 513, 4099):
        for trial, places in enumerate(("aligned", "like", "unlike", "shared", "l1-like", "l1-unlike")):
            a = tied_parts(k, n_max, 100 * k + n + trial, g)
            b = tied_parts(k, n_max, 200 * k + n + trial, g)
            forms = []
            for i in range(k):
                cut = float(torch.rand(1, generator=g)) * 0.8
                forms.append(((i + trial + n) % 7, cut, cut + 0.5))
            if places in ("like", "unlike"):  # every input dropped (dare_ties), where the places matter
                forms = [(1, 0.0, 0.0)] * k
            elif places.startswith("l1"):  # every input dropped and scaled by its own L1 factor
                forms = [(6, (1.0, 3.7, math.inf, 1e-30)[i % 4], 0.0) for i in range(k)]
            elif places == "shared":  # one trim for every input (ties, breadcrumbs)
                forms = [((n % 3) + 2, 0.3, 0.9)] * k
            bits = []
            for i in range(k):
                offset = {"aligned": 8 * i, "like": 8 * i + 3, "unlike": 8 * i + i % 8 + 1, "shared": 8 * i,
                          "l1-like": 8 * i + 5, "l1-unlike": 8 * i + i % 8 + 1}[places]
                packed = numpy.packbits(numpy.random.default_rng(i + n).random(n_max + 16 * k + 16) < 0.3)
                bits.append((packed, offset))
            inputs = [(a[i], b[i] if i % 2 == 0 else None, -1.0 if i % 3 else 0.5) for i in range(k)]
            for frequency, merge in ((0, 1), (1, 0), (0, 2)):
                for taker in (None, (a[0], 1.0, 1.0), (b[0], 0.7, -2.0)):
                    windows = some_windows(k)
                    copies = [[list(tie) for tie in ties] for ties in windows]
                    expected = steps_one_by_one(lib, inputs, forms, bits, windows, 1 / 0.7, (frequency, merge),
                                                taker, n)
                    got = fused_call(lib, inputs, forms, bits, copies, 1 / 0.7, (frequency, merge), taker, n)
                    assert same_values(got, expected), (n, places, frequency, merge, taker is not None)
                    assert copies == windows  # the counts carried on
                    seen_nan = seen_nan or bool(got.isnan().any())
                    seen_window = seen_window or any(tie[3] > 8 for ties in windows for tie in ties)
    assert seen_nan and seen_window


@needs_helper
@pytest.mark.skipif(native.linear_steps() is None, reason="the fused loops are the torch-free executor's (AVX2, FMA)")
@pytest.mark.parametrize("k", [1, 2, 3, 5, 16])
def test_a_chain_of_calls_in_one_loop_equals_the_calls_one_by_one(k):
    """tv_drop_chain_f32 (``pre + c1*dare(a - pre) + c2*breadcrumbs(b - pre) + ...``, each call with
    the axpy that makes its input and the step that takes its result) against tv_fused_merge_f32
    once a call (one input, that call's taker), the output of each the base of the next: each input
    its own form (keep bits with its own rescale, from bits at like and unlike places within a byte;
    every trim, with tie windows whose counts go on), coefficient, with and without the axpy; the
    first taker scaling its base or not; lengths about the vectors of eight, the blocks of 1,024
    and the tiles of 512; specials in every input, entries tied at the windows' magnitudes. Bit for
    bit, NaNs' payloads included; the windows' counts as the calls one by one leave them."""
    lib = native.linear_steps()
    n_max = 4099 + 16
    g = torch.Generator().manual_seed(k)
    seen_nan = seen_window = False
    for n in (1, 7, 8, 9, 15, 17, 511, 1025, 4099):
        for trial, places in enumerate(("aligned", "like", "unlike", "trims")):
            a = tied_parts(k, n_max, 300 * k + n + trial, g)
            b = tied_parts(k, n_max, 400 * k + n + trial, g)
            base = parts_with_specials(1, n_max, seed=500 * k + n + trial)[0]
            inputs = [(a[i], b[i] if i % 3 != 1 else None, -1.0 if i % 2 == 0 else 0.5) for i in range(k)]
            scales = [(1 / 0.7, 1.0, 2.5, 1 / 0.1)[i % 4] for i in range(k)]
            cs = [(1.0, -1.0, 0.3, 2.0)[(i + trial) % 4] for i in range(k)]
            forms, bits = [], []
            for i in range(k):
                cut = float(torch.rand(1, generator=g)) * 0.8
                forms.append((1, 0.0, 0.0) if places != "trims" else ((i + n) % 6, cut, cut + 0.5))
                offset = {"aligned": 8 * i, "like": 8 * i + 5, "unlike": 8 * i + i % 8 + 1, "trims": 8 * i + 3}[places]
                packed = numpy.packbits(numpy.random.default_rng(10 * i + n).random(n_max + 16 * k + 16) < 0.4)
                bits.append((packed, offset))
            for first in (1.0, 0.7):
                windows = some_windows(k) if places == "trims" else [[] for _ in range(k)]
                copies = [[list(tie) for tie in ties] for ties in windows]
                expected = base
                for i in range(k):
                    taker = (expected, first if i == 0 else 1.0, cs[i])
                    expected = fused_call(lib, [inputs[i]], [forms[i]], [bits[i]], [windows[i]], scales[i], (0, 0),
                                          taker, n)
                fields = fused_fields(inputs, forms, bits, copies)
                got = torch.full((n + 1,), 123.0)
                bad = lib.tv_drop_chain_f32(fields, (ctypes.c_float * k)(*scales), (ctypes.c_float * k)(*cs), k, n,
                                            base.data_ptr(), first, got.data_ptr())
                assert torch.equal(got[:n].view(torch.int32), expected.view(torch.int32)), (n, places, first)
                assert bad == int(not torch.isfinite(expected).all())
                assert got[n] == 123.0  # nothing written past n
                carry_seen(fields, copies)
                assert copies == windows  # the counts carried on
                seen_nan = seen_nan or bool(got.isnan().any())
                seen_window = seen_window or any(tie[3] > 8 for ties in windows for tie in ties)
    assert seen_nan and (seen_window or k < 3)


@needs_helper
@pytest.mark.skipif(native.linear_steps() is None, reason="the fused loops are the torch-free executor's (AVX2, FMA)")
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), 3e38])
def test_the_fused_loops_say_whether_an_entry_they_wrote_is_not_finite(value):
    """tv_fused_merge_f32 and tv_drop_chain_f32 return nonzero exactly when an entry they wrote is
    not finite (the executor then skips its own check of the chunk): finite inputs but one entry,
    placed at each edge of the vectors of eight, the checked blocks (2,048 entries; the chain's
    1,024), the keep bits' first whole byte (bits at an offset of 3 within it) and the tail; 3e38
    overflows only in the taker (2 * 3e38). Finite everywhere: zero."""
    lib = native.linear_steps()
    n = 5003
    g = torch.Generator().manual_seed(7)
    every = numpy.full(n // 8 + 4, 0xFF, dtype=numpy.uint8)  # every entry kept
    for at in (None, 0, 4, 5, 12, 1023, 1024, 2047, 2048, 2053, 2055, 4095, 4096, 4100, 4999, 5002):
        a, b, base = (torch.randn(n, generator=g) for _ in range(3))
        if at is not None:
            a[at] = value
        for forms, offset in (([(0, 0.0, 0.0)] * 2, 0), ([(2, 0.1, 0.0)] * 2, 0), ([(1, 0.0, 0.0)] * 2, 3)):
            inputs = [(a, None, 0.0), (b, base, -1.0)]  # a, and b - base
            fields = fused_fields(inputs, forms, [(every, offset)] * 2, [[], []])
            out = torch.empty(n)
            bad = lib.tv_fused_merge_f32(fields, 2, n, 1.0, 0, 0, base.data_ptr(), 1.0, 2.0, out.data_ptr())  # sum
            assert bad == int(not torch.isfinite(out).all()) == int(at is not None), (at, forms)
        for form, offset in ((0, 0), (1, 3), (2, 0)):
            fields = fused_fields([(a, None, 0.0)], [(form, 0.1, 0.0)], [(every, offset)], [[]])
            out = torch.empty(n)
            bad = lib.tv_drop_chain_f32(fields, (ctypes.c_float * 1)(1.0), (ctypes.c_float * 1)(2.0), 1, n,
                                        base.data_ptr(), 1.0, out.data_ptr())
            assert bad == int(not torch.isfinite(out).all()) == int(at is not None), (at, form)


@pytest.mark.skipif(native.linear_steps() is None, reason="della's row loop is the torch-free executor's (AVX2, FMA)")
@pytest.mark.parametrize("m", [1, 2, 300, 1288])
@pytest.mark.parametrize("k", [1, 3])
def test_della_rows_are_the_steps_one_by_one(pcg_ways, m, k):
    """tv_della_rows_f32 (della's and della_linear's call row by row, the executor's _Della) against
    the steps one by one: each input made by tv_axpy_f32 (where its axpy waits; else taken as it is),
    tv_magprune_f32 from the input's own stream after the same words (one with a half word left
    over), then tv_sign_merge_add_f32 (with the step that takes it), or tv_sign_merge_f32 or
    della_linear's sum (zeros, then tv_axpy_f32 with 1 for each part) followed by lambda
    (tv_scale_f32): the same bits, with specials in the inputs; both elections, the three merges and
    the sum, a first coefficient that is not 1, lambda 1 and 0.3, with and without rescale; the
    return says whether an entry written is not finite; the streams' words are not changed, nothing
    is written past the rows. Both ways of ranking (pcg_ways: the AVX-512 ranks go with the vector
    lanes)."""
    lib = native.linear_steps()
    rows = 40 if m == 1 else 5
    n = rows * m
    g = torch.Generator().manual_seed(m)
    specials = parts_with_specials(k, n, seed=m + k)
    finite = [torch.randn(n, generator=g) for _ in range(k)]
    for x in (specials[0], finite[0]):
        x[: n // 2] = torch.round(x[: n // 2] * 4) / 4  # equal magnitudes
    pre = [torch.randn(n, generator=g) if i != 1 else None for i in range(k)]  # input 1 taken as it is
    cb = [-1.0 if i % 2 == 0 else 0.5 for i in range(k)]
    states = numpy.concatenate([magprune.stream_words(numpy.random.PCG64(10 + i)) for i in range(k)])
    states[4:6] = (1, 0x9E3779B9)  # the first stream has a half word left over
    before = states.copy()
    skip = 3 * m + 1
    base = torch.randn(n, generator=g)
    seen = set()
    for a, (density, epsilon), rescale, frequency, merge, taker, scale in itertools.product(
            (specials, finite), [(0.3, 0.2), (0.75, 0.25)], (1, 0), (0, 1), (-1, 0, 1, 2),
            [None, (1.0, 1.0), (0.7, -2.0)], (1.0, 0.3)):
        if m == 1 and (merge, frequency) != (1, 0) or taker is not None and scale != 1.0:
            continue
        c, d = magprune.ramp(m, density, epsilon)
        parts = []
        for i in range(k):
            x = a[i].clone()
            if pre[i] is not None:
                lib.tv_axpy_f32(x.data_ptr(), pre[i].data_ptr(), cb[i], n)
            part = torch.empty(n)
            st = states[6 * i: 6 * i + 6].copy()
            room = numpy.empty(magprune.SCRATCH * m + 32, dtype=numpy.uint64)
            lib.tv_magprune_f32(st.ctypes.data, skip, x.data_ptr(), rows, m, c, d, rescale, room.ctypes.data,
                                part.data_ptr(), None)
            parts.append(part)
        pointers = (ctypes.c_void_p * k)(*[part.data_ptr() for part in parts])
        expected = torch.empty(n)
        if merge < 0 and taker is None:  # della_linear's sum
            expected = torch.zeros(n)
            for part in parts:
                lib.tv_axpy_f32(expected.data_ptr(), part.data_ptr(), 1.0, n)
        elif merge < 0:
            continue  # (no step takes della_linear's sum in the executor)
        elif taker is None:
            lib.tv_sign_merge_f32(pointers, k, n, frequency, merge, expected.data_ptr())
        else:
            lib.tv_sign_merge_add_f32(pointers, k, n, frequency, merge, base.data_ptr(), taker[0], taker[1],
                                      expected.data_ptr())
        if taker is None and scale != 1.0:
            lib.tv_scale_f32(expected.data_ptr(), scale, n, expected.data_ptr())
        got = torch.full((n + 1,), 123.0)
        scratch = numpy.empty(magprune.SCRATCH * m + 32 + ((k + 1) * m + 1) // 2, dtype=numpy.uint64)
        bad = lib.tv_della_rows_f32(
            (ctypes.c_void_p * k)(*[x.data_ptr() for x in a]),
            (ctypes.c_void_p * k)(*[p.data_ptr() if p is not None else None for p in pre]),
            (ctypes.c_float * k)(*cb), states.ctypes.data, skip, k, rows, m, c, d, rescale, frequency, merge, scale,
            base.data_ptr() if taker is not None else None, *(taker or (1.0, 1.0)), scratch.ctypes.data,
            got.data_ptr())
        assert torch.equal(got[:n].view(torch.int32), expected.view(torch.int32)), (density, rescale, merge, taker)
        assert bad == int(not torch.isfinite(expected).all())
        assert got[n] == 123.0 and numpy.array_equal(states, before)
        seen.add(bad)
    assert seen == {0, 1}


SPECIAL = torch.tensor([float("nan"), -float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1.0, -1.0, 2.5])


def parts_with_specials(k: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(k):
        p = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.4)  # zeros, as after a trim
        where = torch.randint(0, n, (n // 8,), generator=g)
        p[where] = SPECIAL[torch.randint(0, len(SPECIAL), (n // 8,), generator=g)]
        parts.append(p)
    return parts


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (so -0.0 is not 0.0), but any NaN equals any NaN."""
    nan = torch.tensor(0x7FC00000, dtype=torch.int32)
    bits = [torch.where(t.isnan(), nan, t.view(torch.int32)) for t in (a, b)]
    return torch.equal(*bits)


@needs_helper
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_sign_merge_equals_the_torch_path(monkeypatch, k):
    seen_nan = False
    for n in (1, 15, 16, 17, 511, 512, 513, 4099):  # the C tiles are 512 entries
        parts = parts_with_specials(k, n, seed=k * 1000 + n)
        for elect in ("total", "frequency"):
            for merge in ("sum", "mean", "weighted_mean"):
                for elect_on in ("weighted", "unweighted"):
                    options = dict(elect=elect, merge=merge, weights=[1.0] * k, elect_on=elect_on)
                    fast = sign_merge(parts, out=torch.empty(n), **options)
                    monkeypatch.setenv("TVLANG_NATIVE", "0")
                    slow = sign_merge(parts, out=torch.empty(n), **options)
                    monkeypatch.delenv("TVLANG_NATIVE")
                    assert same_values(fast, slow), (k, n, elect, merge, elect_on)
                    seen_nan = seen_nan or bool(fast.isnan().any())
    assert seen_nan  # the data reaches the NaN cases (its -0.0 and infinities are in every part)


@needs_helper
def test_sign_merge_by_hand():
    a = torch.tensor([1.0, -2.0, 3.0, 0.0, -0.0, 1.0])
    b = torch.tensor([2.0, 1.0, -1.0, 0.0, -0.0, -1.0])
    c = torch.tensor([-4.0, 0.0, -1.0, 0.0, 0.0, 0.0])
    out = torch.empty(6)
    # total: tallies -1, -1, 1, 0, 0, 0 elect -, -, +, +, +, +; mean of the agreeing entries
    assert native.sign_merge_f32([a, b, c], "total", "mean", out) is out
    assert out.tolist() == [-4.0, -2.0, 3.0, 0.0, 0.0, 1.0]
    assert not out[4].signbit()  # clamp(-0.0 * 1) + 0.0: the first input's -0.0 made +0.0
    # frequency: sign counts 1, 0, -1, 0, 0, 0 elect +, +, -, +, +, +; sum of the agreeing
    native.sign_merge_f32([a, b, c], "frequency", "sum", out)
    assert out.tolist() == [3.0, 1.0, -2.0, 0.0, 0.0, 1.0]


@needs_helper
def test_the_helper_only_takes_what_it_computes_the_same():
    x = torch.ones(8)
    out = torch.empty(8)
    assert native.sign_merge_f32([x.double()], "total", "mean", out.double()) is None
    assert native.sign_merge_f32([x.bfloat16()], "total", "mean", out) is None
    assert native.sign_merge_f32([torch.ones(16)[::2]], "total", "mean", out) is None  # not contiguous
    assert native.sign_merge_f32([x, torch.ones(7)], "total", "mean", out) is None
    assert native.sign_merge_f32([x], "none", "mean", out) is None


@needs_helper
def test_window_gather_equals_numpy():
    g = torch.Generator().manual_seed(4)
    for n in (1, 7, 8, 9, 4095, 4096, 4097, 20000):
        x = torch.randn(n, generator=g)
        x[torch.randint(0, n, (max(n // 10, 1),), generator=g)] = SPECIAL[:6].repeat(n)[: max(n // 10, 1)]
        raw = x.numpy().view(numpy.int32)
        mag = raw & 0x7FFFFFFF
        scratch = numpy.empty(n + 1, numpy.int32)
        for lo_value, hi_value in [(0.5, 1.5), (1.0, None), (0.0, float("inf")), (2.0, float("nan")), (3.0, 0.1)]:
            lo = int(numpy.float32(lo_value).view(numpy.int32))
            hi = None if hi_value is None else int(numpy.float32(hi_value).view(numpy.int32) & 0x7FFFFFFF)
            picked, above = native.window_gather(raw, lo, hi, scratch)
            inside = (mag >= lo) & (mag <= hi) if hi is not None else mag >= lo
            assert numpy.array_equal(picked, mag[inside]), (n, lo_value, hi_value)
            assert above == (int((mag > hi).sum()) if hi is not None else 0), (n, lo_value, hi_value)
        windows = []
        for lo_value, hi_value in [(0.5, 1.5), (1.0, None), (0.0, float("inf")), (2.0, float("nan")), (3.0, 0.1)]:
            lo = int(numpy.float32(lo_value).view(numpy.int32))
            hi = None if hi_value is None else int(numpy.float32(hi_value).view(numpy.int32) & 0x7FFFFFFF)
            windows.append((lo, hi))
        second = numpy.empty(n + 1, numpy.int32)
        for pair in [(windows[0], windows[1]), (windows[1], windows[0]), (windows[2], windows[3]),
                     (windows[4], windows[0]), (windows[0], windows[0])]:
            got = native.window_gather2(raw, list(pair), [scratch, second])
            for (picked, above), window in zip(got, pair):  # each as window_gather alone gives it
                alone = native.window_gather(raw, *window, numpy.empty(n + 1, numpy.int32))
                assert numpy.array_equal(picked, alone[0]) and above == alone[1], (n, pair)


@needs_helper
def test_window_gather_many_windows_and_sizes_stay_in_scratch():
    """Eight patterns at a time (AVX2) and the tail one by one: every window and length against
    numpy, the scratch of ``n + 1`` entries never written past (a guard after it stays)."""
    rng = numpy.random.default_rng(11)
    for n in (0, 1, 5, 8, 15, 16, 17, 63, 64, 65, 1000, 4103):
        x = rng.standard_normal(n).astype(numpy.float32)
        x[rng.integers(0, max(n, 1), n // 7)] = rng.choice([0.0, -0.0, numpy.inf, -numpy.inf, numpy.nan], n // 7)
        raw = x.view(numpy.int32)
        mag = raw & 0x7FFFFFFF
        patterns = numpy.sort(numpy.unique(mag)) if n else numpy.zeros(1, numpy.int32)
        for _ in range(6):
            lo, hi = sorted(int(v) for v in rng.choice(patterns, 2))
            guard = [numpy.full(n + 1 + 64, -7, numpy.int32) for _ in range(2)]
            for window in ((lo, hi), (lo, None)):
                picked, above = native.window_gather(raw, *window, guard[0][:n + 1])
                inside = (mag >= lo) & ((mag <= hi) if window[1] is not None else True)
                assert numpy.array_equal(picked, mag[inside]), (n, window)
                assert above == (int((mag > hi).sum()) if window[1] is not None else 0)
            got = native.window_gather2(raw, [(lo, hi), (hi, None)], [g[:n + 1] for g in guard])
            assert numpy.array_equal(got[0][0], mag[(mag >= lo) & (mag <= hi)]) and got[0][1] == int((mag > hi).sum())
            assert numpy.array_equal(got[1][0], mag[mag >= hi]) and got[1][1] == 0
            assert all((g[n + 1:] == -7).all() for g in guard), n


@needs_helper
def test_window_gather_of_an_axpy_equals_the_gather_of_its_result():
    """window_gather_axpy: the patterns of fma(x, c, a) gathered a block at a time without a
    buffer for them, as the axpy (tv_axpy_f32, torch.add(a, x, alpha=c)) then window_gather or
    window_gather2 give them; across the blocks of 4,096 entries and the eight-entry vectors, the
    scratch of ``n + 1`` entries never written past."""
    if native.linear_steps() is None:
        pytest.skip("no AVX2 and FMA here: the direct executor does not use the helper's axpy")
    rng = numpy.random.default_rng(12)
    for n in (0, 1, 7, 8, 9, 4095, 4096, 4097, 8200, 20001):
        a = rng.standard_normal(n).astype(numpy.float32)
        x = rng.standard_normal(n).astype(numpy.float32)
        x[rng.integers(0, max(n, 1), n // 9)] = rng.choice([0.0, -0.0, numpy.inf, numpy.nan], n // 9)
        for c in (-1.0, 0.3):
            made = torch.add(torch.from_numpy(a), torch.from_numpy(x), alpha=c).numpy()  # fused, as torch makes it
            ours = a.copy()
            native.linear_steps().tv_axpy_f32(ours.ctypes.data, x.ctypes.data, c, n)
            assert numpy.array_equal(made.view(numpy.int32), ours.view(numpy.int32))
            raw = made.view(numpy.int32)
            mag = raw & 0x7FFFFFFF
            patterns = numpy.sort(numpy.unique(mag)) if n else numpy.zeros(1, numpy.int32)
            lo, hi = sorted(int(v) for v in rng.choice(patterns, 2))
            for windows in ([(lo, hi)], [(lo, None)], [(lo, hi), (hi, None)], [(hi, None), (lo, hi)]):
                guard = [numpy.full(n + 1 + 64, -7, numpy.int32) for _ in range(2)]
                got = native.window_gather_axpy(a, x, c, windows, [g[:n + 1] for g in guard])
                for (picked, above), window in zip(got, windows, strict=True):
                    alone = native.window_gather(raw, *window, numpy.empty(n + 1, numpy.int32))
                    assert numpy.array_equal(picked, alone[0]) and above == alone[1], (n, c, window)
                assert all((g[n + 1:] == -7).all() for g in guard), n


@needs_helper
def test_band_trim_equals_the_torch_path(monkeypatch):
    g = torch.Generator().manual_seed(6)
    for n in (1, 7, 8, 33, 4099):
        x = torch.randn(n, generator=g)
        x[torch.randint(0, n, (max(n // 6, 1),), generator=g)] = SPECIAL[torch.randint(0, len(SPECIAL),
                                                                                        (max(n // 6, 1),), generator=g)]
        x[::7] = 1.5  # exactly at a cut
        for low, high in [(0.5, 1.5), (1.5, 2.5), (0.1, math.inf), (1e-3, 1e-2)]:
            fast = trim(x, low, high, slot="test.fast").clone()
            monkeypatch.setenv("TVLANG_NATIVE", "0")
            slow = trim(x, low, high, slot="test.slow").clone()
            monkeypatch.delenv("TVLANG_NATIVE")
            assert torch.equal(fast.view(torch.int32), slow.view(torch.int32)), (n, low, high)  # NaN's bits too
    out = torch.empty(4)
    x = torch.tensor([0.5, -2.0, float("inf"), 1.0])  # lo < |x| <= hi kept: 1.0 of (0.5, 1.0]
    assert native.band_f32(x, 0.5, 1.0, out) is out
    assert out[[0, 1, 3]].tolist() == [0.0, 0.0, 1.0] and bool(out[2].isnan())  # inf - inf, as torch


@needs_helper
def test_hardshrink_equals_torch():
    """The torch-free executor's ties trim (tvlang.run.direct): torch's hardshrink, bit for bit."""
    lib = native.library()
    g = torch.Generator().manual_seed(7)
    for n in (1, 7, 8, 33, 4099):
        x = torch.randn(n, generator=g)
        x[torch.randint(0, n, (max(n // 6, 1),), generator=g)] = SPECIAL[torch.randint(0, len(SPECIAL),
                                                                                        (max(n // 6, 1),), generator=g)]
        x[::7] = 1.5
        for lo in (0.0, 1.4999999, 1.5, 1e-3, 1e30):
            out = torch.empty(n)
            lib.tv_hardshrink_f32(x.data_ptr(), n, lo, out.data_ptr())
            assert torch.equal(out.view(torch.int32), torch.hardshrink(x, lo).view(torch.int32)), (n, lo)


@needs_helper
def test_window_select_is_the_same_with_and_without_the_helper(monkeypatch):
    g = torch.Generator().manual_seed(8)
    n = 300_000
    x = torch.randn(n, generator=g)
    x[::97] = 1.25  # ties at and around the ranks
    x[5::1001] = float("nan")
    ranks = [n // 5, n // 100, n // 2]

    def select() -> list:
        w = WindowSelect(n, ranks)
        for start in range(0, n, 50_000):
            w.sample(x[start:start + 4096])
        w.end_sample()
        for p in range(3):
            if p >= w.passes:
                break
            for start in range(0, n, 70_001):
                w.update(p, x[start:start + 70_001])
            w.end_pass(p)
        return [(repr(w.value(k)), w.tied(k)) for k in ranks] + [w.passes]  # repr: nan == nan

    fast = select()
    assert fast[-1] == 1  # the sampled windows held every rank: one pass, the gathered entries
    monkeypatch.setenv("TVLANG_NATIVE", "0")
    assert fast == select()


def ram_parts(k: int, n: int, seed: int, epsilon: float) -> list[torch.Tensor]:
    """Inputs with NaN, infinities and signed zeros, and values on both sides of ``epsilon``
    as float32 rounds it (the helper compares in float32, as torch does)."""
    parts = parts_with_specials(k, n, seed)
    eps32 = torch.tensor(epsilon, dtype=torch.float32)
    near = torch.stack([eps32, torch.nextafter(eps32, torch.tensor(0.0)), torch.nextafter(eps32, torch.tensor(1.0))])
    g = torch.Generator().manual_seed(seed + 1)
    for p in parts:
        where = torch.randint(0, n, (max(n // 5, 1),), generator=g)
        signs = torch.where(torch.rand(len(where), generator=g) < 0.5, -1.0, 1.0)
        p[where] = near[torch.randint(0, 3, (len(where),), generator=g)] * signs
    return parts


@needs_helper
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_ram_and_ramplus_equal_the_torch_path(monkeypatch, k):
    from tvlang.ops.context import TensorContext
    from tvlang.ops.ram import ram, ramplus_tl

    for n in (1, 15, 511, 512, 513, 4099):  # the C tiles are 512 entries
        for epsilon in (0.01, 0.5, 0.0):
            parts = ram_parts(k, n, seed=k * 100 + n, epsilon=epsilon)
            ctx = TensorContext("w")
            fast = [ram(parts, ctx, epsilon=epsilon), ramplus_tl(parts, ctx, r=0.5, alpha=0.2, epsilon=epsilon)]
            monkeypatch.setenv("TVLANG_NATIVE", "0")
            slow = [ram(parts, ctx, epsilon=epsilon), ramplus_tl(parts, ctx, r=0.5, alpha=0.2, epsilon=epsilon)]
            monkeypatch.delenv("TVLANG_NATIVE")
            for a, b, what in zip(fast, slow, ("ram", "ramplus_tl")):
                assert same_values(a, b), (k, n, epsilon, what)


@needs_helper
def test_ramplus_counts_equal_the_torch_path(monkeypatch):
    from tvlang.ops.ram import RamPlusCounts

    parts = ram_parts(3, 5000, seed=3, epsilon=0.01)
    counts = []
    for native_on in (True, False):
        if not native_on:
            monkeypatch.setenv("TVLANG_NATIVE", "0")
        counter = RamPlusCounts(3, 0.5, 0.2, 0.01)
        for start in range(0, 5000, 1700):  # in pieces, as a chunked pass hands them over
            counter.observe(0, [p[start:start + 1700] for p in parts])
        counts.append((counter.shared, counter.unique))
    assert counts[0] == counts[1] and sum(counts[0][0]) > 0 and sum(counts[0][1]) > 0


@needs_helper
def test_ram_by_hand():
    a = torch.tensor([1.0, 2.0, 0.0, 0.005, float("nan"), -3.0])
    b = torch.tensor([3.0, 0.0, 0.0, 0.02, 1.0, -0.0])
    out = torch.empty(6)
    assert native.ram_f32([a, b], 0.01, out) is out  # 0.005 does not contribute, 0.02 does
    assert out[[0, 1, 2, 3, 5]].tolist() == [2.0, 2.0, 0.0, 0.019999999552965164, -3.0]
    assert bool(out[4].isnan())  # NaN * 0 is NaN, as in torch's kernel
    # counts 2, 1, 0, 1, 1, 1 (a's NaN does not contribute): both share entry 0; a alone at 1 and 5,
    # b alone at 3 and 4
    assert native.ramplus_count_f32([a, b], 0.01) == ([1, 1], [2, 2])


@needs_helper
def test_nearswap_equals_the_torch_path(monkeypatch):
    from tvlang.ops.context import TensorContext
    from tvlang.ops.nearswap import nearswap

    for n in (1, 7, 8, 9, 4099):
        a, b = parts_with_specials(2, n, seed=n)
        b[::3] = a[::3] + 1e-7  # closer than the floor on |a - b|
        b[1::5] = a[1::5]  # equal: d = 0
        for t in (0.0, 1e-7, 0.05, 0.5, 1e30):
            fast = nearswap([a, b], TensorContext("w"), t=t)
            monkeypatch.setenv("TVLANG_NATIVE", "0")
            slow = nearswap([a, b], TensorContext("w"), t=t)
            monkeypatch.delenv("TVLANG_NATIVE")
            assert same_values(fast, slow), (n, t)


@needs_helper
def test_flags_times_factor_equal_the_torch_path():
    for n in (1, 7, 8, 9, 64, 4099):
        x = parts_with_specials(1, n, seed=n)[0]  # an infinity dropped is NaN (x * 0.0), as in torch
        flags = numpy.random.default_rng(n).random(n) < 0.3
        packed = numpy.packbits(flags)
        for factor in (None, 3.7, 1e-30):
            out = torch.empty(n)
            assert native.flags_scale_f32(x, packed, factor, out) is out
            expected = torch.mul(x, torch.from_numpy(numpy.unpackbits(packed, count=n).view(numpy.bool_)))
            if factor is not None:
                expected.mul_(factor)
            assert same_values(out, expected), (n, factor)
    assert native.flags_scale_f32(torch.ones(9), numpy.zeros(1, dtype=numpy.uint8), None, torch.empty(9)) is None


RECIPES = [
    "pre + dare_ties(a - pre, b - pre, c - pre, p=0.8, seed=5)",
    'pre + dare_ties(a - pre, b - pre, c - pre, p=0.8, seed=5, rescale_by="l1")',
    'pre + dare(a - pre, 0.6, seed=2, rescale_by="l1") + dare_linear(b - pre, c - pre, p=0.5, rescale_by="l1")',
    "pre + ties(a - pre, b - pre, c - pre, density=0.3)",
    'pre + ties(a - pre, b - pre, c - pre, density=0.3, elect="frequency", merge="sum")',
    "pre + dare(a - pre, 0.6, seed=2) + dare(b - pre, 0.3, seed=9)",
    "pre + breadcrumbs(a - pre, density=0.3, gamma=0.05) + topk(b - pre, density=0.1)",
    "pre + ties(a - pre, b - pre, density=0.5, weights=[0.7, 1.3])",  # weights: the torch path
    "pre + ram(a - pre, b - pre, c - pre, epsilon=0.05)",
    "pre + ramplus_tl(a - pre, b - pre, c - pre, epsilon=0.05)",
    "nearswap(a, b, 0.05)",
    # the block sums of tvlang.ops.sums (norms, dot products, Gram matrices) before the main pass
    "slerp(a, b, t=0.3)",
    "model_stock(pre, a, b, c)",
    "pre + multislerp(a - pre, b - pre, c - pre)",
    "pre + karcher(a - pre, b - pre, c - pre)",
    "nuslerp(a, b, 0.4)",
    "pre + (a - pre) * (norm(b - pre) / norm(a - pre)) + cos(a - pre, c - pre) * (c - pre)",
    "pre + sce(a - pre, b - pre, c - pre, select_topk=0.5)",
    "arcee_fusion(pre, a)",  # the importances and the fusion in the helper (the chunk form)
    "pre + random_like(a - pre, seed=4)",
    # MAGPRUNE's ranks, probabilities and products in the helper
    "pre + della(a - pre, b - pre, c - pre, density=0.4, epsilon=0.2, seed=3)",
    'pre + della_linear(a - pre, b - pre, density=0.5, epsilon=0.1, seed=6, rescale_by="l1")',
    "pre + della(a - pre, b - pre, density=0.3, epsilon=0.1, rescale=false)",
]


@needs_helper
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 257, 1824])
def test_magprune_equals_the_torch_path(monkeypatch, pcg_ways, m):
    """The helper's ranks (a radix sort), probabilities, comparisons and products against the torch
    path's sort and calls: the same outputs and keep flags, bit for bit (a NaN's payload aside), with
    equal magnitudes (ranked by position), -0.0, infinities and NaN in the rows; and the words drawn
    by pieces come out as numpy's, the generator and the spare half where numpy's path leaves them."""
    rows = 41
    x = parts_with_specials(1, rows * m, seed=m)[0]
    x[: rows * m // 3] = torch.round(x[: rows * m // 3] * 4) / 4  # many equal magnitudes
    # (0.75, 0.25): the largest probability is 1.0 exactly where m - 1 is a power of two (every word below it)
    for (density, epsilon), rescale in itertools.product([(0.3, 0.2), (0.75, 0.25)], (True, False)):
        results = []
        for helper in (True, False):
            if not helper:
                monkeypatch.setenv("TVLANG_NATIVE", "0")
            sampler = Magprune(density, epsilon, numpy.random.PCG64(m), rescale, m)
            flags = Magprune(density, epsilon, numpy.random.PCG64(m), rescale, m)
            out, kept = torch.empty(rows * m), []
            for start, stop in [(0, 7), (7, 8), (8, rows)]:  # pieces of whole rows, odd word counts
                sampler.apply(x[start * m:stop * m], out[start * m:stop * m])
                kept.append(flags.kept(x[start * m:stop * m]).reshape(-1))
            results.append((out, torch.cat(kept), sampler.words.bits.state, sampler.words.spare))
            monkeypatch.delenv("TVLANG_NATIVE", raising=False)
        (fast, fast_kept, fast_state, fast_spare), (slow, slow_kept, slow_state, slow_spare) = results
        assert same_values(fast, slow), (m, rescale)
        assert torch.equal(fast_kept, slow_kept) and 0 < int(fast_kept.sum()) < rows * m
        assert fast_state == slow_state and (fast_spare is None) == (slow_spare is None)
        assert fast_spare is None or fast_spare.tolist() == slow_spare.tolist()


def spread_rows(m: int, seed: int) -> torch.Tensor:
    """Rows whose magnitudes spread in every way the helper's bucket ranking (native.c: row_ranks)
    treats apart: Gaussian; one magnitude for the whole row; 90 % exact zeros; denormals to
    3e38 (past the 16 binades of the buckets); a few huge outliers; half the row one value (a bucket
    sorted by radix); 40 copies of each of a few values (buckets sorted by insertion); values a few
    ulps apart (a key span below the bucket count); a quarter each of +-0.5 and +-0.25."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(m, generator=g) * 0.01
    rows = [gauss.clone(), torch.full((m,), -0.375)]
    zeros = gauss * (torch.rand(m, generator=g) < 0.1)
    rows.append(zeros)
    wide = torch.logspace(-44, 38, m).to(torch.float32)
    rows.append(wide[torch.randperm(m, generator=g)] * torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0))
    outliers = gauss.clone()
    outliers[torch.randint(0, m, (3,), generator=g)] = 1e4
    rows.append(outliers)
    half = gauss.clone()
    half[torch.rand(m, generator=g) < 0.5] = 0.0078125
    rows.append(half)
    copies = gauss.clone()
    for value in (0.001, 0.004, -0.02):
        copies[torch.randint(0, m, (40,), generator=g)] = value
    rows.append(copies)
    ulps = (torch.ones(m) + torch.randint(0, 64, (m,), generator=g) * 2.0 ** -23) * 3.0
    rows.append(ulps)
    rows.append(torch.tensor([0.5, -0.5, 0.25, -0.25])[torch.randint(0, 4, (m,), generator=g)])
    return torch.stack(rows)


def helper_and_torch(monkeypatch, x: torch.Tensor, m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MAGPRUNE of rows of ``m`` (density 0.5, epsilon 0.4, rescaled) by the helper and by the torch
    path (TVLANG_NATIVE=0): each way's outputs and keep flags."""
    results = []
    for helper in (True, False):
        if not helper:
            monkeypatch.setenv("TVLANG_NATIVE", "0")
        out = torch.empty_like(x)
        Magprune(0.5, 0.4, numpy.random.PCG64(m), True, m).apply(x, out)
        kept = Magprune(0.5, 0.4, numpy.random.PCG64(m), True, m).kept(x).reshape(-1)
        results.append((out, kept))
        monkeypatch.delenv("TVLANG_NATIVE", raising=False)
    return results


@needs_helper
@pytest.mark.parametrize("m", [2, 16, 17, 300, 1288, 3432, 4096])
def test_magprune_ranks_rows_of_every_spread(monkeypatch, pcg_ways, m):
    """The helper's bucket ranking against the torch path's stable sort, bit for bit, on rows that
    take each of its paths (one bucket for all, the clamp below 16 binades, windows of up to 16
    items, buckets sorted by insertion and by radix), both ways (pcg_ways: the windows counted by
    AVX-512 comparisons where the PCG64 lanes step as vectors, else by AVX2's or the baseline's)."""
    x = spread_rows(m, seed=m).reshape(-1)
    (fast, fast_kept), (slow, slow_kept) = helper_and_torch(monkeypatch, x, m)
    assert torch.equal(fast_kept, slow_kept)
    assert same_values(fast, slow)
    # by hand, for the row of one magnitude: entry j has rank j, so p = 0.1 + 0.8 * j / (m - 1)
    words = numpy.random.PCG64(m).random_raw(x.numel()).view(numpy.uint32)[m:2 * m].astype(numpy.float64)
    p = (torch.arange(m, dtype=torch.float32) * numpy.float32(0.8 / (m - 1)) + numpy.float32(0.1)).double()
    assert torch.equal(fast_kept[m:2 * m], torch.from_numpy(words * 2.0 ** -32) < p)


@needs_helper
@pytest.mark.parametrize("m, binades", [(300, 2), (4864, 15), ((1 << 16) + 3, 15), ((1 << 21) + 5, 15),
                                        ((1 << 21) + 5, 8)])
def test_magprune_ranks_long_rows_by_short_items_or_long(monkeypatch, pcg_ways, m, binades):
    """Rows ranked by short items (the key's bits below the bucket's, then the column, in 32 bits:
    native.c, row_buckets) and rows whose short items would not fit (past 2**21 columns with keys
    over 15 binades: the long items), against the torch path's stable sort, bit for bit; with
    magnitudes over ``binades`` binades and no zero (no key clamped), and a few equal magnitudes."""
    g = torch.Generator().manual_seed(m + binades)
    signs = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    x = torch.exp2(torch.rand(m, generator=g) * binades - binades) * signs
    x[torch.randint(0, m, (m // 100,), generator=g)] = 0.5 ** (binades / 2)  # equal magnitudes, ranked by position
    (fast, fast_kept), (slow, slow_kept) = helper_and_torch(monkeypatch, x, m)
    assert torch.equal(fast_kept, slow_kept)
    assert same_values(fast, slow)
    assert 0.05 < float(fast_kept.float().mean()) < 0.95


@needs_helper
@pytest.mark.parametrize("n", [1, 5, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 77])
def test_block_sums_equal_the_torch_path(monkeypatch, n):
    """The helper's block sums and sums.block_values' torch loop: the same bits, per block, for
    products, squares and magnitudes, with large and tiny values, cancellation and a short last
    block; bfloat16 rows (always the torch loop) as their float32 values through the helper."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n).to(torch.float32)
    y = torch.where(torch.rand(n, generator=g) < 0.5, -x, torch.randn(n, generator=g))
    rows = -(-n // BLOCK)
    for second, l1 in [(y, False), (None, False), (None, True)]:
        fast = native.block_sums_f32(x, second, l1)
        assert fast is not None and len(fast) == rows
        monkeypatch.setenv("TVLANG_NATIVE", "0")
        try:
            slow = [value for start in range(0, n, BLOCK)
                    for value in block_values(x[start:start + BLOCK].view(1, -1),
                                              None if second is None else second[start:start + BLOCK].view(1, -1),
                                              l1=l1)]
        finally:
            monkeypatch.delenv("TVLANG_NATIVE")
        assert fast == slow, (n, second is None, l1)
        # by hand: each block's exact sum, to float64's precision
        for b, value in enumerate(fast):
            part = x[b * BLOCK:(b + 1) * BLOCK].double()
            other = part if second is None else second[b * BLOCK:(b + 1) * BLOCK].double()
            terms = part.abs() if l1 else part * other
            assert value == pytest.approx(math.fsum(terms.tolist()), rel=1e-12, abs=1e-300)
    half = torch.randn(n, generator=g).to(torch.bfloat16)
    wide = half.to(torch.float32)
    assert block_values(half.view(1, -1)[:, :BLOCK]) == native.block_sums_f32(wide[:BLOCK], None)[:1]


@needs_helper
@pytest.mark.parametrize("n", [0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 77])
@pytest.mark.parametrize("k, offsets", [(2, False), (3, True), (native.GRAM_VECTORS, True)])
def test_gram_sums_equal_the_block_sums_pair_by_pair(n, k, offsets):
    """tv_gram_sums_f32, every pair's blocks in one sweep (model_stock's offsets ``x_i - base`` made a
    block at a time): the same bits as numpy's float32 subtraction followed by tv_block_sums_f32 pair
    by pair, including equal vectors (a square), cancellation and a short last block; rows written
    ``stride`` apart, from the address given."""
    lib = native.library()
    rng = numpy.random.default_rng(n + k)
    scale = numpy.logspace(-20, 20, n).astype(numpy.float32) if n else numpy.ones(0, dtype=numpy.float32)
    xs = [(rng.standard_normal(n) * scale).astype(numpy.float32) for _ in range(k)]
    base = (xs[0] + rng.standard_normal(n).astype(numpy.float32) * 1e-3).astype(numpy.float32)  # x_0 - base: cancels
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    rows = -(-n // BLOCK)
    out = numpy.full((len(pairs), rows + 2), 7.0)  # two spare columns: the rows start one in, end one short
    vectors = [numpy.subtract(x, base) if offsets else x for x in xs]
    index = numpy.array(pairs, dtype=numpy.int32).reshape(-1)
    scratch = numpy.empty(k * BLOCK, dtype=numpy.float32)
    pointers = (ctypes.c_void_p * k)(*[x.ctypes.data for x in xs])
    lib.tv_gram_sums_f32(pointers, k, base.ctypes.data if offsets else None, index.ctypes.data, len(pairs), n,
                         rows + 2, out.ctypes.data + 8, scratch.ctypes.data)
    for p, (i, j) in enumerate(pairs):
        want = numpy.empty(rows)
        lib.tv_block_sums_f32(vectors[i].ctypes.data, vectors[j].ctypes.data, n, 0, want.ctypes.data)
        assert out[p, 1:rows + 1].tobytes() == want.tobytes(), (n, k, i, j)
        assert out[p, 0] == 7.0 and out[p, rows + 1] == 7.0
        for b, value in enumerate(want):  # by hand: each block's exact sum, to float64's precision
            terms = vectors[i][b * BLOCK:(b + 1) * BLOCK].astype(numpy.float64) * vectors[j][b * BLOCK:(b + 1) * BLOCK]
            assert value == pytest.approx(math.fsum(terms.tolist()), rel=1e-12, abs=1e-300)


@needs_helper
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_give_the_same_tensors_with_and_without_the_helper(monkeypatch, recipe):
    g = torch.Generator().manual_seed(11)
    shapes = {"w": (300, 70), "v": (1000,), "small": (5,)}
    pre = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    bound = {"pre": pre}
    for m in "abc":
        bound[m] = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in pre.items()}
    whole = tvlang.compile(recipe).evaluate(bound, allow_unused=True)
    chunk_in(monkeypatch, 4096)
    chunked = tvlang.compile(recipe).evaluate(bound, allow_unused=True)
    monkeypatch.setenv("TVLANG_NATIVE", "0")
    slow = tvlang.compile(recipe).evaluate(bound, allow_unused=True)
    for name in shapes:
        assert torch.equal(whole[name], slow[name]), name
        assert torch.equal(chunked[name], slow[name]), name


def test_the_build_hook_goes_on_without_a_compiler(tmp_path, monkeypatch):
    pytest.importorskip("hatchling", reason="the build hook needs hatchling")
    sys.path.insert(0, str(ROOT))
    try:
        import hatch_build
    finally:
        sys.path.remove(str(ROOT))
    (tmp_path / "tvlang" / "ops").mkdir(parents=True)
    shutil.copy(ROOT / "tvlang" / "ops" / "native.c", tmp_path / "tvlang" / "ops" / "native.c")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    why = hatch_build.compile_helper(tmp_path)
    assert why is not None and "no-such-compiler" in why
    assert sorted(p.name for p in (tmp_path / "tvlang" / "ops").iterdir()) == ["native.c"]  # nothing half-built
    monkeypatch.setenv("TVLANG_NATIVE", "0")
    assert hatch_build.compile_helper(tmp_path) == "TVLANG_NATIVE=0"
    if COMPILER:
        monkeypatch.delenv("CC")
        monkeypatch.delenv("TVLANG_NATIVE")
        assert hatch_build.compile_helper(tmp_path) is None
        assert (tmp_path / "tvlang" / "ops" / "libtvnative.so.1").is_file()


@needs_helper
def test_fusion_loops_equal_the_torch_calls():
    """arcee_fusion's importances and fusion in the helper: the values of fusion.py's torch calls,
    with -0.0, ties at the threshold, infinities and NaN among the entries (NaN where torch has NaN)."""
    g = torch.Generator().manual_seed(4)
    rows, width = 37, 129
    base = torch.randn(rows, width, generator=g)
    model = base + torch.randn(rows, width, generator=g) * 0.1
    model[0, :5] = base[0, :5]  # equal: a zero importance
    base[1, 0], model[1, 1], model[2, 2], base[3, 3] = -0.0, float("inf"), float("nan"), float("-inf")
    kl = torch.rand(rows, 1, generator=g)
    kl[4] = 0.0
    want = torch.sub(model, base).abs() * kl
    got = native.fusion_f32(base, model, kl, None, torch.empty(rows, width))
    assert same_values(got, want)
    threshold = float(want[5, 7])  # an entry exactly at it is kept
    mask = (want >= torch.tensor(threshold)).to(torch.float32)
    fused = torch.sub(model, base).mul_(mask).add_(base)
    got = native.fusion_f32(base, model, kl, threshold, torch.empty(rows, width))
    assert same_values(got, fused)
