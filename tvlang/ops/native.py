"""The optional compiled helper (tvlang/ops/native.c): DARE's masks, TIES' sign merge with unit
weights, the window pass of magnitude thresholds, breadcrumbs' band trim, RAM's and RAM+'s
per-entry means, nearswap, DARE's kept flags applied with the L1 factor, the block sums of norms
and dot products (tvlang.ops.sums), arcee_fusion's importances and fusion, random_like's float32
Gaussian noise (numpy's ziggurat over PCG64, :func:`normal_f32`), della's MAGPRUNE over float32
rows (``tv_magprune_f32``, ``tv_pcg64_words``: tvlang.ops.della), and the linear steps
of the torch-free executor (:func:`linear_steps`; tvlang.run.direct). This module imports numpy,
not torch (a caller's tensors bring torch with them).

Installing tvlang compiles ``native.c`` into ``tvlang/ops/libtvnative.so.1`` when a C compiler is
found (hatch_build.py; no Python headers needed), and this module loads it with ctypes.
Without it (no compiler at install, another platform, or ``TVLANG_NATIVE=0`` in the
environment) :func:`drop_mask_f32`, :func:`sign_merge_f32`, :func:`window_gather`,
:func:`band_f32`, the RAM functions, :func:`nearswap_f32`, :func:`flags_scale_f32`,
:func:`block_sums_f32`, :func:`fusion_f32` and :func:`normal_f32` return ``None`` and numpy and torch compute the
same values: the results never depend on it, only the time does (docs/performance-operators.md;
tests/test_native.py compares the two paths).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy

__all__ = ["LIBRARY", "library", "drop_mask_f32", "sign_merge_f32", "window_gather", "window_gather2",
           "window_gather_axpy", "band_f32", "ram_f32", "ramplus_count_f32", "ramplus_apply_f32", "nearswap_f32",
           "flags_scale_f32", "block_sums_f32", "fusion_f32", "normal_f32", "keep_bits", "ziggurat_tables",
           "linear_steps", "state_words", "set_state_words", "pcg64_wide", "FusedInput", "MERGE_CODES"]

#: where the install puts the compiled helper (a versioned name, ``.so.1``: a plain ``.so``
#: would look like a Python extension module to importers that walk the package)
LIBRARY = Path(__file__).with_name("libtvnative.so.1")

_MASK64 = (1 << 64) - 1
_loaded: list = []  # [library or None], filled on first use


_P, _N, _F, _I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_float, ctypes.c_int
#: each C function of native.c: its argument types and its result type
_SIGNATURES = {
    "tv_pcg64_drop_f32": ([_P, _N, ctypes.c_uint32, _F, _P], None),
    "tv_pcg64_normal_f32": ([_P, _N, _P, _P, _P, _P], None),
    "tv_pcg64_words": ([_P, _N, _P], None),
    "tv_magprune_f32": ([_P, ctypes.c_uint64, _P, _N, _N, _F, _F, _I, _P, _P, _P], None),
    "tv_della_rows_f32": ([_P, _P, _P, _P, ctypes.c_uint64, _N, _N, _N, _F, _F, _I, _I, _I, _F, _P, _F, _F, _P,
                           _P], _I),
    "tv_window_gather": ([_P, _N, ctypes.c_int32, ctypes.c_int32, _I, _P, _P], ctypes.c_size_t),
    "tv_window_gather2": ([_P, _N, _P, _P, _P, _P, _P, _P], None),
    "tv_window_gather_axpy": ([_P, _P, _F, _N, _I, _P, _P, _P, _P, _P, _P], None),
    "tv_band_f32": ([_P, _N, _F, _F, _P], None),
    "tv_hardshrink_f32": ([_P, _N, _F, _P], None),
    "tv_sign_merge_f32": ([_P, _N, _N, _I, _I, _P], None),
    "tv_ram_f32": ([_P, _N, _N, _F, _P], None),
    "tv_ramplus_count_f32": ([_P, _N, _N, _F, _P, _P], None),
    "tv_ramplus_apply_f32": ([_P, _N, _N, _F, _P, _P], None),
    "tv_nearswap_f32": ([_P, _P, _N, _F, _P], None),
    "tv_flags_scale_f32": ([_P, _P, _N, _I, _F, _P], None),
    "tv_block_sums_f32": ([_P, _P, _N, _I, _P], None),
    "tv_gram_sums_f32": ([_P, _N, _P, _P, _N, _N, _N, _P, _P], None),
    "tv_variance_f32": ([_P, _N, _N, _P], None),
    "tv_sce_erase_f32": ([_P, _N, _N, _P, _P], None),
    "tv_fusion_scores_f32": ([_P, _P, _P, _N, _N, _P], None),
    "tv_fuse_f32": ([_P, _P, _P, _N, _N, _F, _P], None),
    "tv_fma_ok": ([], _I),
    "tv_scale_f32": ([_P, _F, _N, _P], None),
    "tv_axpy_f32": ([_P, _P, _F, _N], None),
    "tv_linear_run_f32": ([_P, _F, _I, _P, _P, _N, _N, _P], _I),
    "tv_drop_axpy_f32": ([_P, _P, _F, _P, _P, _F, _F, _N, _P], None),
    "tv_pcg64_keep_bits": ([_P, _N, ctypes.c_uint32, _P], None),
    "tv_pcg64_wide": ([_I], _I),
    "tv_sub_mask_f32": ([_P, _P, _F, _P, _N, _P], None),
    "tv_sign_merge_add_f32": ([_P, _N, _N, _I, _I, _P, _F, _F, _P], None),
    "tv_sub_bits_f32": ([_P, _P, _F, _P, _N, _F, _N, _P], None),
    "tv_fused_merge_f32": ([_P, _N, _N, _F, _I, _I, _P, _F, _F, _P], _I),
    "tv_drop_chain_f32": ([_P, _P, _P, _N, _N, _P, _F, _P], _I),
    "tv_nonfinite_f32": ([_P, _N], _I),
    "tv_bf16_to_f32": ([_P, _N, _P], None),
    "tv_f32_to_bf16": ([_P, _N, _P], _I),
    "tv_f16_to_f32": ([_P, _N, _P], None),
    "tv_f32_to_f16": ([_P, _N, _P], _I),
}


class FusedInput(ctypes.Structure):
    """An input of ``tv_fused_merge_f32`` (native.c's ``fused_input``): ``x = fma(b, cb, a)`` (``a``
    where ``b`` is NULL), its trim or drop (``form``, ``lo``, ``hi``; keep bits from bit ``offset``
    of ``packed``), and up to two tie windows (``bits``, ``start``, ``stop``, ``seen``)."""

    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("cb", ctypes.c_float), ("lo", ctypes.c_float),
                ("hi", ctypes.c_float), ("form", ctypes.c_int32), ("packed", ctypes.c_void_p),
                ("offset", ctypes.c_uint64), ("windows", ctypes.c_int32), ("bits", ctypes.c_int32 * 2),
                ("start", ctypes.c_double * 2), ("stop", ctypes.c_double * 2), ("seen", ctypes.c_uint64 * 2)]


def library():
    """The loaded helper, or ``None`` (not built, not loadable, or ``TVLANG_NATIVE=0``)."""
    if os.environ.get("TVLANG_NATIVE", "1") == "0":
        return None
    if not _loaded:
        lib = None
        if sys.byteorder == "little" and LIBRARY.is_file():
            try:
                lib = ctypes.CDLL(str(LIBRARY))
                for name, (arguments, result) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = arguments, result
            except (OSError, AttributeError):  # built for another machine, or an older file
                lib = None
        _loaded.append(lib)
    return _loaded[0]


def pcg64_wide(want: bool | None = None) -> bool | None:
    """Whether the helper draws PCG64's outputs in bulk eight at a time in vectors (AVX-512), as
    the processor allows; ``want`` False draws them as scalars, True as vectors where the processor
    can (for tests and benchmarks: the outputs are the same either way). ``None`` without the helper."""
    lib = library()
    if lib is None:
        return None
    return bool(lib.tv_pcg64_wide(-1 if want is None else int(want)))


def state_words(bits) -> numpy.ndarray:
    """A numpy ``PCG64``'s state and increment as four 64-bit words (low half first)."""
    state = bits.state["state"]
    s, inc = state["state"], state["inc"]
    return numpy.array([s & _MASK64, s >> 64, inc & _MASK64, inc >> 64], dtype=numpy.uint64)


