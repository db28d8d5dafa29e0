"""The whole-tensor interpreter: a program run over whole tensors, one step at a time.

Used for tensors below ``CHUNK_MIN`` entries, for programs with a kernel that has no
chunk form (sce, arcee_fusion, ...), and for the reduction passes. Inputs are never
changed in place: a slot that holds a caller's tensor (or one handed to a sink) is
*borrowed*, and the first change to it makes a fresh result instead. A kernel's result that
shares memory with a caller's tensor (a kernel may hand back its input, or a view of it) is
borrowed too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tvlang.ops.pertensor import resolve_options
from tvlang.plan.schedule import STEP_OPS, TensorProgram, resolve_coef
from tvlang.run.steps import ARITHMETIC, kernel

if TYPE_CHECKING:
    from tvlang.run.session import Session

__all__ = ["execute_whole"]


def execute_whole(session: "Session", program: TensorProgram, name: str, raw: dict[str, torch.Tensor],
                  sink, feed) -> None:
    """Run ``program`` for tensor ``name``: ``sink(output, tensor)`` gets results, ``feed`` reductions' inputs."""
    buffers: list[torch.Tensor | None] = [None] * program.n_buffers
    borrowed: set[int] = set()  # ids of tensors that must not be changed in place
    callers: set[int] = set()  # the memory (storage addresses) of the caller's tensors read
    for step in program.steps:
        op = step.op
        if op in ARITHMETIC:
            coef = tuple(resolve_coef(c, session.scalar) for c in step.coef) if op == "add" else \
                resolve_coef(step.coef, session.scalar)
            srcs = [buffers[s] for s in step.srcs]
            if STEP_OPS[op].effect == "update":
                current = buffers[step.dst]
                out = None if id(current) in borrowed else current  # a fresh result, or in place
                buffers[step.dst] = ARITHMETIC[op](current, srcs, coef, out)
            else:
                buffers[step.dst] = ARITHMETIC[op](None, srcs, coef, None)
        elif op == "read":
            source = raw[step.name]
            tensor = source.to(device=session.device, dtype=session.dtype, non_blocking=True)
            if tensor is source and step.name in session.bound.borrowed:
                borrowed.add(id(tensor))
                callers.add(storage(tensor))
            buffers[step.dst] = tensor
        elif op == "zero":
            buffers[step.dst] = torch.zeros(session.layout.infos[name].shape, dtype=session.dtype,
                                            device=session.device)
        elif op == "call":
            ctx = session.call_context(step, name)
            options = resolve_options(step.options, ctx)  # per-tensor values: this tensor's
            result = kernel(step.name)([buffers[s] for s in step.srcs], ctx, **options)
            if callers and storage(result) in callers:
                borrowed.add(id(result))
            buffers[step.dst] = result
        elif op == "write":
            tensor = buffers[step.srcs[0]]
            sink(step.name, tensor)
            borrowed.add(id(tensor))  # the sink may still hold it
        elif op == "feed":
            feed(step.name, [buffers[s] for s in step.srcs], name)
        else:  # pragma: no cover - STEP_OPS names every op
            raise AssertionError(op)


def storage(tensor: torch.Tensor) -> int:
    """The address of the memory ``tensor`` lies in (its views share it)."""
    return tensor.untyped_storage().data_ptr()
