"""One execution of a bound plan: reductions first, then the main pass, tensor by tensor.

For each tensor name (in the base's file order) a ``Session`` reads only the inputs
the plan needs (one tensor ahead, in a thread), runs the per-tensor program with the
chunked interpreter when it can (``tvlang.run.chunked``) and the whole-tensor one
otherwise (``tvlang.run.whole``), and yields the results. Whole-model scalars are
computed first, in passes of their own (``reduce``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import torch

from tvlang.errors import TvlangError
from tvlang.io import TensorInfo
from tvlang.ops.context import TensorContext
from tvlang.plan.ir import Node
from tvlang.plan.schedule import Step, TensorProgram, scalar_value
from tvlang.run import chunked
from tvlang.run.bindings import Bound
from tvlang.run.buffers import OutputBuffers
from tvlang.run.chunked import LinearProgram, chunk_kernels, execute_chunked, linear_program
from tvlang.run.finite import check_finite, check_scalar
from tvlang.run.layout import layout
from tvlang.run.options import parse_device, parse_dtype
from tvlang.run.steps import USER_ERRORS, numel, tensor_error, translated, translated_call
from tvlang.run.whole import execute_whole, storage

__all__ = ["Session"]


class Session:
    """One execution of a bound plan: reductions first, then the main pass."""

    def __init__(self, bound: Bound, *, device: Any = "cpu", dtype: Any = "float32",
                 out_dtype: Any = None, missing: str = "error", prefetch: bool = True,
                 allow_nonfinite: bool = False, to_host: bool = True) -> None:
        self.bound = bound
        self.plan = bound.plan
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.out_dtype = parse_dtype(out_dtype, "output dtype") if out_dtype is not None else None
        self.layout = layout(bound, missing)
        self.prefetch = prefetch
        self.allow_nonfinite = allow_nonfinite
        self.to_host = to_host  # results on the CPU (else where they were computed: apply_to)
        # (output, tensor name) -> where the caller wants that result computed, or None (apply_to)
        self.destination: Callable[[str, str], torch.Tensor | None] | None = None
        self.reduced: dict[int, float] = {}  # id(reduce node) -> value
        self._scalar_cache: dict[int, float] = {}
        self._linear: dict[int, LinearProgram | None] = {}  # id(program) -> analysis
        self.scratch: dict[int, torch.Tensor] = {}  # value -> chunk buffer (chunked runs)
        self.buffers = OutputBuffers()
        self._check_coefficients()

    def _check_coefficients(self) -> None:
        """A constant coefficient beyond the compute dtype's range (``1e30*(1e30*tau)``
        in float32) is an error before any read, not torch's overflow error at the first tensor."""
        if not self.dtype.is_floating_point:
            return
        largest = torch.finfo(self.dtype).max
        programs = [program for _, program in self.plan.schedule.levels] + [self.plan.schedule.main]
        for program in programs:
            for step in program.steps:
                coefs = step.coef if step.op == "add" else (step.coef,)
                for coef in coefs or ():
                    if isinstance(coef, float) and abs(coef) > largest:
                        raise TvlangError(
                            f"the recipe scales a term by {coef:g}, beyond what {_dtype_name(self.dtype)} "
                            f"can hold (about {largest:.1e}): compute in float64 (--dtype float64)")

    # scalars

    def scalar(self, node: Node) -> float:
        """The value of a scalar node (a coefficient) once the reductions ran."""
        return scalar_value(node, self.reduced, self._scalar_cache)

    # reading

    def _read_all(self, program: TensorProgram, name: str) -> dict[str, torch.Tensor]:
        readers = self.bound.readers
        return {key: readers[key].read(name) for key in program.reads}

    def _read_batch(self, program: TensorProgram, names: list[str]) -> list[dict[str, torch.Tensor]]:
        return [self._read_all(program, name) for name in names]

    def _batches(self, names: list[str]) -> list[list[str]]:
        """``names`` in runs read by one hand-over to the reading thread: one large tensor,
        or small ones up to ``READ_BATCH_BYTES`` (handing over each tiny tensor alone cost
        more than reading it)."""
        batches: list[list[str]] = []
        size = 0
        infos = self.layout.infos
        for name in names:
            nbytes = infos[name].nbytes if name in infos else READ_BATCH_BYTES
            if not batches or size + nbytes > READ_BATCH_BYTES or len(batches[-1]) >= READ_BATCH_COUNT:
                batches.append([])
                size = 0
            batches[-1].append(name)
            size += nbytes
        return batches

    def _inputs(self, program: TensorProgram, names: list[str]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(name, raw input tensors) for each name, read one batch ahead in a thread."""
        if not self.prefetch or len(names) < 2:
            for name in names:
                yield name, self._read_all(program, name)
            return
        batches = self._batches(names)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvlang-read") as pool:
            pending: Future = pool.submit(self._read_batch, program, batches[0])
            for index, batch in enumerate(batches):
                raws = pending.result()
                if index + 1 < len(batches):
                    pending = pool.submit(self._read_batch, program, batches[index + 1])
                yield from zip(batch, raws)

    # one tensor

    def execute(self, program: TensorProgram, name: str, raw: dict[str, torch.Tensor],
                sink, feed=None) -> None:
        """Run ``program`` for tensor ``name``; ``sink(output, tensor)`` gets results."""
        try:
            self._execute(program, name, raw, sink, feed)
        except USER_ERRORS as exc:
            raise tensor_error(name, exc) from exc

    def _linear_for(self, program: TensorProgram) -> LinearProgram | None:
        key = id(program)
        if key not in self._linear:
            self._linear[key] = linear_program(program)
        return self._linear[key]

    def _execute(self, program: TensorProgram, name: str, raw: dict[str, torch.Tensor], sink, feed) -> None:
        linear = self._linear_for(program)
        kernels = chunk_kernels(self, program, name) if linear is not None and \
            numel(self.layout.infos[name].shape) >= chunked.CHUNK_MIN else None
        if kernels is None:
            execute_whole(self, program, name, raw, sink, feed)
        elif feed is not None:  # a reduction pass: its reducers take the chunks
            for _ in execute_chunked(self, program, linear, name, raw, kernels, pieces=False, feed=feed):
                pass
        else:
            for output, tensor in self._execute_chunked(program, linear, name, raw, kernels, pieces=False):
                sink(output, tensor)

    # The chunked interpreter, as a method so that tests can watch it.
    _execute_chunked = execute_chunked

    def call_context(self, step: Step, name: str) -> TensorContext:
        """The TensorContext of a kernel call for tensor ``name``, with the reductions it asked for."""
        calls = self.plan.schedule.call_reductions.get(id(step.node), [])
        return TensorContext(name, self.device, {key: self.reduced[id(node)] for key, node in calls},
                             self.layout.num_layers, tuple(self.layout.infos[name].shape))

    # reductions

    def reduce(self, progress=None, map_pass=None) -> None:
        """Run the reduction passes: every whole-model scalar the main pass needs.

        ``map_pass(level, pass_index, reducers, label)``, when given, runs a pass elsewhere
        (the Ray executor's map tasks): it returns reducers that copies of ``reducers``
        became over parts of the tensors, which are merged here in order (``merge``), or
        None to stream the pass here. Only a level whose reducers all have ``merge`` is
        handed to it.
        """
        number = 0  # passes so far, for the bar's label
        total = self.plan.schedule.passes
        for level, (tasks, program) in enumerate(self.plan.schedule.levels):
            reducers = {}
            for task in tasks:
                if task.factory is None:
                    raise TvlangError(f"no reducer for '{task.builtin}'")
                reducers[task.name] = task.factory()
            passes = max(getattr(r, "passes", 1) for r in reducers.values())
            mergeable = map_pass is not None and all(hasattr(r, "merge") for r in reducers.values())
            for pass_index in range(passes):
                number += 1
                label = f"pass {number} of {total}: {', '.join(sorted({t.builtin for t in tasks}))}"
                parts = map_pass(level, pass_index, reducers, label) if mergeable else None
                if parts is None:
                    self.feed_pass(program, reducers, pass_index, self.layout.names, progress, label)
                else:
                    for part in parts:
                        for task_name, reducer in reducers.items():
                            if pass_index < getattr(reducer, "passes", 1):
                                reducer.merge(pass_index, part[task_name])
                for reducer in reducers.values():
                    if pass_index < getattr(reducer, "passes", 1):
                        reducer.end_pass(pass_index)
            for task in tasks:
                value = float(reducers[task.name].result())
                if not self.allow_nonfinite:
                    check_scalar(value, f"the whole-model scalar {task.builtin}(...) ({task.name} in explain)")
                self.reduced[id(task.node)] = value
        self._scalar_cache.clear()

    def feed_pass(self, program: TensorProgram, reducers: dict, pass_index: int, names: list[str],
                  progress=None, label: str = "") -> None:
        """Stream ``names`` through a reduction level's ``program`` into ``reducers`` (pass ``pass_index``)."""
        def feed(task_name, tensors, tensor_name):
            reducer = reducers[task_name]
            if pass_index < getattr(reducer, "passes", 1):
                ctx = TensorContext(tensor_name, self.device, {}, self.layout.num_layers)
                reducer.update(pass_index, tensors, ctx)

        reads = len(program.reads)
        if progress:
            progress.start(label, len(names), reads * sum(self.layout.infos[n].nbytes for n in names))
        for name, raw in self._inputs(program, names):
            self.execute(program, name, raw, sink=None, feed=feed)
            if progress:
                progress.advance(name, reads * self.layout.infos[name].nbytes)

    # the main pass

    def results(self, outputs: list[str], progress=None, *,
                pieces: bool = False) -> Iterator[tuple[str, str, torch.Tensor, bool]]:
        """(output, tensor name, result, whole) for every tensor of ``outputs``, base order.

        Results are on the CPU (or, without ``to_host``, where they were computed) in their
        output dtype, and never a caller's tensor (a result that is one, or shares its memory,
        is copied); float tensors the plan computes, integer tensors copied from the base
        (Model outputs only).
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
        if progress:
            label = "main pass" if not self.plan.schedule.levels else f"pass {self.plan.schedule.passes} (main)"
            progress.start(label, len(order), sum(self.layout.infos[n].nbytes for n in order) * len(outputs))
        # The reading generator is closed here, not left to the garbage collector: a Ctrl-C that
        # lands while it shuts its reading thread down then propagates (a generator finalized
        # by the collector would swallow it, and the run go on to its commit).
        try:
            for name in order:
                info = self.layout.infos[name]
                if name in computed:
                    got, raw = next(inputs)
                    assert got == name
                    callers = {storage(t) for key, t in raw.items() if key in self.bound.borrowed}
                    linear = self._linear_for(program) if pieces else None
                    kernels = None
                    if linear is not None and numel(info.shape) >= chunked.CHUNK_MIN:
                        kernels = translated_call(name, chunk_kernels, self, program, name)
                    if kernels is not None:
                        chunks = self._execute_chunked(program, linear, name, raw, kernels, pieces=True)
                        offsets = dict.fromkeys(kinds, 0)
                        for out, piece in translated(name, chunks):
                            if out in kinds:
                                self._check(piece, out, name, info, offsets[out])
                                offsets[out] += piece.numel()
                                yield out, name, piece, False
                            else:
                                self.buffers.give_back(piece)
                    else:
                        results: list[tuple[str, torch.Tensor]] = []
                        self.execute(program, name, raw, sink=lambda out, t: results.append((out, t)))
                        for out, tensor in results:
                            if out in kinds:
                                tensor = self._finish(tensor, info, callers)
                                self._check(tensor, out, name, info)
                                yield out, name, tensor, True
                else:
                    # An integer buffer, or (missing="base") a float tensor some input lacks:
                    # the base's, into Model outputs only.
                    tensor = base.read(name)
                    copied = name in self.layout.copied
                    callers = {storage(tensor)} if self.bound.base in self.bound.borrowed else set()
                    if copied:
                        tensor = self._finish(tensor, info, callers)
                    elif callers:
                        tensor = tensor.clone()
                    for out in outputs:
                        if kinds[out] != "model":
                            continue
                        if copied:
                            self._check(tensor, out, name, info)
                        yield out, name, tensor, True
                if progress:
                    progress.advance(name, info.nbytes * len(outputs))
        finally:
            inputs.close()

    def recompute(self, output: str, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` of ``output`` computed once more from its inputs, as the flat pieces
        ``results(pieces=True)`` gave (each valid until given back): a second look at a result
        too large to keep (``extract-lora`` reads a large matrix twice). Kernels are deterministic
        per tensor (seeded by its name), so the pieces are the same."""
        program = self.plan.schedule.main
        linear = self._linear_for(program)
        raw = self._read_all(program, name)
        kernels = translated_call(name, chunk_kernels, self, program, name)
        for out, piece in translated(name, self._execute_chunked(program, linear, name, raw, kernels, pieces=True)):
            if out == output:
                yield piece
            else:
                self.buffers.give_back(piece)

    def _check(self, tensor: torch.Tensor, output: str, name: str, info: TensorInfo, offset: int = 0) -> None:
        """The finiteness policy (tvlang.run.finite) on a result, or a piece of one at ``offset``."""
        if not self.allow_nonfinite:
            check_finite(tensor, output=output, name=name, shape=info.shape, offset=offset)

    def _order(self) -> list[str]:
        wanted = set(self.layout.names) | set(self.layout.passthrough) | set(self.layout.copied)
        return [n for n in self.bound.readers[self.bound.base].names() if n in wanted]

    def _in_output(self, name: str, kind: str) -> bool:
        """Base-copied tensors (integer buffers, missing="base") go to Model outputs only."""
        if name in self.layout.passthrough or name in self.layout.copied:
            return kind == "model"
        return True

    def _finish(self, tensor: torch.Tensor, info: TensorInfo, callers: set[int]) -> torch.Tensor:
        """A result in its output dtype, on the CPU where ``to_host``; a copy where it would
        otherwise be a caller's tensor (whose memory is among ``callers``)."""
        dtype = self.out_dtype or info.dtype
        result = tensor.to(device="cpu" if self.to_host else tensor.device, dtype=dtype)
        if result is tensor and callers and storage(result) in callers:
            result = result.clone()
        return result

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
            nbytes = numel(info.shape) * dtype.itemsize
            result.append(TensorInfo(name, tuple(info.shape), dtype, nbytes, ""))
        return result


READ_BATCH_BYTES = 1 << 20  # small tensors read ahead together, up to this many bytes
READ_BATCH_COUNT = 512


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