def set_state_words(bits, words: numpy.ndarray) -> None:
    """Move ``bits`` to the state in ``words`` (as :func:`state_words` gives it); the
    increment and any buffered 32-bit half stay as they are."""
    state = bits.state
    state["state"]["state"] = int(words[0]) | (int(words[1]) << 64)
    bits.state = state


def drop_mask_f32(bits, n: int, threshold: int, scale: float, out: numpy.ndarray | None = None) -> numpy.ndarray | None:
    """The float32 masks of the next ``n`` entries (``scale`` where the entry's 32-bit word is
    at least ``threshold``, else 0) drawn in C from ``bits`` (a numpy ``PCG64``), which moves on
    by ``(n + 1) // 2`` outputs: the same values and the same state after as
    ``random_raw((n + 1) // 2)`` split into words, compared and scaled; in ``out`` (float32, at
    least ``n`` entries: its first ``n``) where given. ``None`` without the helper (``bits``
    untouched)."""
    lib = library()
    if lib is None or not isinstance(bits, numpy.random.PCG64):
        return None
    words = state_words(bits)
    mask = numpy.empty(n, dtype=numpy.float32) if out is None else out[:n]
    lib.tv_pcg64_drop_f32(words.ctypes.data, n, threshold, scale, mask.ctypes.data)
    set_state_words(bits, words)
    return mask


