"""The streaming executor: one tensor name at a time, over every output.

For each tensor name (in the base's file order) the executor reads only the
inputs the plan needs, runs the per-tensor program with in-place steps, and
hands each result to its writer. Reading the next tensor's inputs (a prefetch
thread) and writing the last result (a writer thread) overlap with compute;
torch releases the GIL in both. Whole-model scalars are computed first, in
passes of their own. Linear programs over large tensors run in cache-sized
chunks straight into the output buffer (``CHUNK_MIN``, ``CHUNK_ELEMENTS``);
inputs are never changed in place; ``run`` recycles output buffers once
written and leaves a core to the writer (docs/performance.md has the numbers).

Choices, documented in docs/evaluator.md:

- The *base* is the first model the plan reads (in reading order), else the
  first source. Its tensor names and order are the output's; integer and bool
  tensors are copied from it unchanged into Model outputs and left out of Delta
  outputs.
- ``missing="error"`` (default): every input must have every float tensor of the
  base and no other. ``"base"``: a tensor missing from some input is copied from
  the base (cast to the output dtype) into Model outputs and left out of Delta
  outputs. ``"skip"``: such a tensor is left out of the outputs.
- ``validate`` runs the checks of ``run`` (bind, then the layout) without computing.
- Output metadata ``tvlang.inputs`` lists the sources that output reads (plus the
  base, for a Model output).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from tvlang.plan.compiler import DeltaBinding, Plan, RunSummary
from tvlang.errors import TvlangError
from tvlang.io import StreamingWriter, TensorInfo, TensorReader, check_distinct_outputs, open_reader, release
from tvlang.plan.ir import Node, const_value
from tvlang.plan.schedule import TensorProgram, resolve_coef

__all__ = ["run", "stream", "validate", "Session", "parse_device", "parse_dtype", "DTYPES", "MISSING_POLICIES"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64,
}
MISSING_POLICIES = ("error", "base", "skip")

# A linear per-tensor program (reads, scales, sums, writes: no kernel calls) over a
# tensor of at least CHUNK_MIN elements runs chunk by chunk, CHUNK_ELEMENTS at a time:
# every step of a chunk works on data still in the CPU cache, each input is read once
# and the result is written once straight into the output buffer, instead of one pass
# over the whole tensor per step (and a copy-on-write fault per page of a mapped input).
# On a device, chunks also bound the device memory a huge tensor needs.
CHUNK_MIN = 1 << 18
CHUNK_ELEMENTS = 1 << 20
LINEAR_OPS = frozenset({"read", "scale", "axpy", "add", "set", "write"})
IN_FLIGHT = 2  # writes queued per output by run() (whole tensors or pieces)


def parse_dtype(value: Any, option: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = DTYPES.get(str(value).lower())
    if dtype is None:
        raise TvlangError(f"unknown {option} '{value}'; choose one of float32, float16, bfloat16, float64")
    return dtype


def parse_device(value: Any) -> torch.device:
    """A device that exists on this machine, or a clear error."""
    text = str(value)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise TvlangError(f"unknown device '{text}'; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TvlangError(f"device '{text}' is not available: this torch sees no CUDA device",
                              notes=("run with --device cpu",))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TvlangError(f"device '{text}' is not available: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise TvlangError(f"device '{text}' is not available on this machine", notes=("run with --device cpu",))
    elif device.type != "cpu":
        raise TvlangError(f"unsupported device '{text}'; use cpu, cuda, cuda:N or mps")
    return device


# -- binding ---------------------------------------------------------------------------


@dataclass
class Bound:
    """A plan re-typed for its bindings, with a reader per source it reads."""

    plan: Plan
    readers: dict[str, TensorReader]
    borrowed: set[str]  # sources whose tensors belong to the caller (never mutate)
    base: str

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def _label(name: str, value: Any) -> str | None:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return f"<{type(value).__name__} bound to '{name}'>"


def bind(plan: Plan, bindings: Mapping[str, Any]) -> Bound:
    """Open every source the plan reads; re-type free names bound to task vectors."""
    free = plan.checked.sources
    missing = [name for name in free if name not in bindings]
    if missing:
        raise TvlangError(f"no binding for {', '.join(repr(m) for m in missing)}",
                          notes=("bind each name to a checkpoint (--bind name=PATH, or the bindings dict)",))
    opened: dict[str, TensorReader] = {}
    borrowed: set[str] = set()
    kinds: dict[str, str] = {}

    def open_source(key: str) -> None:
        spec = plan.optimized.sources[key]
        if spec.path is None:  # a free name: its binding says what it is
            value = bindings[key]
            marked = isinstance(value, DeltaBinding)
            if marked:
                value = value.value
            reader = open_reader(value, label=_label(key, value))
            if not isinstance(value, (str, os.PathLike)):
                borrowed.add(key)
            kinds[key] = "delta" if marked or reader.kind == "delta" else "model"
        else:
            try:
                reader = open_reader(spec.path, label=spec.path)
            except TvlangError as exc:
                if exc.span is None:  # point at the load() that names the file
                    exc.span = spec.span
                raise
            if spec.kind == "model" and reader.kind == "delta":
                reader.close()
                raise TvlangError(f"'{spec.path}' is a task vector (its metadata says so); load it with load_delta()",
                                  spec.span, source=plan.text, filename=plan.filename)
        opened[key] = reader

    try:
        # Open only what the plan reads (a source whose coefficients cancel is
        # never opened); a bound task vector re-types its name, which can
        # change what the plan reads, so repeat until nothing changes.
        original = plan
        for _ in range(len(plan.optimized.sources) + 1):
            for key in plan.schedule.sources_read:
                if key not in opened:
                    open_source(key)
            retyped = original.for_kinds(kinds)
            if retyped is plan:
                break
            plan = retyped
        if not plan.schedule.sources_read:  # nothing to read: the layout comes from the first source
            first = next(iter(plan.optimized.sources))
            if first not in opened:
                open_source(first)
    except TvlangError as exc:
        for reader in opened.values():
            reader.close()
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    order = plan.schedule.sources_read
    every = order + [k for k in plan.optimized.sources if k not in order]
    models = [k for k in order if plan.optimized.sources[k].kind == "model"]
    base = models[0] if models else (order[0] if order else every[0])
    needed = set(order) | {base}
    for key in list(opened):
        if key not in needed:
            opened.pop(key).close()
    return Bound(plan, opened, borrowed, base)


# -- layout and validation ----------------------------------------------------------------


@dataclass
class Layout:
    names: list[str]  # float tensors computed, in base order
    passthrough: list[str]  # integer/bool tensors copied from the base
    copied: dict[str, list[str]]  # missing="base": name -> inputs lacking it (copied from the base)
    infos: dict[str, TensorInfo]  # base's info per name
    num_layers: int | None


def layout(bound: Bound, missing: str) -> Layout:
    if missing not in MISSING_POLICIES:
        raise TvlangError(f"unknown missing-tensor policy '{missing}'; choose error, base or skip")
    base = bound.readers[bound.base]
    others = [(k, r) for k, r in bound.readers.items() if k != bound.base]
    names: list[str] = []
    passthrough: list[str] = []
    copied: dict[str, list[str]] = {}
    infos: dict[str, TensorInfo] = {}
    other_names = {k: set(r.names()) for k, r in others}
    for name in base.names():
        info = base.info(name)
        infos[name] = info
        if not (info.dtype.is_floating_point or info.dtype.is_complex):
            passthrough.append(name)
            continue
        lacking = [k for k, _ in others if name not in other_names[k]]
        if lacking:
            if missing == "error":
                reader = bound.readers[lacking[0]]
                raise TvlangError(f"tensor '{name}' is in {base.label} but missing from {reader.label}",
                                  tensor=name, notes=("choose a policy with --missing base|skip",))
            if missing == "base":
                copied[name] = lacking
            continue  # skip
        for key, reader in others:
            other = reader.info(name)
            if tuple(other.shape) != tuple(info.shape):
                raise TvlangError(
                    f"tensor '{name}' has shape {_shape(info.shape)} in {base.label} "
                    f"but {_shape(other.shape)} in {reader.label}", tensor=name)
            if not other.dtype.is_floating_point:
                raise TvlangError(f"tensor '{name}' is {_dtype(other.dtype)} in {reader.label} "
                                  f"but {_dtype(info.dtype)} in {base.label}", tensor=name)
        names.append(name)
    if missing == "error":
        base_names = set(base.names())
        for key, reader in others:
            extra = [n for n in reader.names() if n not in base_names and reader.info(n).dtype.is_floating_point]
            if extra:
                raise TvlangError(f"tensor '{extra[0]}' is in {reader.label} but missing from {base.label}",
                                  tensor=extra[0], notes=("choose a policy with --missing base|skip",))
    return Layout(names, passthrough, copied, infos, _count_layers(base.names()))


def validate(plan: Plan, bindings: Mapping[str, Any], *, missing: str = "error") -> Layout:
    """Check the bound inputs as ``run`` would, computing nothing.

    Opens every source the plan reads (headers only), checks names, shapes and
    dtypes against the base under the ``missing`` policy, closes the readers and
    returns the layout (the float tensors to compute, the integer ones copied).
    Raises the same :class:`TvlangError` that ``run`` would raise before writing.

    >>> import torch, tvlang
    >>> plan = tvlang.compile("pre + 0.5*(ft - pre)")
    >>> pre = {"w": torch.zeros(2, 3), "steps": torch.zeros(1, dtype=torch.int64)}
    >>> validate(plan, {"pre": pre, "ft": {"w": torch.ones(2, 3)}}).names
    ['w']
    >>> try:
    ...     validate(plan, {"pre": pre, "ft": {"w": torch.ones(3, 2)}})
    ... except tvlang.TvlangError as exc:
    ...     print(exc.message)
    tensor 'w' has shape (2, 3) in <dict bound to 'pre'> but (3, 2) in <dict bound to 'ft'>
    """
    bound = bind(plan, bindings)
    try:
        return layout(bound, missing)
    except TvlangError as exc:
        raise exc.with_context(source=bound.plan.text, filename=bound.plan.filename) from None
    finally:
        bound.close()


def _count_layers(names: list[str]) -> int | None:
    try:
        from tvlang.ops.select import count_layers
    except ImportError:
        return None
    return count_layers(names)


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- the executor ----------------------------------------------------------------------------


@dataclass
class _LinearProgram:
    """What chunked execution needs to know about a linear program, worked out once.

    A *value* is what a slot holds from the step that makes it (read, add, set) through
    the steps that change it in place (scale, axpy). ``values[i]`` is the value step
    ``i`` makes or changes; ``written[v]`` the first output value ``v`` is written to
    (it is computed straight into that output's buffer).
    """

    values: list[int]
    written: dict[int, str]
    count: int


def _chunkable(step) -> bool:
    if step.op in LINEAR_OPS:
        return True
    if step.op != "call":
        return False
    from tvlang.ops.registry import CHUNKED, ELEMENTWISE

    return step.name in CHUNKED or step.name in ELEMENTWISE


def _linear_program(program: TensorProgram) -> _LinearProgram | None:
    if not all(_chunkable(step) for step in program.steps):
        return None
    from tvlang.ops.registry import MULTIPASS

    # A kernel that looks at its whole input before its first result (MULTIPASS) cannot
    # take its input from another one: that one has no result yet while it looks.
    depends: dict[int, bool] = {}  # slot -> its value depends on a MULTIPASS call
    for step in program.steps:
        if step.op == "write":
            continue
        upstream = any(depends.get(src, False) for src in step.srcs)
        if step.op == "call" and step.name in MULTIPASS:
            if upstream:
                return None
            upstream = True
        if step.op in ("scale", "axpy"):
            upstream = upstream or depends.get(step.dst, False)
        depends[step.dst] = upstream
    slot_value: dict[int, int] = {}
    frozen: set[int] = set()  # slots written out: changing them makes a new value
    values: list[int] = []
    written: dict[int, str] = {}
    count = 0
    for step in program.steps:
        if step.op in ("read", "add", "set", "call") or (step.op in ("scale", "axpy") and step.dst in frozen):
            slot_value[step.dst] = count
            count += 1
            frozen.discard(step.dst)
            values.append(slot_value[step.dst])
        elif step.op in ("scale", "axpy"):
            values.append(slot_value[step.dst])
        else:  # write
            value = slot_value[step.srcs[0]]
            written.setdefault(value, step.name)
            frozen.add(step.srcs[0])
            values.append(value)
    return _LinearProgram(values, written, count)


class Session:
    """One execution of a bound plan: reductions first, then the main pass."""

    def __init__(self, bound: Bound, *, device: Any = "cpu", dtype: Any = "float32",
                 out_dtype: Any = None, missing: str = "error", prefetch: bool = True) -> None:
        self.bound = bound
        self.plan = bound.plan
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.out_dtype = parse_dtype(out_dtype, "output dtype") if out_dtype is not None else None
        self.layout = layout(bound, missing)
        self.prefetch = prefetch
        self.reduced: dict[int, float] = {}  # id(reduce node) -> value
        self._scalar_cache: dict[int, float] = {}
        self._linear: dict[int, _LinearProgram | None] = {}  # id(program) -> analysis
        self._scratch: dict[int, torch.Tensor] = {}  # value -> chunk buffer (chunked runs)
        # Output buffers given back once written (run() recycles them; stream() cannot).
        self.recycle_outputs = False
        self._pool: list[torch.Tensor] = []
        self.pool_size = 3
        self._leases: dict[int, torch.Tensor] = {}

    # scalars

    def scalar(self, node: Node) -> float:
        cached = self._scalar_cache.get(id(node))
        if cached is not None:
            return cached
        op = node.op
        if op == "const":
            value = const_value(node)
        elif op == "reduce":
            value = self.reduced[id(node)]
        elif op == "neg":
            value = -self.scalar(node.args[0])
        else:
            left, right = self.scalar(node.args[0]), self.scalar(node.args[1])
            if op == "div" and right == 0.0:
                raise TvlangError("division by zero: a scalar in the recipe divides by a value that is 0 "
                                  "(a norm of an all-zero task vector?)")
            value = {"add": left + right, "sub": left - right, "mul": left * right,
                     "div": left / right if right else 0.0}[op]
        self._scalar_cache[id(node)] = value
        return value

    # reading

    def _read_all(self, program: TensorProgram, name: str) -> dict[str, torch.Tensor]:
        readers = self.bound.readers
        return {key: readers[key].read(name) for key in program.reads}

    def _inputs(self, program: TensorProgram, names: list[str]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(name, raw input tensors) for each name, read one tensor ahead in a thread."""
        if not self.prefetch or len(names) < 2:
            for name in names:
                yield name, self._read_all(program, name)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvlang-read") as pool:
            pending: Future = pool.submit(self._read_all, program, names[0])
            for index, name in enumerate(names):
                raw = pending.result()
                if index + 1 < len(names):
                    pending = pool.submit(self._read_all, program, names[index + 1])
                yield name, raw

    # one tensor

    def execute(self, program: TensorProgram, name: str, raw: dict[str, torch.Tensor],
                sink, feed=None) -> None:
        """Run ``program`` for tensor ``name``; ``sink(output, tensor)`` gets results."""
        try:
            self._execute(program, name, raw, sink, feed)
        except (TvlangError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise _tensor_error(name, exc) from None

    def _linear_for(self, program: TensorProgram) -> _LinearProgram | None:
        key = id(program)
        if key not in self._linear:
            self._linear[key] = _linear_program(program)
        return self._linear[key]

    def _execute(self, program: TensorProgram, name: str, raw: dict[str, torch.Tensor], sink, feed) -> None:
        if feed is None:
            linear = self._linear_for(program)
            kernels = self._chunk_kernels(program, name) if linear is not None and \
                _numel(self.layout.infos[name].shape) >= CHUNK_MIN else None
            if kernels is not None:
                for output, tensor in self._execute_chunked(program, linear, name, raw, kernels, pieces=False):
                    sink(output, tensor)
                return
        buffers: list[torch.Tensor | None] = [None] * program.n_buffers
        borrowed: set[int] = set()  # ids of tensors that must not be mutated in place
        shape = self.layout.infos[name].shape

        def own(slot: int) -> torch.Tensor:
            tensor = buffers[slot]
            if id(tensor) in borrowed:  # copy on first write
                tensor = tensor.clone()
                buffers[slot] = tensor
            return tensor

        for step in program.steps:
            op = step.op
            if op == "read":
                source = raw[step.name]
                tensor = source.to(device=self.device, dtype=self.dtype, non_blocking=True)
                if tensor is source and step.name in self.bound.borrowed:
                    borrowed.add(id(tensor))
                buffers[step.dst] = tensor
            elif op == "axpy":
                coef = resolve_coef(step.coef, self.scalar)
                own(step.dst).add_(buffers[step.srcs[0]], alpha=coef)
            elif op == "scale":
                own(step.dst).mul_(resolve_coef(step.coef, self.scalar))
            elif op == "add":
                first = resolve_coef(step.coef[0], self.scalar)
                second = resolve_coef(step.coef[1], self.scalar)
                left, right = buffers[step.srcs[0]], buffers[step.srcs[1]]
                if first == 1.0:
                    buffers[step.dst] = torch.add(left, right, alpha=second)
                else:
                    result = torch.mul(left, first)
                    buffers[step.dst] = result.add_(right, alpha=second)
            elif op == "set":
                coef = resolve_coef(step.coef, self.scalar)
                src = buffers[step.srcs[0]]
                buffers[step.dst] = src.clone() if coef == 1.0 else torch.mul(src, coef)
            elif op == "zero":
                buffers[step.dst] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            elif op == "call":
                ctx = self._call_context(step, name)
                result = _kernel(step.name)([buffers[s] for s in step.srcs], ctx, **dict(step.options))
                buffers[step.dst] = result
            elif op == "write":
                tensor = buffers[step.srcs[0]]
                sink(step.name, tensor)
                borrowed.add(id(tensor))  # the sink may still hold it
            elif op == "feed":
                feed(step.name, [buffers[s] for s in step.srcs], name)
            else:  # pragma: no cover
                raise AssertionError(op)

    def _execute_chunked(self, program: TensorProgram, linear: _LinearProgram, name: str,
                         raw: dict[str, torch.Tensor], kernels: dict[int, Any], *,
                         pieces: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """Run a chunkable program chunk by chunk: (output, result) pairs, in output dtype, on the CPU.

        ``kernels`` are the chunk forms of its calls (``_chunk_kernels``). A kernel
        that must see its whole input first (a per-tensor magnitude threshold) asks
        for ``passes``: before the main pass, the steps it depends on run that many
        times over the chunks, feeding it (``observe``), writing nothing.
        ``pieces=False``: one whole result per output, after the last chunk.
        ``pieces=True``: each chunk's result as soon as it is computed (a flat
        piece in a recycled buffer, for ``StreamingWriter.write_part``), so no
        result is ever whole in memory.
        """
        info = self.layout.infos[name]
        numel = _numel(info.shape)
        out_dtype = self.out_dtype or info.dtype
        written = list(dict.fromkeys(step.name for step in program.steps if step.op == "write"))
        coefs = [None if step.coef is None else
                 tuple(resolve_coef(c, self.scalar) for c in step.coef) if step.op == "add" else
                 resolve_coef(step.coef, self.scalar) for step in program.steps]
        flat = {key: tensor.reshape(-1) for key, tensor in raw.items()}
        everything = list(range(len(program.steps)))
        passes = max((k.passes for k in kernels.values()), default=0)
        # Passes before the main one write nothing: the writer's core is free for compute
        # (ties over 1.5 GB checkpoints: about 7 % faster than on one thread).
        previous_threads = torch.get_num_threads()
        if passes and self.device.type == "cpu":
            torch.set_num_threads(max(previous_threads, os.cpu_count() or 1))
        try:
            for pass_index in range(passes):
                observing = {i for i, k in kernels.items() if k.passes > pass_index}
                for index, kernel in kernels.items():
                    if index not in observing:
                        kernel.restart()
                steps = _needed_steps(program, observing)
                for start in range(0, numel, CHUNK_ELEMENTS):
                    self._chunk(program, linear, steps, coefs, flat, kernels, start, min(numel, start + CHUNK_ELEMENTS),
                                observing=observing, pass_index=pass_index)
                for index in observing:
                    kernels[index].end_pass(pass_index)
        finally:
            torch.set_num_threads(previous_threads)
        for kernel in kernels.values():
            kernel.restart()
        outputs: dict[str, torch.Tensor] = {}
        if not pieces:
            outputs = {output: self._output_buffer(numel, out_dtype) for output in written}
        for start in range(0, numel, CHUNK_ELEMENTS):
            stop = min(numel, start + CHUNK_ELEMENTS)
            if pieces:
                outputs = {output: self._output_buffer(stop - start, out_dtype) for output in written}
                window = slice(0, stop - start)
            else:
                window = slice(start, stop)
            self._chunk(program, linear, everything, coefs, flat, kernels, start, stop,
                        outputs={output: tensor[window] for output, tensor in outputs.items()},
                        direct=self.device.type == "cpu" and out_dtype == self.dtype)
            # Done with these entries: unmap their pages. (Not after the passes before the
            # main one: mapping the pages again for the next pass cost ties 30-50 % more time.)
            for tensor in raw.values():
                release(tensor, start * tensor.element_size(), stop * tensor.element_size())
            if pieces:
                yield from outputs.items()
        if not pieces:
            for output, tensor in outputs.items():
                yield output, tensor.view(info.shape)

    def _chunk(self, program: TensorProgram, linear: _LinearProgram, steps: list[int], coefs: list, flat, kernels,
               start: int, stop: int, *, outputs: dict[str, torch.Tensor] | None = None, direct: bool = False,
               observing: set[int] = frozenset(), pass_index: int = 0) -> None:
        """Run ``steps`` (indices into the program) over entries ``start:stop``.

        Results are written into ``outputs`` (pieces of the output buffers); with
        ``direct`` a value that is written out is computed in its output piece.
        Calls in ``observing`` are fed their inputs (``observe``) instead of run.
        """
        def storage(value: int) -> torch.Tensor:
            target = linear.written.get(value)
            if direct and target is not None:
                return outputs[target]
            buffer = self._scratch.get(value)
            if buffer is None or buffer.dtype != self.dtype or buffer.device != self.device:
                buffer = torch.empty(CHUNK_ELEMENTS, dtype=self.dtype, device=self.device)
                self._scratch[value] = buffer
            return buffer[: stop - start]

        slots: dict[int, tuple[torch.Tensor, bool]] = {}  # slot -> (chunk, owned)
        for index in steps:
            step = program.steps[index]
            op = step.op
            coef = coefs[index]
            value = linear.values[index]
            if op == "read":
                chunk = flat[step.name][start:stop]
                if chunk.dtype != self.dtype or chunk.device != self.device:
                    chunk = chunk.to(device=self.device, dtype=self.dtype, non_blocking=True)
                slots[step.dst] = (chunk, False)  # never changed in place: it may be the caller's
            elif op == "scale":
                chunk, owned = slots[step.dst]
                if owned:
                    chunk.mul_(coef)
                else:
                    chunk = torch.mul(chunk, coef, out=storage(value))
                slots[step.dst] = (chunk, True)
            elif op == "axpy":
                chunk, owned = slots[step.dst]
                other = slots[step.srcs[0]][0]
                if owned:
                    chunk.add_(other, alpha=coef)
                else:
                    chunk = torch.add(chunk, other, alpha=coef, out=storage(value))
                slots[step.dst] = (chunk, True)
            elif op == "add":
                left, right = slots[step.srcs[0]][0], slots[step.srcs[1]][0]
                target = storage(value)
                if coef[0] == 1.0:
                    torch.add(left, right, alpha=coef[1], out=target)
                else:
                    torch.mul(left, coef[0], out=target).add_(right, alpha=coef[1])
                slots[step.dst] = (target, True)
            elif op == "set":
                target = storage(value)
                if coef == 1.0:
                    target.copy_(slots[step.srcs[0]][0])
                else:
                    torch.mul(slots[step.srcs[0]][0], coef, out=target)
                slots[step.dst] = (target, True)
            elif op == "call":
                pieces = [slots[s][0] for s in step.srcs]
                if index in observing:
                    kernels[index].observe(pass_index, pieces)
                else:
                    target = storage(value)
                    kernels[index].apply(pieces, target)
                    slots[step.dst] = (target, True)
            else:  # write
                chunk = slots[step.srcs[0]][0]
                destination = outputs[step.name]
                if chunk.data_ptr() != destination.data_ptr() or chunk.dtype != destination.dtype:
                    destination.copy_(chunk)
                slots[step.srcs[0]] = (chunk, False)  # written out: later changes go elsewhere

    def _call_context(self, step, name: str):
        """The TensorContext of a kernel call for tensor ``name``, with the reductions it asked for."""
        from tvlang.ops.context import TensorContext

        calls = self.plan.schedule.call_reductions.get(id(step.node), [])
        return TensorContext(name, self.device, {key: self.reduced[id(node)] for key, node in calls},
                             self.layout.num_layers)

    def _chunk_kernels(self, program: TensorProgram, name: str) -> dict[int, Any] | None:
        """The chunk forms of a chunkable program's kernel calls for tensor ``name``, by step index;
        ``None`` when one of them cannot run in chunks with these options (the program then runs whole)."""
        from tvlang.ops.chunks import Elementwise
        from tvlang.ops.registry import CHUNKED

        numel = _numel(self.layout.infos[name].shape)
        kernels: dict[int, Any] = {}
        for index, step in enumerate(program.steps):
            if step.op != "call":
                continue
            ctx = self._call_context(step, name)
            options = dict(step.options)
            if step.name in CHUNKED:
                kernel = CHUNKED[step.name](ctx, numel, len(step.srcs), self.dtype, **options)
                if kernel is None:
                    return None
            else:
                kernel = Elementwise(_kernel(step.name), ctx, options)
            kernels[index] = kernel
        return kernels

    def _output_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor for one result: a recycled buffer when run() gives them back."""
        nbytes = numel * dtype.itemsize
        if not self.recycle_outputs:
            return torch.empty(numel, dtype=dtype)
        # A buffer far larger than what tensors need now (an embedding's, in the middle of
        # the layers) is dropped rather than kept idle: memory stays near what is in flight.
        self._pool = [b for b in self._pool if b.numel() <= 4 * nbytes]
        fits = [i for i, b in enumerate(self._pool) if b.numel() >= nbytes]
        if fits:  # the smallest that fits (list.remove would compare tensors elementwise)
            buffer = self._pool.pop(min(fits, key=lambda i: self._pool[i].numel()))
        else:
            self._pool.clear()  # none fits: free the idle ones before taking more memory
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        tensor = buffer[:nbytes].view(dtype)
        self._leases[tensor.data_ptr()] = buffer
        return tensor

    def give_back(self, tensor: torch.Tensor) -> None:
        """``tensor`` (from results()) has been written: its buffer may be reused."""
        buffer = self._leases.pop(tensor.data_ptr(), None)
        if buffer is None:
            return
        self._pool.append(buffer)
        if len(self._pool) > self.pool_size:  # keep the largest few
            self._pool.pop(min(range(len(self._pool)), key=lambda i: self._pool[i].numel()))

    # reductions

    def reduce(self, progress=None) -> None:
        from tvlang.ops.context import TensorContext

        for tasks, program in self.plan.schedule.levels:
            reducers = {}
            for task in tasks:
                if task.factory is None:
                    raise TvlangError(f"no reducer for '{task.builtin}'")
                reducers[task.name] = task.factory()
            passes = max(getattr(r, "passes", 1) for r in reducers.values())
            for pass_index in range(passes):
                def feed(task_name, tensors, tensor_name, pass_index=pass_index):
                    reducer = reducers[task_name]
                    if pass_index < getattr(reducer, "passes", 1):
                        ctx = TensorContext(tensor_name, self.device, {}, self.layout.num_layers)
                        reducer.update(pass_index, tensors, ctx)

                for name, raw in self._inputs(program, self.layout.names):
                    self.execute(program, name, raw, sink=None, feed=feed)
                    if progress:
                        progress.advance(name, 0)
                for reducer in reducers.values():
                    if pass_index < getattr(reducer, "passes", 1):
                        reducer.end_pass(pass_index)
            for task in tasks:
                self.reduced[id(task.node)] = float(reducers[task.name].result())
        self._scalar_cache.clear()

    # the main pass

    def results(self, outputs: list[str], progress=None, *,
                pieces: bool = False) -> Iterator[tuple[str, str, torch.Tensor, bool]]:
        """(output, tensor name, result, whole) for every tensor of ``outputs``, base order.

        Results are on the CPU in their output dtype; float tensors the plan
        computes, integer tensors copied from the base (Model outputs only).
        With ``pieces=True`` a large tensor of a chunkable program comes as flat
        pieces in order (``whole`` False), each valid until given back
        (``give_back``); otherwise every result is whole.
        """
        program = self.plan.schedule.main
        kinds = {name: self.plan.output_kind(name) for name in outputs}
        base = self.bound.readers[self.bound.base]
        order = self._order()
        computed = set(self.layout.names)
        compute_names = [n for n in order if n in computed]
        inputs = self._inputs(program, compute_names)
        for name in order:
            info = self.layout.infos[name]
            if name in computed:
                got, raw = next(inputs)
                assert got == name
                linear = self._linear_for(program) if pieces else None
                kernels = None
                if linear is not None and _numel(info.shape) >= CHUNK_MIN:
                    kernels = _translated_call(name, self._chunk_kernels, program, name)
                if kernels is not None:
                    chunks = self._execute_chunked(program, linear, name, raw, kernels, pieces=True)
                    for out, piece in _translated(name, chunks):
                        if out in kinds:
                            yield out, name, piece, False
                        else:
                            self.give_back(piece)
                else:
                    results: list[tuple[str, torch.Tensor]] = []
                    self.execute(program, name, raw, sink=lambda out, t: results.append((out, t)))
                    for out, tensor in results:
                        if out in kinds:
                            yield out, name, self._finish(tensor, info), True
            else:
                # An integer buffer, or (missing="base") a float tensor some input lacks:
                # the base's, into Model outputs only.
                tensor = base.read(name)
                copied = name in self.layout.copied
                for out in outputs:
                    if kinds[out] != "model":
                        continue
                    yield out, name, (self._finish(tensor, info) if copied else tensor), True
            if progress:
                progress.advance(name, info.nbytes * len(outputs))

    def _order(self) -> list[str]:
        wanted = set(self.layout.names) | set(self.layout.passthrough) | set(self.layout.copied)
        return [n for n in self.bound.readers[self.bound.base].names() if n in wanted]

    def _in_output(self, name: str, kind: str) -> bool:
        """Base-copied tensors (integer buffers, missing="base") go to Model outputs only."""
        if name in self.layout.passthrough or name in self.layout.copied:
            return kind == "model"
        return True

    def _finish(self, tensor: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        dtype = self.out_dtype or info.dtype
        return tensor.to(device="cpu", dtype=dtype)

    def output_layout(self, output: str) -> list[TensorInfo]:
        kind = self.plan.output_kind(output)
        result = []
        for name in self._order():
            info = self.layout.infos[name]
            if not self._in_output(name, kind):
                continue
            if name in self.layout.passthrough:
                dtype = info.dtype
            else:
                dtype = self.out_dtype or info.dtype
            nbytes = _numel(info.shape) * torch.empty((), dtype=dtype).element_size()
            result.append(TensorInfo(name, tuple(info.shape), dtype, nbytes, ""))
        return result


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def _translated_call(name: str, function, *args):
    """``function(*args)`` with its errors said as Session.execute says them (tensor ``name``)."""
    try:
        return function(*args)
    except (TvlangError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise _tensor_error(name, exc) from None


def _needed_steps(program: TensorProgram, targets: set[int]) -> list[int]:
    """Indices of the steps that the call steps ``targets`` depend on, and those calls, in order.

    A backward walk over slots: a step is needed when it makes or changes a slot
    that a needed step reads later. Writes are never needed.
    """
    needed: list[int] = []
    live: set[int] = set()
    for index in range(len(program.steps) - 1, -1, -1):
        step = program.steps[index]
        if index in targets:
            needed.append(index)
            live.update(step.srcs)
        elif step.op != "write" and step.dst in live:
            needed.append(index)
            if step.op not in ("scale", "axpy"):  # makes a new value: earlier ones are dead
                live.discard(step.dst)
            live.update(step.srcs)
    return needed[::-1]


def _translated(name: str, chunks: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``chunks`` with the errors of computing tensor ``name`` said as Session.execute says them."""
    try:
        yield from chunks
    except (TvlangError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise _tensor_error(name, exc) from None


def _tensor_error(name: str, exc: Exception) -> TvlangError:
    """A failure while computing tensor ``name`` as one TvlangError that names it."""
    if not isinstance(exc, TvlangError):
        return TvlangError(f"while computing tensor '{name}': {exc}", tensor=name)
    if exc.tensor is None:
        exc.tensor = name
        exc.message = f"tensor '{name}': {exc.message}"
        exc.args = (exc.message,)
    return exc


_KERNELS: dict[str, Any] | None = None


def _kernel(name: str):
    global _KERNELS
    if _KERNELS is None:
        from tvlang.ops.registry import KERNELS

        _KERNELS = KERNELS
    return _KERNELS[name]


# -- the public entry points -----------------------------------------------------------------


def stream(plan: Plan, bindings: Mapping[str, Any], *, output: str | None = None, device: Any = "cpu",
           dtype: Any = "float32", out_dtype: Any = None, missing: str = "error") -> Iterator[tuple[str, torch.Tensor]]:
    """(tensor name, tensor) of one output, in the base's order, computed as they are asked for.

    Nothing is opened until the first pair is asked for. Each tensor is fresh memory
    (CPU, output dtype) that the caller keeps.

    >>> import torch, tvlang
    >>> pairs = stream(tvlang.compile("pre + 0.5*(ft - pre)"),
    ...                {"pre": {"w": torch.zeros(2)}, "ft": {"w": torch.ones(2)}})
    >>> [(name, t.tolist()) for name, t in pairs]
    [('w', [0.5, 0.5])]
    """
    bound = bind(plan, bindings)
    try:
        plan = bound.plan
        if output is None:
            if len(plan.outputs) != 1:
                raise TvlangError(f"this recipe has outputs {', '.join(plan.outputs)}: say which one with output=")
            output = plan.outputs[0]
        elif output not in plan.outputs:
            raise TvlangError(f"no output named '{output}'; the outputs are {', '.join(plan.outputs)}")
        session = Session(bound, device=device, dtype=dtype, out_dtype=out_dtype, missing=missing)
        session.reduce()
        for _, name, tensor, _ in session.results([output]):
            yield name, tensor
    except TvlangError as exc:
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    finally:
        bound.close()


def run(plan: Plan, bindings: Mapping[str, Any], out: Any, *, device: Any = "cpu", dtype: Any = "float32",
        out_dtype: Any = None, shard_size: int | None = None, force: bool = False, missing: str = "error",
        progress: Any = False) -> RunSummary:
    """Compute every output in one pass over the inputs and write them."""
    started = time.perf_counter()
    bound = bind(plan, bindings)
    writers: dict[str, StreamingWriter] = {}
    try:
        plan = bound.plan
        targets = _targets(plan, out)
        session = Session(bound, device=device, dtype=dtype, out_dtype=out_dtype, missing=missing)
        check_distinct_outputs(targets)
        inputs = [*protected_paths(plan, bindings), *bound.readers.values()]
        for name, path in targets.items():
            kind = plan.output_kind(name)
            metadata = _metadata(plan, bound, name, kind)
            base = bound.readers[bound.base]
            copy_from = base.root if kind == "model" and base.root and not str(path).endswith(".safetensors") else None
            writers[name] = StreamingWriter(path, session.output_layout(name), shard_size=shard_size,
                                            metadata=metadata, inputs=inputs, force=force, copy_from=copy_from)
        bar = _progress(progress, session, len(targets))
        session.reduce(bar)
        count = 0
        written = 0
        session.recycle_outputs = True
        session.pool_size = (IN_FLIGHT + 1) * len(targets)
        with _compute_threads(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvlang-write") as pool:
            pending: list[tuple[Future, torch.Tensor]] = []
            for output, name, tensor, whole in session.results(list(targets), bar, pieces=True):
                # A few writes in flight per output: memory stays bounded.
                while len(pending) >= IN_FLIGHT * len(targets):
                    future, done = pending.pop(0)
                    future.result()
                    session.give_back(done)
                write = writers[output].write if whole else writers[output].write_part
                pending.append((pool.submit(write, name, tensor), tensor))
                written += tensor.numel() * tensor.element_size()
            for future, done in pending:
                future.result()
                session.give_back(done)
        _commit_all(list(writers.values()))
        count = sum(len(writer.layout) for writer in writers.values())
        if bar:
            bar.close()
        return RunSummary({k: str(v) for k, v in targets.items()}, count, written,
                          time.perf_counter() - started, plan.schedule.passes)
    except BaseException as exc:
        for writer in writers.values():
            writer.abort()  # a published or committed writer is left as it is
        if isinstance(exc, TvlangError):
            raise exc.with_context(source=plan.text, filename=plan.filename) from None
        raise
    finally:
        bound.close()


def protected_paths(plan: Plan, bindings: Mapping[str, Any]) -> list[str]:
    """Every path the recipe names or is bound to, read or not: no output may replace one.

    A source that the optimizer cancels (``pre + (ft - pre)`` never reads ``pre``)
    is still an input of the recipe as written.
    """
    paths = [spec.path for spec in plan.unoptimized.sources.values() if spec.path is not None]
    for name in plan.checked.sources:
        value = bindings.get(name)
        if isinstance(value, DeltaBinding):
            value = value.value
        if isinstance(value, (str, os.PathLike)):
            paths.append(os.fspath(value))
    return paths


def _commit_all(writers: list[StreamingWriter]) -> None:
    """Commit several outputs so that they appear together: sync all, then rename all.

    A failure (or Ctrl-C) before the last rename withdraws the outputs already
    renamed into place, putting back what was there before (``--force``).
    """
    for writer in writers:
        writer.prepare()
    published: list[StreamingWriter] = []
    try:
        for writer in writers:
            writer.publish()
            published.append(writer)
    except BaseException:
        for writer in reversed(published):
            writer.withdraw()
        raise
    for writer in writers:
        writer.finish()


@contextlib.contextmanager
def _compute_threads():
    """Leave a core to the writer thread (and the kernel's page-cache copies) during a run.

    Measured on 2 cores: chunked steps on one torch thread beat two threads that
    fight the writer for the second core; the setting is restored afterwards.
    """
    previous = torch.get_num_threads()
    wanted = max(1, min(previous, (os.cpu_count() or 2) - 1))
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _targets(plan: Plan, out: Any) -> dict[str, Any]:
    if out is None:
        raise TvlangError("no output path given (-o PATH)")
    if isinstance(out, Mapping):
        unknown = [k for k in out if k not in plan.outputs]
        if unknown:
            raise TvlangError(f"no output named '{unknown[0]}'; the outputs are {', '.join(plan.outputs)}")
        lacking = [k for k in plan.outputs if k not in out]
        if lacking:
            raise TvlangError(f"no path given for output '{lacking[0]}' (-o {lacking[0]}=PATH)")
        return dict(out)
    if len(plan.outputs) != 1:
        raise TvlangError(f"this recipe has outputs {', '.join(plan.outputs)}: give -o NAME=PATH for each")
    return {plan.outputs[0]: out}


def _metadata(plan: Plan, bound: Bound, output: str, kind: str) -> dict[str, str]:
    from tvlang import __version__

    return {
        "tvlang.version": __version__,
        "tvlang.kind": "delta" if kind == "delta" else "model",
        "tvlang.output": output,
        "tvlang.recipe": plan.text,
        "tvlang.params": json.dumps(plan.params, sort_keys=True),
        "tvlang.inputs": json.dumps({k: bound.readers[k].label for k in _output_inputs(plan, bound, output, kind)},
                                    sort_keys=True),
    }


def _output_inputs(plan: Plan, bound: Bound, output: str, kind: str) -> list[str]:
    """The sources an output is computed from; a Model output also takes the base's integer tensors."""
    keys = [k for k in plan.sources_read(output) if k in bound.readers]
    if kind == "model" and bound.base not in keys:
        keys.append(bound.base)
    return keys


class _Progress:
    """tensors and bytes done, throughput and ETA on one stderr line."""

    def __init__(self, total_tensors: int, total_bytes: int, passes: int) -> None:
        self.total = total_tensors * passes
        self.total_bytes = total_bytes
        self.done = 0
        self.bytes = 0
        self.started = time.perf_counter()
        self.last = 0.0
        self.lock = threading.Lock()

    def advance(self, name: str, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self.last < 0.1 and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.started
        rate = self.bytes / elapsed / 2**20 if elapsed > 0 else 0.0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} tensors, {self.bytes / 2**20:.0f} MiB, "
                         f"{rate:.0f} MiB/s, ETA {eta:.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * 79 + "\r")
        sys.stderr.flush()


def _progress(progress: Any, session: Session, outputs: int):
    if not progress:
        return None
    if progress is True and not sys.stderr.isatty():
        return None
    names = session._order()
    total_bytes = sum(session.layout.infos[n].nbytes for n in names) * outputs
    return _Progress(len(names), total_bytes, session.plan.schedule.passes)
