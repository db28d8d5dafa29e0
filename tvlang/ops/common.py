"""Shared pieces of the kernels: scratch buffers, options from the row, counts, magnitude thresholds.

The magnitude rule used by every pruning kernel (``topk``, ``ties``,
``breadcrumbs``) lives here so that they agree:

- ``keep_count(density, n)`` is ``floor(density * n)``, except that a product
  within 1e-6 of an integer counts as that integer (``0.29 * 100`` is
  ``28.999999999999996`` in floating point; it keeps 29 entries, not 28).
  With ``count="mergekit"`` it is mergekit 0.1.5's ``max(1, int(density * n))``
  (at least one entry of a non-empty tensor when ``0 < density < 1``; Python's
  ``int()``, no tolerance); :func:`truncated_count` is mergekit's plain
  ``int(density * n)`` (its breadcrumbs and ``sce``).
- Exactly ``k`` entries are kept. Entries are ranked by ``|x|``, largest first,
  and entries of equal magnitude by flat index, the earlier first (the order of a
  stable descending sort). The threshold ``t`` is the k-th largest magnitude;
  entries with ``|x| > t`` are kept, and of the entries tied at ``t`` the first
  ones in flat order, as many as ``k`` still needs (:class:`TieWindow`).
  ``k == 0`` keeps nothing (``t = inf``).

>>> keep_count(0.29, 100), keep_count(0.2, 3), keep_count(1.0, 7), keep_count(0.0, 7)
(29, 0, 7, 0)
>>> keep_count(0.29, 100, "mergekit"), keep_count(0.2, 3, "mergekit"), truncated_count(0.2, 3)
(28, 1, 0)
>>> kth_largest_abs(torch.tensor([3.0, -1.0, 2.0, -2.0]), 2)
2.0
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy
import torch

from tvlang.errors import TvlangError
from tvlang.language.builtins import BUILTINS
from tvlang.ops.ranks import bits_to_float, keep_count, pick_bin, tie_span, truncated_count

__all__ = ["COUNT_RULES", "TieWindow", "keep_count", "truncated_count", "tie_split", "settle_ties", "count_at_least",
           "count_equal", "kth_largest_abs", "magnitudes", "scratch", "clear_workspace", "kernel_of", "chunk_form_of",
           "ChunkKernel", "fresh", "helper_thread"]


# -- helper threads --------------------------------------------------------------

_HELPERS: dict[str, ThreadPoolExecutor] = {}
_HELPERS_LOCK = threading.Lock()


def helper_thread(name: str) -> ThreadPoolExecutor:
    """The process's background thread for ``name`` (one thread each, made on first use): work
    handed to it runs in the order it was handed over (``dare``'s masks drawn ahead: "draw";
    half of ``della``'s row sorts: "sort")."""
    with _HELPERS_LOCK:
        if name not in _HELPERS:
            _HELPERS[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tvlang-{name}")
        return _HELPERS[name]


# -- scratch buffers -------------------------------------------------------------

# Fresh tensors of tens of megabytes are mapped anew by the C allocator on each
# allocation and page-faulted on first touch, which costs more than the
# arithmetic the kernels do on them. Kernels therefore take their temporaries
# from a per-thread workspace that is reused from one tensor to the next. Only
# temporaries live here: a kernel's result is always a fresh tensor.
_local = threading.local()
SCRATCH_LIMIT_BYTES = 256 << 20


def scratch(slot: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A temporary with ``like``'s shape (and ``dtype``, default ``like.dtype``).

    Contents are undefined. The same ``slot`` returns the same memory on the
    next call, so a kernel must not hold on to it or return it. Temporaries
    above ``SCRATCH_LIMIT_BYTES`` are not kept (a fresh tensor each time), so
    the workspace never holds more than a few hundred megabytes per slot.
    """
    dtype = like.dtype if dtype is None else dtype
    n = like.numel()
    itemsize = torch.empty((), dtype=dtype).element_size()
    if n * itemsize > SCRATCH_LIMIT_BYTES:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    store = getattr(_local, "store", None)
    if store is None:
        store = _local.store = {}
    key = (slot, dtype, like.device)
    buf = store.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=dtype, device=like.device)
        store[key] = buf
    return buf[:n].view(like.shape)


def fresh(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new contiguous tensor with ``like``'s shape and device (a kernel's result)."""
    return torch.empty(like.shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


def clear_workspace() -> None:
    """Free the scratch buffers of this thread (the evaluator calls it after a run)."""
    _local.store = {}


# -- options from the row ----------------------------------------------------------

def kernel_of(name: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorate the kernel of row ``name``: the options a caller leaves out take the row's
    defaults (written only there), and every option is checked against the row before the
    kernel runs, errors naming the tensor."""

    def decorate(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(kernel)
        def with_options(inputs: list[torch.Tensor], ctx, **options) -> torch.Tensor:
            return kernel(inputs, ctx, **_options(name, options, len(inputs), ctx.name))

        return with_options

    return decorate


def chunk_form_of(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`kernel_of` for the chunk form ``factory(ctx, numel, n_inputs, dtype, **options)``."""

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(factory)
        def with_options(ctx, numel: int, n_inputs: int, dtype: torch.dtype, **options) -> Any:
            return factory(ctx, numel, n_inputs, dtype, **_options(name, options, n_inputs, ctx.name))

        return with_options

    return decorate


class ChunkKernel:
    """A chunk kernel (the protocol in tvlang/ops/registry.py) without passes; subclasses
    override what they need. ``row`` > 1: every piece handed to ``apply`` holds whole rows
    of that many entries (the evaluator cuts its chunks there). ``main_pass_cores``: the
    main pass runs on every core, the writer's included (arithmetic that outweighs the
    writing, and no thread of its own drawing random words)."""

    passes = 0
    row = 1
    main_pass_cores = False

    def observe(self, pass_index: int, pieces: list[torch.Tensor]) -> None:
        pass

    def end_pass(self, pass_index: int) -> None:
        pass

    def restart(self) -> None:
        pass

    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError


def _options(name: str, options: dict, n_inputs: int, tensor: str) -> dict:
    try:
        return BUILTINS[name].check_options(options, n_inputs)
    except TvlangError as err:
        err.tensor = err.tensor or tensor
        raise


# -- magnitude thresholds --------------------------------------------------------

COUNT_RULES = ("floor", "mergekit")


# -- exactly k: the tie-break by flat index -------------------------------------------

class TieWindow:
    """The entries tied at magnitude ``value``, numbered 1, 2, ... in flat order over the
    whole tensor: those numbered in ``(start, stop]`` take ``x``'s value in ``out``, the
    others 0. Pieces of a tensor go through :meth:`apply` in order (a running count
    carries the numbering from piece to piece), or the whole tensor at once.

    >>> x = torch.tensor([2.0, -1.0, 1.0, 3.0, 1.0])
    >>> out = x.clone()
    >>> w = TieWindow(1.0, 0, 1)
    >>> w.apply(x[:2], out[:2]); w.apply(x[2:], out[2:]); out
    tensor([ 2., -1.,  0.,  3.,  0.])
    """

    def __init__(self, value: float, start: float, stop: float) -> None:
        self.value, self.start, self.stop = float(value), start, stop
        self.seen = 0

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> None:
        flat, flat_out = x.reshape(-1), out.view(-1)
        mag = torch.abs(flat, out=scratch("ties.window", flat))
        positions = _where_equal(mag, self.value)
        m = positions.numel()
        if m:
            lo, hi = tie_span(self.start, self.stop, self.seen, m)
            flat_out[positions[:lo]] = 0
            flat_out[positions[hi:]] = 0
            inside = positions[lo:hi]
            flat_out[inside] = flat[inside]
        self.seen += m


def _numpy_view(mag: torch.Tensor):
    """``mag`` as a numpy array when that is possible without a copy (numpy counts and finds
    entries several times faster than torch's single-threaded comparisons here)."""
    if mag.device.type == "cpu" and mag.dtype in (torch.float32, torch.float64) and mag.is_contiguous():
        return mag.reshape(-1).numpy()
    return None


def _where_equal(mag: torch.Tensor, value: float) -> torch.Tensor:
    """Flat indices of the entries of ``mag`` equal to ``value``, ascending."""
    values = _numpy_view(mag)
    if values is not None:
        return torch.from_numpy(numpy.flatnonzero(values == values.dtype.type(value))).to(mag.device)
    return torch.nonzero(mag.reshape(-1) == value).view(-1)


def count_at_least(mag: torch.Tensor, t: float) -> int:
    """How many entries of ``mag`` are ``>= t``."""
    values = _numpy_view(mag)
    if values is not None:
        return int(numpy.count_nonzero(values >= values.dtype.type(t)))
    return int(torch.count_nonzero(mag >= t))


def count_equal(mag: torch.Tensor, t: float) -> int:
    """How many entries of ``mag`` equal ``t``."""
    values = _numpy_view(mag)
    if values is not None:
        return int(numpy.count_nonzero(values == values.dtype.type(t)))
    return int(torch.count_nonzero(mag == t))


def tie_split(mag: torch.Tensor, t: float, k: int) -> tuple[int, int]:
    """``(need, tied)``: of the ``tied`` entries of magnitude exactly ``t`` (the k-th
    largest of ``mag``), the top ``k`` hold ``need``."""
    tied = count_equal(mag, t)
    return k - (count_at_least(mag, t) - tied), tied


def settle_ties(x: torch.Tensor, out: torch.Tensor, t: float, k: int) -> torch.Tensor:
    """``out`` holds ``x`` where ``|x| >= t``, ``t`` the k-th largest ``|x|``: zero the
    tied entries beyond the first ones (flat order) so that exactly ``k`` are kept."""
    if not 0.0 < t < math.inf:
        return out  # nothing or everything is kept, or the ties are zeros
    values = _numpy_view(out)
    kept = int(numpy.count_nonzero(values)) if values is not None else int(torch.count_nonzero(out))
    if kept > k:
        tied = count_equal(torch.abs(x), t)
        TieWindow(t, 0, k - (kept - tied)).apply(x, out)
    return out


def magnitudes(x: torch.Tensor, slot: str = "mag", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``|x|`` flattened into a scratch buffer: float32, or float64 for float64 input
    unless ``dtype`` says otherwise."""
    if dtype is None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(-1)
    mag = scratch(slot, flat, dtype)
    if flat.dtype == dtype:
        torch.abs(flat, out=mag)
    else:
        mag.copy_(flat).abs_()
    return mag


_SMALL = 1 << 16  # below this size a plain topk is as fast as anything
_BINS = 1 << 16


def kth_largest_abs(x: torch.Tensor, k: int, *, mag: torch.Tensor | None = None, reorder: bool = False) -> float:
    """The k-th largest of ``|x|`` (``1 <= k <= x.numel()``), exactly; ``inf`` for ``k == 0``.

    ``mag`` may pass precomputed flat magnitudes (from :func:`magnitudes`);
    with ``reorder=True`` the caller allows their order to be changed (no
    copy is made), otherwise ``mag`` is left as it was. Large float32 tensors
    use numpy's introselect (``numpy.partition``: linear time in the worst
    case, NaN above ``inf``; about twice as fast as the radix select
    :func:`_radix`, which stays as a reference); small ones and float64 use
    ``torch.topk``. Never ``torch.kthvalue``: its quickselect takes quadratic
    time on some layouts (seconds for a quarter-million entries).
    """
    n = x.numel()
    if k <= 0:
        return math.inf
    if k > n:
        raise ValueError(f"k={k} > numel={n}")
    if mag is None:
        mag, reorder = magnitudes(x), True
    if n <= _SMALL or mag.dtype != torch.float32 or mag.device.type != "cpu":
        return float(torch.topk(mag, k, sorted=False).values.min())
    values = mag.reshape(-1).numpy()
    if reorder:
        values.partition(n - k)
        return float(values[n - k])
    return float(numpy.partition(values, n - k)[n - k])


def _radix(mag: torch.Tensor, k: int) -> float:
    """Exact k-th largest of non-negative float32 ``mag`` from two histograms of its bit pattern."""
    bits = mag.view(torch.int32)
    work = scratch("kth.bits", mag, torch.int32)
    torch.bitwise_right_shift(bits, 16, out=work)
    high, rank = _pick_bin(histogram(work, _BINS), k)
    torch.sub(bits, high << 16, out=work)
    work.clamp_(-1, _BINS).add_(1)  # the chosen bin's entries map to 1..65536
    low, _ = _pick_bin(histogram(work, _BINS + 2)[1:_BINS + 1], rank)
    return bits_to_float((high << 16) | low)


def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of the integers ``0 <= values < bins`` (int64, on the CPU).

    ``torch.bincount`` pays for its ``minlength`` on every call, which
    dominates for small tensors; ``index_add_`` does not.
    """
    if values.numel() >= (1 << 20):
        return torch.bincount(values.reshape(-1), minlength=bins).cpu()
    counts = torch.zeros(bins, dtype=torch.int64, device=values.device)
    ones = torch.ones(1, dtype=torch.int64, device=values.device).expand(values.numel())
    counts.index_add_(0, values.reshape(-1).long(), ones)
    return counts.cpu()


def _pick_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and that entry's rank within the bin from the top."""
    return pick_bin(hist.cpu().numpy(), k)  # small: numpy avoids torch's thread pool for it


@functools.lru_cache(maxsize=256)  # chunk forms ask for the same threshold once per piece
def below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number smaller than ``value`` (for strict comparisons)."""
    t = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)))