#: the ziggurat's rightmost layer edge R and the area V of each of its 256 layers (Marsaglia and
#: Tsang's normal ziggurat, as numpy draws its Gaussians): V = R f(R) + the tail's area beyond R
ZIGGURAT_R = 3.6541528853610087963519472518


def ziggurat_tables() -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """The float32 ziggurat's tables ``(k, w, f)``, 256 entries each, from its definition.

    With ``f(x) = exp(-x*x/2)``, layer edges ``x_255 = R`` and ``x_i = sqrt(-2 log(V/x_{i+1} +
    f(x_{i+1})))`` down to ``x_1``: ``w[i] = x_i / 2**23`` (``w[0] = (V/f(R)) / 2**23``), ``f[i] =
    f(x_i)`` (``f[0] = 1``), each rounded to float32, and ``k[i+1] = round(x_i/x_{i+1} * 2**23)``
    (``k[0] = round(R f(R)/V * 2**23)``, ``k[1] = 0``): the acceptance bounds of a 23-bit word.
    Computed in float64; they are numpy's tables (tests/test_native.py checks every ``k`` and
    ``w`` against numpy's draws, and :func:`normal_f32` checks a stream before it is used).

    >>> k, w, f = ziggurat_tables()
    >>> int(k[0]), int(k[1]), float(f[0]), len(w)
    (7838188, 0, 1.0, 256)
    """
    if not _tables:
        r = ZIGGURAT_R
        density = lambda x: math.exp(-0.5 * x * x)  # noqa: E731
        v = r * density(r) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
        scale = float(1 << 23)
        k, w, f = [0] * 256, [0.0] * 256, [0.0] * 256
        k[0] = round(r / (v / density(r)) * scale)
        w[0], w[255] = v / density(r) / scale, r / scale
        f[0], f[255] = 1.0, density(r)
        x = r
        for i in range(254, 0, -1):
            inner = math.sqrt(-2.0 * math.log(v / x + density(x)))
            k[i + 1] = round(inner / x * scale)
            x = inner
            f[i], w[i] = density(x), x / scale
        _tables.append((numpy.array(k, dtype=numpy.uint32), numpy.array(w, dtype=numpy.float32),
                        numpy.array(f, dtype=numpy.float32)))
    return _tables[0]


