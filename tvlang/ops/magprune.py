"""DELLA's MAGPRUNE without torch: rows, words and the compiled helper's sampling of whole rows.

Both executors sample ``della``'s inputs here where the compiled helper is built: the local one
through :class:`tvlang.ops.della.Magprune`, the torch-free one (:mod:`tvlang.run.direct`)
directly, so the two keep the same entries. The rules (tvlang/ops/della.py has them in full):
each row (``shape[1:]`` flattened; a vector is one row) is ranked by increasing ``|x|``, ties by
position; entry ``j`` of the stream takes the 32-bit word ``j`` of a PCG64 stream (each 64-bit
output split low half first) and is kept where ``word / 2**32`` is below its probability
``density - epsilon + 2*epsilon*rank/(m-1)``.

>>> row_length((4, 3, 2)), row_length((5,)), row_length((0, 3))
(6, 5, 0)
>>> Words.outputs(5)
3
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future

import numpy

from tvlang.ops.native import library, set_state_words, state_words

__all__ = ["MAX_ROW", "ROW_BLOCK", "SAVED_BITS_LIMIT", "SCRATCH", "RowBlocks", "Words", "input_bits", "ramp",
           "row_blocks", "row_length", "sample", "sample_rows", "stream_words"]

#: the longest row the helper ranks: ranks up to 2**24 are exact in float32 (torch's ramp, the loop's casts)
MAX_ROW = 1 << 24
#: entries of a block of rows (:class:`RowBlocks`): at least one whole row
ROW_BLOCK = 1 << 15
#: 64-bit words of scratch the helper takes a row entry, beside 32 (native.c, tv_magprune_f32)
SCRATCH = 5
#: bytes of keep flags (a bit per entry of every input) that della's ``rescale_by="l1"`` keeps from its
#: pass for the main pass, in both executors: a tensor of up to 178 million entries over 3 inputs
#: (past that the main pass ranks and draws again, the same flags)
SAVED_BITS_LIMIT = 64 << 20


def row_length(shape: Sequence[int]) -> int:
    """Entries per MAGPRUNE row of a tensor of ``shape``: ``shape[1:]`` flattened (a vector: all)."""
    count = math.prod(shape)
    return count // shape[0] if len(shape) >= 2 and shape[0] else count


class Words:
    """32-bit words of a PCG64 stream for entries in order, in pieces of any size: each 64-bit
    output gives two words, low half first, so entry ``j`` gets half ``j % 2`` of output ``j // 2``."""

    def __init__(self, bits) -> None:
        self.bits = bits
        self.spare: numpy.ndarray | None = None  # the high half of the last output, not used yet

    @staticmethod
    def outputs(numel: int) -> int:
        """64-bit outputs that ``numel`` entries use."""
        return (numel + 1) // 2

    def state(self) -> numpy.ndarray | None:
        """The stream as the helper takes it (state and increment, whether a half is left over,
        that half), or ``None`` where its bits are not a numpy ``PCG64``."""
        if not isinstance(self.bits, numpy.random.PCG64):
            return None
        have = self.spare is not None
        return numpy.concatenate([state_words(self.bits),
                                  numpy.array([have, int(self.spare[0]) if have else 0], dtype=numpy.uint64)])

    def set_state(self, st: numpy.ndarray) -> None:
        """Move on to where the helper left ``st``."""
        set_state_words(self.bits, st[:4])
        self.spare = numpy.array([st[5]], dtype=numpy.uint32) if st[4] else None

    def next(self, n: int) -> numpy.ndarray:
        lib = library()
        st = self.state() if lib is not None else None
        if st is not None:  # the same words, in C
            words = numpy.empty(n, dtype=numpy.uint32)
            lib.tv_pcg64_words(st.ctypes.data, n, words.ctypes.data)
            self.set_state(st)
            return words
        head = self.spare if self.spare is not None and n else None
        need = n - (1 if head is not None else 0)
        raw = self.bits.random_raw((need + 1) // 2)
        if sys.byteorder == "little":
            words = raw.view(numpy.uint32)
        else:  # pragma: no cover - the same words, low half first, on a big-endian machine
            words = numpy.empty(2 * raw.size, dtype=numpy.uint32)
            words[0::2], words[1::2] = raw & 0xFFFFFFFF, raw >> 32
        if n:
            self.spare = words[need:need + 1].copy() if need % 2 else None
        body = words[:need]
        return numpy.concatenate([head, body]) if head is not None else body


def input_bits(context, seed, n_inputs: int, numel: int) -> list:
    """Each input's numpy ``PCG64`` for a call over a tensor of ``numel`` entries: the stream of
    ``context.bits(seed)``, input ``i``'s from where input ``i-1``'s words end."""
    streams = []
    for i in range(n_inputs):
        bits = context.bits(seed)
        bits.advance(i * Words.outputs(numel))
        streams.append(bits)
    return streams


def stream_words(bits) -> numpy.ndarray:
    """The start of ``bits``' stream (a numpy ``PCG64``) as the helper takes it, no half left over."""
    return numpy.concatenate([state_words(bits), numpy.zeros(2, dtype=numpy.uint64)])


def ramp(m: int, density: float, epsilon: float) -> tuple[float, float]:
    """``(c, d)`` of the keep probability ``p = rank * c + d`` over a row of ``m`` entries, as the
    helper takes them: from ``density - epsilon`` to ``density + epsilon``; ``density`` for a row of one."""
    return (2.0 * epsilon / (m - 1), density - epsilon) if m > 1 else (0.0, density)


def sample(lib, st: numpy.ndarray, skip: int, x_at: int, n: int, m: int, density: float, epsilon: float,
           rescale: bool, out_at: int | None, flags: numpy.ndarray | None) -> None:
    """MAGPRUNE of ``n`` float32 entries at address ``x_at`` (``n // m`` whole rows of ``m``, at most
    :data:`MAX_ROW`), on this thread, the words from the stream ``st`` after ``skip`` more words (``st``
    left where they end), into float32s at ``out_at`` (the kept entries, divided by their probability
    with ``rescale``) and/or keep flags (0 or 1 a byte) into ``flags``."""
    if n:
        c, d = ramp(m, density, epsilon)
        scratch = numpy.empty(SCRATCH * m + 32, dtype=numpy.uint64)
        lib.tv_magprune_f32(st.ctypes.data, skip, x_at, n // m, m, c, d, int(rescale), scratch.ctypes.data,
                            out_at, None if flags is None else flags.ctypes.data)


def row_blocks(n: int, m: int) -> list[tuple[int, int]]:
    """``0:n`` (whole rows of ``m``) as blocks of whole rows of about :data:`ROW_BLOCK` entries (at least
    one row): their ``(start, stop)``."""
    step = max(1, ROW_BLOCK // max(m, 1)) * max(m, 1)
    return [(start, min(n, start + step)) for start in range(0, n, step)]


class RowBlocks:
    """The rows of ``0:n`` (whole rows of ``m``) in blocks of about :data:`ROW_BLOCK` entries, which
    any thread takes in turn (:meth:`run`) until none is left: ``rows(start, stop)`` runs one. The
    torch-free executor starts the second thread on a chunk as soon as it is read and joins it once
    the next one is (tvlang.run.direct); :func:`sample_rows` at once (:meth:`finish`)."""

    def __init__(self, n: int, m: int, helper: Executor | None, rows: Callable[[int, int], bool | None]) -> None:
        self.bounds = row_blocks(n, m)
        self.helper, self.rows = helper, rows
        self.taken = 0
        self.lock = threading.Lock()
        self.answers: list = []  # what each block's ``rows`` returned, in the order they ended

    def run(self) -> None:
        """Blocks on this thread until none is left (another thread may be taking them too)."""
        while True:
            with self.lock:
                if self.taken == len(self.bounds):
                    return
                start, stop = self.bounds[self.taken]
                self.taken += 1
            self.answers.append(self.rows(start, stop))

    def nonfinite(self) -> bool | None:
        """Once every block has run: whether an entry they wrote is not finite, where every block said
        (its ``rows`` returned True or False), else None."""
        if not self.answers or any(answer is None for answer in self.answers):
            return None
        return any(self.answers)

    def start(self) -> Future | None:
        """The blocks on the second thread too, where there is one and more than one block."""
        return self.helper.submit(self.run) if self.helper is not None and len(self.bounds) > 1 else None

    def finish(self, task: Future | None = None) -> None:
        """What is left of the blocks on this thread, then ``task`` (:meth:`start`'s) waited for."""
        try:
            self.run()
        finally:
            if task is not None:
                task.result()


def sample_rows(lib, st: numpy.ndarray, x_at: int, n: int, m: int, density: float, epsilon: float, rescale: bool,
                out_at: int | None, flags: numpy.ndarray | None, helper: Executor | None) -> None:
    """:func:`sample` of the next ``n`` entries, in blocks of rows that this thread and ``helper`` take
    (:class:`RowBlocks`: each block takes its own words, so the same flags); ``st`` left after them
    (by the last block, which draws from ``st`` itself)."""
    first = st.copy()  # every block's words are counted from here

    def run(start: int, stop: int) -> None:
        sample(lib, st if stop == n else first.copy(), start, x_at + 4 * start, stop - start, m, density, epsilon,
               rescale, None if out_at is None else out_at + 4 * start, None if flags is None else flags[start:])

    blocks = RowBlocks(n, m, helper, run)
    blocks.finish(blocks.start())
