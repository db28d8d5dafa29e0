"""The chunked interpreter: a program run over slices of a tensor, from read to write.

A program whose steps all run on any slice of a tensor (linear ops, kernels with a
chunk form: ``chunkable``) over a tensor of at least ``CHUNK_MIN`` elements runs
chunk by chunk, ``CHUNK_ELEMENTS`` at a time: every step of a chunk works on data
still in the CPU cache, each input is read once and the result is written once
straight into the output buffer (or handed to the writer as a piece), instead of
one pass over the whole tensor per step. On a device, chunks also bound the device
memory a huge tensor needs. ``linear_program`` works out once per program which
value each step makes or changes and where values are written; kernels that must
see their whole input first (a per-tensor threshold) get passes of their own over
the chunks before the main one (``needed_steps`` are what they depend on).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from tvlang.io import release
from tvlang.ops import ranks
from tvlang.ops.chunks import Elementwise
from tvlang.ops.pertensor import resolve_options
from tvlang.ops.registry import CHUNKED, ELEMENTWISE
from tvlang.plan.schedule import STEP_OPS, Step, TensorProgram, needed_steps, resolve_coef
from tvlang.run.steps import ARITHMETIC, kernel, numel
from tvlang.run.whole import storage

if TYPE_CHECKING:
    from tvlang.run.session import Session

__all__ = ["CHUNK_ELEMENTS", "CHUNK_MIN", "LinearProgram", "chunk_kernels", "chunk_size", "chunkable",
           "execute_chunked", "linear_program", "needed_steps", "passes_feed_passes", "release_inputs", "run_chunk",
           "sample_ranges", "take_sample"]

CHUNK_MIN = 1 << 18
CHUNK_ELEMENTS = 1 << 20
# The sample a kernel may take before its passes (``take_sample``): 16 runs of 4,096 entries.
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 1 << 12


@dataclass
class LinearProgram:
    """What chunked execution needs to know about a linear program, worked out once.

    A *value* is what a slot holds from the step that makes it (read, add, set) through
    the steps that change it in place (scale, axpy). ``values[i]`` is the value step
    ``i`` makes or changes; ``written[v]`` the first output value ``v`` is written to
    (it is computed straight into that output's buffer).
    """

    values: list[int]
    written: dict[int, str]
    count: int


def chunkable(step: Step) -> bool:
    """Whether a step runs on any slice of a tensor: a linear op, or a kernel with a chunk form."""
    if STEP_OPS[step.op].linear or step.op == "feed":  # a reducer takes pieces in order
        return True
    if step.op != "call":
        return False
    return step.name in CHUNKED or step.name in ELEMENTWISE


def linear_program(program: TensorProgram) -> LinearProgram | None:
    if not all(chunkable(step) for step in program.steps):
        return None
    slot_value: dict[int, int] = {}
    frozen: set[int] = set()  # slots written out: changing them makes a new value
    values: list[int] = []
    written: dict[int, str] = {}
    count = 0
    for step in program.steps:
        effect = STEP_OPS[step.op].effect
        if effect == "make" or (effect == "update" and step.dst in frozen):
            slot_value[step.dst] = count
            count += 1
            frozen.discard(step.dst)
            values.append(slot_value[step.dst])
        elif effect == "update":
            values.append(slot_value[step.dst])
        elif step.op == "feed":  # reads its values, writes nothing
            values.append(slot_value[step.srcs[0]])
        else:  # write
            value = slot_value[step.srcs[0]]
            written.setdefault(value, step.name)
            frozen.add(step.srcs[0])
            values.append(value)
    return LinearProgram(values, written, count)


def passes_feed_passes(program: TensorProgram, looks_first) -> bool:
    """Whether a call that looks at its whole input before its first result
    (``looks_first(index, step)``) takes its input from another such call: that one has no
    result yet while the first looks, so the program cannot run in chunks."""
    depends: dict[int, bool] = {}  # slot -> its value depends on a call that looks first
    for index, step in enumerate(program.steps):
        if STEP_OPS[step.op].effect == "sink":
            continue
        upstream = any(depends.get(src, False) for src in step.srcs)
        if step.op == "call" and looks_first(index, step):
            if upstream:
                return True
            upstream = True
        if STEP_OPS[step.op].effect == "update":
            upstream = upstream or depends.get(step.dst, False)
        depends[step.dst] = upstream
    return False


def execute_chunked(session: "Session", program: TensorProgram, linear: LinearProgram, name: str,
                    raw: dict[str, torch.Tensor], kernels: dict[int, Any], *,
                    pieces: bool, feed=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Run a chunkable program chunk by chunk: (output, result) pairs, in output dtype, on the CPU.

    ``kernels`` are the chunk forms of its calls (``chunk_kernels``). A kernel
    that must see its whole input first (a per-tensor magnitude threshold) asks
    for ``passes``: before the main pass, the steps it depends on run that many
    times over the chunks, feeding it (``observe``), writing nothing.
    ``pieces=False``: one whole result per output, after the last chunk.
    ``pieces=True``: each chunk's result as soon as it is computed (a flat
    piece in a recycled buffer, for ``StreamingWriter.write_part``), so no
    result is ever whole in memory. ``feed(task, pieces, name)``: a reduction
    pass's program hands each chunk of its values to its reducers.
    """
    info = session.layout.infos[name]
    count = numel(info.shape)
    out_dtype = session.out_dtype or info.dtype
    written = list(dict.fromkeys(step.name for step in program.steps if step.op == "write"))
    coefs = [None if step.coef is None else
             tuple(resolve_coef(c, session.scalar) for c in step.coef) if step.op == "add" else
             resolve_coef(step.coef, session.scalar) for step in program.steps]
    flat = {key: tensor.reshape(-1) for key, tensor in raw.items()}
    everything = list(range(len(program.steps)))
    size = chunk_size(kernels)
    sampling = {i for i, k in kernels.items() if getattr(k, "sampling", False)}
    if sampling:
        take_sample(session, program, linear, coefs, flat, raw, kernels, sampling, count)
    # Passes before the main one write nothing: the writer's core is free for compute
    # (ties over 1.5 GB checkpoints: about 7 % faster than on one thread).
    cpu = session.device.type == "cpu"
    with every_core(cpu and any(k.passes for k in kernels.values())):
        pass_index = 0
        while True:  # a kernel may ask for more passes at the end of one (a threshold window missed)
            observing = {i for i, k in kernels.items() if k.passes > pass_index}
            if not observing:
                break
            for index, form in kernels.items():
                if index not in observing:
                    form.restart()
            steps = needed_steps(program, observing)
            for start in range(0, count, size):
                stop = min(count, start + size)
                run_chunk(session, program, linear, steps, coefs, flat, kernels, start, stop,
                          observing=observing, pass_index=pass_index)
                release_inputs(raw, start, stop)
            for index in observing:
                kernels[index].end_pass(pass_index)
            pass_index += 1
    for form in kernels.values():
        form.restart()
    outputs: dict[str, torch.Tensor] = {}
    if not pieces:
        for output in written:
            target = destination(session, output, name, out_dtype, raw)
            outputs[output] = session.buffers.take(count, out_dtype) if target is None else target
    # The main pass leaves a core to the writer (compute_threads), but where a kernel's
    # arithmetic outweighs the writing (a chunk kernel's ``main_pass_cores``): ties over 1.5 GB
    # checkpoints, 13.8 s on two threads against 14.8 s on one (median of 3); plain task
    # arithmetic, 7.7 s against 6.2 s; dare (its drawing thread wants the core), 13.3 s against 10.8 s.
    with every_core(cpu and any(getattr(k, "main_pass_cores", False) for k in kernels.values())):
        for start in range(0, count, size):
            stop = min(count, start + size)
            if pieces:
                outputs = {output: session.buffers.take(stop - start, out_dtype) for output in written}
                window = slice(0, stop - start)
            else:
                window = slice(start, stop)
            run_chunk(session, program, linear, everything, coefs, flat, kernels, start, stop,
                      outputs={output: tensor[window] for output, tensor in outputs.items()},
                      direct=cpu and out_dtype == session.dtype, feed=feed, name=name)
            release_inputs(raw, start, stop)
            if pieces:
                yield from outputs.items()
    if not pieces:
        for output, tensor in outputs.items():
            yield output, tensor.view(info.shape)


def destination(session: "Session", output: str, name: str, dtype: torch.dtype,
                raw: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The caller's own tensor to compute result ``output`` of tensor ``name`` into, flat
    (``session.destination``: apply_to's module tensors, so a result is made where it is wanted,
    on its device, with no copy after), where it is one: contiguous, of the tensor's shape and
    ``dtype`` on the session's device, and sharing no memory with an input (the chunks of an
    input read later would see the result's). Else ``None``: a buffer of the session's."""
    if session.destination is None:
        return None
    target = session.destination(output, name)
    if target is None or not target.is_contiguous() or target.dtype != dtype or target.device != session.device \
            or tuple(target.shape) != tuple(session.layout.infos[name].shape):
        return None
    if storage(target) in {storage(tensor) for tensor in raw.values()}:
        return None
    return target.view(-1)


@contextlib.contextmanager
def every_core(wanted: bool) -> Iterator[None]:
    """Torch's threads on every core while the block runs, when ``wanted`` (then as they were)."""
    previous = torch.get_num_threads()
    if wanted:
        torch.set_num_threads(max(previous, os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sample_ranges(count: int) -> list[tuple[int, int]]:
    """``SAMPLE_BLOCKS`` runs of ``SAMPLE_BLOCK`` entries spread evenly over ``count`` (the first
    at the start, the last at the end), or the whole tensor when it is not larger than them."""
    return ranks.sample_ranges(count, SAMPLE_BLOCKS, SAMPLE_BLOCK)


def take_sample(session: "Session", program: TensorProgram, linear: LinearProgram, coefs: list, flat, raw,
                kernels: dict[int, Any], sampling: set[int], count: int) -> None:
    """Hand the kernels in ``sampling`` (``sample(pieces)``, then ``end_sample()``) their inputs
    over ``sample_ranges``: a kernel that guesses from a sample where its passes will find what
    it looks for (a threshold window) may need fewer of them. Only where their inputs are
    linear arithmetic of the inputs read: another kernel on the way (``dare``'s draws, ``della``'s
    rows) expects its pieces in order, and the kernels then get an empty sample."""
    steps = needed_steps(program, sampling)
    row = math.lcm(*(getattr(kernels[index], "row", 1) for index in sampling))
    if row <= CHUNK_ELEMENTS and all(program.steps[index].op != "call" or index in sampling for index in steps):
        # whole rows where a kernel asks for them (arcee_fusion's KL is per row): each run widened to
        # row ends, in pieces of whole rows
        step = CHUNK_ELEMENTS // row * row
        runs = [(start // row * row, min(count, -(-stop // row) * row)) for start, stop in sample_ranges(count)]
        pieces = [(at, min(stop, at + step)) for start, stop in runs for at in range(start, stop, step)]
        for start, stop in pieces:
            run_chunk(session, program, linear, steps, coefs, flat, kernels, start, stop,
                      observing=sampling, sampling=True)
            release_inputs(raw, start, stop)
    for index in sampling:
        kernels[index].end_sample()


def release_inputs(raw: dict[str, torch.Tensor], start: int, stop: int) -> None:
    """Done with entries ``start:stop`` of every input for this pass: unmap their pages.

    After every pass, the passes before the main one included: a page left mapped until
    the main pass reaches it kept each input's whole tensor in the process's private
    memory (``slerp`` over 200 MB tensors: 725 MiB private against 223 MiB anonymous).
    Mapping the pages again in the next pass costs one minor fault per 64 KiB (the
    kernel maps the neighbours of a faulting page along with it) of pages still in the
    page cache.
    """
    for tensor in raw.values():
        release(tensor, start * tensor.element_size(), stop * tensor.element_size())


def chunk_size(kernels: dict[int, Any]) -> int | None:
    """Entries per chunk: ``CHUNK_ELEMENTS``, cut down to whole rows of every kernel that asks
    for them (``row``: della ranks within rows); ``None`` when a row is longer than that."""
    row = math.lcm(*(getattr(k, "row", 1) for k in kernels.values())) if kernels else 1
    return None if row > CHUNK_ELEMENTS else CHUNK_ELEMENTS // row * row


def run_chunk(session: "Session", program: TensorProgram, linear: LinearProgram, steps: list[int], coefs: list,
              flat, kernels, start: int, stop: int, *, outputs: dict[str, torch.Tensor] | None = None,
              direct: bool = False, observing: set[int] = frozenset(), pass_index: int = 0, feed=None,
              name: str = "", sampling: bool = False) -> None:
    """Run ``steps`` (indices into the program) over entries ``start:stop``.

    Results are written into ``outputs`` (pieces of the output buffers); with
    ``direct`` a value that is written out is computed in its output piece.
    Calls in ``observing`` are fed their inputs (``observe``, or ``sample`` with ``sampling``) instead of run;
    ``feed`` steps hand their values to ``feed(task, pieces, name)``.
    """
    def storage(value: int) -> torch.Tensor:
        target = linear.written.get(value)
        if direct and target is not None:
            return outputs[target]
        buffer = session.scratch.get(value)
        if buffer is None or buffer.dtype != session.dtype or buffer.device != session.device:
            buffer = torch.empty(CHUNK_ELEMENTS, dtype=session.dtype, device=session.device)
            session.scratch[value] = buffer
        return buffer[: stop - start]

    slots: dict[int, tuple[torch.Tensor, bool]] = {}  # slot -> (chunk, owned)
    for index in steps:
        step = program.steps[index]
        op = step.op
        coef = coefs[index]
        value = linear.values[index]
        if op == "read":
            chunk = flat[step.name][start:stop]
            if chunk.dtype != session.dtype or chunk.device != session.device:
                chunk = chunk.to(device=session.device, dtype=session.dtype, non_blocking=True)
            slots[step.dst] = (chunk, False)  # never changed in place: it may be the caller's
        elif op in ARITHMETIC:
            srcs = [slots[s][0] for s in step.srcs]
            if STEP_OPS[op].effect == "update":  # in place when this chunk is ours, else into scratch
                chunk, owned = slots[step.dst]
                result = ARITHMETIC[op](chunk, srcs, coef, chunk if owned else storage(value))
            else:
                result = ARITHMETIC[op](None, srcs, coef, storage(value))
            slots[step.dst] = (result, True)
        elif op == "call":
            pieces = [slots[s][0] for s in step.srcs]
            if index in observing and sampling:
                kernels[index].sample(pieces)
            elif index in observing:
                kernels[index].observe(pass_index, pieces)
            else:
                target = storage(value)
                kernels[index].apply(pieces, target)
                slots[step.dst] = (target, True)
        elif op == "feed":
            feed(step.name, [slots[s][0] for s in step.srcs], name)
        else:  # write
            chunk = slots[step.srcs[0]][0]
            destination = outputs[step.name]
            if chunk.data_ptr() != destination.data_ptr() or chunk.dtype != destination.dtype:
                destination.copy_(chunk)
            slots[step.srcs[0]] = (chunk, False)  # written out: later changes go elsewhere


def chunk_kernels(session: "Session", program: TensorProgram, name: str) -> dict[int, Any] | None:
    """The chunk forms of a chunkable program's kernel calls for tensor ``name``, by step index;
    ``None`` when one of them cannot run in chunks with these options, or when one that asks for
    passes takes its input from another that does (the program then runs whole)."""
    count = numel(session.layout.infos[name].shape)
    kernels: dict[int, Any] = {}
    for index, step in enumerate(program.steps):
        if step.op != "call":
            continue
        ctx = session.call_context(step, name)
        options = resolve_options(step.options, ctx)
        if step.name in CHUNKED:
            form = CHUNKED[step.name](ctx, count, len(step.srcs), session.dtype, **options)
            if form is None:
                return None
        else:
            form = Elementwise(kernel(step.name), ctx, options)
        kernels[index] = form
    # A form that looks at its whole input first says so by its passes, with these options:
    # ties with density 1 has none (mergekit's breadcrumbs_ties: ties(breadcrumbs(...),
    # density=1) runs in chunks), dare has one with rescale_by="l1" only
    if passes_feed_passes(program, lambda index, step: index in kernels and kernels[index].passes > 0):
        return None
    return kernels if chunk_size(kernels) is not None else None