_tables: list = []  # [ziggurat_tables()], filled on first use
_normal_checked: list = []  # [whether the helper's Gaussians matched numpy's on this machine]


def _pcg64_state(bits) -> tuple[dict, numpy.ndarray]:
    """``bits.state`` and :func:`state_words` followed by its buffered half (``has_uint32``, ``uinteger``)."""
    state = bits.state
    half = numpy.array([state["has_uint32"], state["uinteger"]], dtype=numpy.uint64)
    return state, numpy.concatenate([state_words(bits), half])


def _normal_draw(lib, bits, n: int, out: numpy.ndarray) -> None:
    state, words = _pcg64_state(bits)
    k, w, f = ziggurat_tables()
    lib.tv_pcg64_normal_f32(words.ctypes.data, n, k.ctypes.data, w.ctypes.data, f.ctypes.data, out.ctypes.data)
    state["state"]["state"] = int(words[0]) | (int(words[1]) << 64)
    state["has_uint32"], state["uinteger"] = int(words[4]), int(words[5])
    bits.state = state


def _normal_matches(lib) -> bool:
    """Whether the helper draws numpy's Gaussians here: 65,536 of them from a fixed seed, and the
    state after (the tables come from float64 arithmetic of this machine's libm)."""
    ours, theirs = numpy.random.PCG64(20261130), numpy.random.PCG64(20261130)
    drawn = numpy.empty(1 << 16, dtype=numpy.float32)
    _normal_draw(lib, ours, len(drawn), drawn)
    expected = numpy.random.Generator(theirs).standard_normal(len(drawn), dtype=numpy.float32)
    return drawn.tobytes() == expected.tobytes() and ours.state == theirs.state


def normal_f32(bits, n: int, out: numpy.ndarray | None = None) -> numpy.ndarray | None:
    """The next ``n`` standard Gaussian float32 draws of ``bits`` (a numpy ``PCG64``), which moves
    on as it would under ``Generator(bits).standard_normal(n, dtype=float32)``: the same values and
    the same state after, drawn in C at about a quarter of numpy's time; in ``out`` (float32, at
    least ``n`` entries: its first ``n``) where given. ``None`` without the helper, or where its
    draws did not match numpy's on a first check (``bits`` untouched)."""
    lib = library()
    if lib is None or not isinstance(bits, numpy.random.PCG64):
        return None
    if not _normal_checked:
        _normal_checked.append(_normal_matches(lib))
    if not _normal_checked[0]:
        return None
    drawn = numpy.empty(n, dtype=numpy.float32) if out is None else out[:n]
    _normal_draw(lib, bits, n, drawn)
    return drawn


def keep_bits(bits, n: int, threshold: int, out: numpy.ndarray | None = None) -> numpy.ndarray | None:
    """The keep flags of the next ``n`` entries (an entry's 32-bit word at least ``threshold``, as
    :func:`drop_mask_f32` compares it) packed as ``numpy.packbits`` packs them, drawn in C from
    ``bits`` (a numpy ``PCG64``), which moves on as :func:`drop_mask_f32` moves it; in ``out``
    (uint8, at least ``ceil(n / 8)`` bytes: its first ones) where given. ``None`` without the
    helper (``bits`` untouched)."""
    lib = library()
    if lib is None or not isinstance(bits, numpy.random.PCG64):
        return None
    words = state_words(bits)
    size = -(-n // 8)
    packed = numpy.empty(size, dtype=numpy.uint8) if out is None else out[:size]
    lib.tv_pcg64_keep_bits(words.ctypes.data, n, threshold, packed.ctypes.data)
    set_state_words(bits, words)
    return packed


#: tv_sign_merge_f32's code of each merge
MERGE_CODES = {"sum": 0, "mean": 1, "weighted_mean": 2}


def _plain_f32(tensors: tuple, n: int) -> bool:
    """Whether the helper can take these tensors: float32, contiguous, on the CPU, ``n`` entries each."""
    import torch  # here, not at the top: the torch-free executor (tvlang.run.direct) loads this module

    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.numel() == n
               for t in tensors)


def _pointers(parts: list):
    """The tensors' data addresses as a C array of pointers."""
    return (ctypes.c_void_p * len(parts))(*[p.data_ptr() for p in parts])


def sign_merge_f32(parts: list, elect: str, merge: str, out) -> object | None:
    """:func:`tvlang.ops.ties.sign_merge` with every weight 1 in one C pass (``elect`` "total" or
    "frequency"): ``out``, or ``None`` where the helper cannot (not built; not float32,
    contiguous CPU tensors of one size), and the caller computes it with torch."""
    lib = library()
    if lib is None or elect not in ("total", "frequency") or merge not in MERGE_CODES or not parts:
        return None
    n = out.numel()
    if not _plain_f32((*parts, out), n):
        return None
    lib.tv_sign_merge_f32(_pointers(parts), len(parts), n, elect == "frequency", MERGE_CODES[merge], out.data_ptr())
    return out


def window_gather(raw: numpy.ndarray, lo: int, hi: int | None,
                  scratch: numpy.ndarray) -> tuple[numpy.ndarray, int] | None:
    """The magnitudes' bit patterns (``raw & 0x7FFFFFFF``) of the contiguous int32 patterns ``raw``
    that lie in ``[lo, hi]`` (``hi`` None: no upper end), in order, as a fresh array, and how many
    lie above ``hi``: what :class:`tvlang.ops.threshold.WindowSelect`'s numpy path gathers and
    counts. ``scratch``: int32, room for ``raw.size + 1``. ``None`` without the helper."""
    lib = library()
    if lib is None:
        return None
    above = numpy.zeros(1, dtype=numpy.uint64)
    count = lib.tv_window_gather(raw.ctypes.data, raw.size, lo, 0 if hi is None else hi, hi is not None,
                                 scratch.ctypes.data, above.ctypes.data)
    return scratch[:count].copy(), int(above[0])


def window_gather2(raw: numpy.ndarray, windows: list[tuple[int, int | None]],
                   scratch: list[numpy.ndarray]) -> list[tuple[numpy.ndarray, int]] | None:
    """:func:`window_gather` of two windows ``[(lo, hi), (lo, hi)]`` over the same ``raw`` in one
    pass (each window's into its own ``scratch``); ``None`` without the helper."""
    lib = library()
    if lib is None:
        return None
    return _gathered(windows, scratch, lambda *arrays: lib.tv_window_gather2(raw.ctypes.data, raw.size, *arrays))


def window_gather_axpy(a: numpy.ndarray, x: numpy.ndarray, c: float, windows: list[tuple[int, int | None]],
                       scratch: list[numpy.ndarray]) -> list[tuple[numpy.ndarray, int]] | None:
    """:func:`window_gather` (one window) or :func:`window_gather2` (two) of the patterns of
    ``fma(x, c, a)`` (float32 arrays of one size: an axpy's result, as ``tv_axpy_f32`` makes it),
    without making it in a buffer first; ``None`` where :func:`linear_steps` is (the axpy's fused
    multiply-add needs FMA)."""
    lib = linear_steps()
    if lib is None:
        return None
    return _gathered(windows, scratch, lambda *arrays: lib.tv_window_gather_axpy(
        a.ctypes.data, x.ctypes.data, c, a.size, len(windows), *arrays))


def _gathered(windows: list[tuple[int, int | None]], scratch: list[numpy.ndarray],
              gather: Callable[..., None]) -> list[tuple[numpy.ndarray, int]]:
    """What a gather of several windows gives: ``gather(lo, hi, has_hi, inside, count, above)`` is
    called with the addresses of the windows' ends, their scratch buffers and the counts it sets;
    each window's patterns (copied out of its scratch) and how many lie above it, in order."""
    k = len(windows)
    lo = numpy.array([w[0] for w in windows], dtype=numpy.int32)
    hi = numpy.array([0 if w[1] is None else w[1] for w in windows], dtype=numpy.int32)
    has_hi = numpy.array([w[1] is not None for w in windows], dtype=numpy.intc)
    inside = numpy.array([buffer.ctypes.data for buffer in scratch[:k]], dtype=numpy.uintp)
    count = numpy.zeros(k, dtype=numpy.uintp)
    above = numpy.zeros(k, dtype=numpy.uint64)
    gather(lo.ctypes.data, hi.ctypes.data, has_hi.ctypes.data, inside.ctypes.data, count.ctypes.data,
           above.ctypes.data)
    return [(buffer[:int(n)].copy(), int(over)) for buffer, n, over in zip(scratch, count, above)]


def band_f32(x, lo: float, hi: float, out) -> object | None:
    """``hardshrink(x, lo) - hardshrink(x, hi)`` into ``out`` in one C pass (the same values as
    those two torch calls and the subtraction), for float32, contiguous CPU tensors of one size;
    ``out``, or ``None`` where the helper cannot and the caller uses torch."""
    lib = library()
    if lib is None or not _plain_f32((x, out), x.numel()):
        return None
    lib.tv_band_f32(x.data_ptr(), x.numel(), lo, hi, out.data_ptr())
    return out


def ram_f32(parts: list, epsilon: float, out) -> object | None:
    """:func:`tvlang.ops.ram.ram` into ``out`` in one C pass (the same values as its torch
    operations), for float32, contiguous CPU tensors of one size; ``out``, or ``None`` where
    the helper cannot and the caller uses torch."""
    lib = library()
    if lib is None or not parts or not _plain_f32((*parts, out), out.numel()):
        return None
    lib.tv_ram_f32(_pointers(parts), len(parts), out.numel(), epsilon, out.data_ptr())
    return out


def ramplus_count_f32(parts: list, epsilon: float) -> tuple[list[int], list[int]] | None:
    """Per input, how many entries it contributes to with others and alone (``|x| > epsilon``):
    what :meth:`tvlang.ops.ram.RamPlusCounts.observe` adds up; ``None`` where the helper cannot."""
    lib = library()
    if lib is None or not parts or not _plain_f32(tuple(parts), parts[0].numel()):
        return None
    shared = numpy.zeros(len(parts), dtype=numpy.uint64)
    unique = numpy.zeros(len(parts), dtype=numpy.uint64)
    lib.tv_ramplus_count_f32(_pointers(parts), len(parts), parts[0].numel(), epsilon, shared.ctypes.data,
                             unique.ctypes.data)
    return [int(v) for v in shared], [int(v) for v in unique]


def ramplus_apply_f32(parts: list, epsilon: float, boosts: list[float], out) -> object | None:
    """:meth:`tvlang.ops.ram.RamPlusCounts.apply` into ``out`` in one C pass (the same values);
    ``out``, or ``None`` where the helper cannot."""
    lib = library()
    if lib is None or not parts or not _plain_f32((*parts, out), out.numel()):
        return None
    factors = numpy.array(boosts, dtype=numpy.float32)  # torch multiplies by them in float32
    lib.tv_ramplus_apply_f32(_pointers(parts), len(parts), out.numel(), epsilon, factors.ctypes.data,
                             out.data_ptr())
    return out


def nearswap_f32(a, b, t: float, out) -> object | None:
    """:func:`tvlang.ops.nearswap.nearswap` into ``out`` in one C pass (the same values as its
    torch calls; a NaN may come out with other bits); ``out``, or ``None`` where the helper
    cannot and the caller uses torch."""
    lib = library()
    if lib is None or not _plain_f32((a, b, out), out.numel()):
        return None
    lib.tv_nearswap_f32(a.data_ptr(), b.data_ptr(), out.numel(), t, out.data_ptr())
    return out


def flags_scale_f32(x, packed: numpy.ndarray, factor: float | None, out) -> object | None:
    """``x * flags`` (``packed``: ``numpy.packbits`` of ``x.numel()`` keep flags), then times
    ``factor`` when it is not ``None``, into ``out`` in one C pass: the same values as
    ``torch.mul(x, flags)`` and ``mul_(factor)``; ``out``, or ``None`` where the helper cannot."""
    lib = library()
    n = x.numel()
    if lib is None or not _plain_f32((x, out), n) or packed.dtype != numpy.uint8 or packed.size != (n + 7) // 8:
        return None
    packed = numpy.ascontiguousarray(packed)
    lib.tv_flags_scale_f32(x.data_ptr(), packed.ctypes.data, n, factor is not None,
                           0.0 if factor is None else factor, out.data_ptr())
    return out


def fusion_f32(base, model, kl, threshold: float | None, out) -> object | None:
    """arcee_fusion over rows (``base``, ``model`` and ``out``: ``(rows, width)``; ``kl``: ``(rows, 1)``):
    with ``threshold`` ``None`` the importances ``|model - base| * kl`` into ``out``, else the fusion
    ``base + (model - base) * [importance >= threshold]``, each in one C pass with the same values
    as tvlang.ops.fusion's torch calls; ``out``, or ``None`` where the helper cannot."""
    lib = library()
    rows = kl.numel()
    if lib is None or not _plain_f32((base, model, out), base.numel()) or not _plain_f32((kl,), rows):
        return None
    width = base.numel() // rows if rows else 0
    if threshold is None:
        lib.tv_fusion_scores_f32(base.data_ptr(), model.data_ptr(), kl.data_ptr(), rows, width, out.data_ptr())
    else:
        lib.tv_fuse_f32(base.data_ptr(), model.data_ptr(), kl.data_ptr(), rows, width, threshold, out.data_ptr())
    return out


#: entries per block of tv_block_sums_f32 (tvlang.ops.sums.BLOCK)
BLOCK = 1 << 14
#: the most vectors tv_gram_sums_f32 takes (native.c's TV_GRAM_VECTORS)
GRAM_VECTORS = 16


def block_sums_f32(x, y, l1: bool = False) -> list[float] | None:
    """The float64 sum over each block of :data:`BLOCK` entries of ``x * y`` (``y`` ``None``:
    ``x * x``; ``l1``: ``|x|``), flat float32 tensors of one length on the CPU, the last block
    zero-padded, by tvlang.ops.sums' halving tree: the same bits as its torch loop (the terms are
    exact in float64, the additions the same IEEE ones in the same order); ``None`` where the
    helper cannot and the caller uses torch."""
    lib = library()
    n = x.numel()
    pair = (x,) if y is None or l1 else (x, y)
    if lib is None or not _plain_f32(pair, n):
        return None
    out = numpy.empty(-(-n // BLOCK), dtype=numpy.float64)
    lib.tv_block_sums_f32(x.data_ptr(), pair[-1].data_ptr(), n, int(l1), out.ctypes.data)
    return out.tolist()


def linear_steps():
    """The helper where its linear steps give torch's bits, else ``None``.

    ``tv_scale_f32`` (``x * c``), ``tv_axpy_f32`` (``fma(x, c, acc)``) and
    ``tv_nonfinite_f32`` over float32 buffers, and the conversions of bfloat16 and float16 to
    and from float32 (``tv_bf16_to_f32`` ...): torch's CPU kernels compute ``mul`` and
    ``add(..., alpha=)`` so on a machine with AVX2 and FMA (and F16C), the kernels they pick there;
    elsewhere (another CPU, or ``ATEN_CPU_CAPABILITY=default``, which makes torch use its
    kernels without fused multiply-adds) ``None``, and the caller uses torch.
    """
    lib = library()
    if lib is None or os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default" or not lib.tv_fma_ok():
        return None
    return lib
