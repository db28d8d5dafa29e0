"""The entry points: ``run`` (write every output), ``stream`` (yield one output's tensors).

``run`` plans every output's layout and opens its writers before anything is
computed (so a bad output path costs nothing), streams the results to the writers
with a few writes in flight per output, and commits the outputs together: all are
synced, then renamed, and a failure between renames withdraws those already
renamed (putting back what ``--force`` replaced).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from tvlang.errors import TvlangError
from tvlang.io import StreamingWriter, check_distinct_outputs
from tvlang.plan.records import RunSummary
from tvlang.run.bindings import Bound, bind, protected_paths
from tvlang.run.align import align
from tvlang.run.layout import notes, validate
from tvlang.run.progress import progress_for
from tvlang.run.session import Session
from tvlang.version import __version__

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["apply_to", "run", "stream"]

IN_FLIGHT = 2  # writes queued per output by run() (whole tensors or pieces)


def stream(plan: Plan, bindings: Mapping[str, Any], *, output: str | None = None, device: Any = "cpu",
           dtype: Any = "float32", out_dtype: Any = None, missing: str = "error",
           allow_nonfinite: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
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
        session = Session(bound, device=device, dtype=dtype, out_dtype=out_dtype, missing=missing,
                          allow_nonfinite=allow_nonfinite)
        session.reduce()
        for _, name, tensor, _ in session.results([output]):
            yield name, tensor
    except TvlangError as exc:
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    finally:
        bound.close()


def run(plan: Plan, bindings: Mapping[str, Any], out: Any, *, device: Any = "cpu", dtype: Any = "float32",
        out_dtype: Any = None, shard_size: int | None = None, force: bool = False, missing: str = "error",
        progress: Any = False, allow_nonfinite: bool = False) -> RunSummary:
    """Compute every output in one pass over the inputs and write them."""
    started = time.perf_counter()
    bound = bind(plan, bindings)
    writers: dict[str, StreamingWriter] = {}
    bar = None
    try:
        plan = bound.plan
        targets = _targets(plan, out)
        session = Session(bound, device=device, dtype=dtype, out_dtype=out_dtype, missing=missing,
                          allow_nonfinite=allow_nonfinite)
        check_distinct_outputs(targets)
        inputs = [*protected_paths(plan, bindings), *bound.readers.values()]
        for name, path in targets.items():
            kind = plan.output_kind(name)
            metadata = _metadata(plan, bound, name, kind)
            base = bound.readers[bound.base]
            copy_from = base.root if kind == "model" and base.root and not str(path).endswith(".safetensors") else None
            writers[name] = StreamingWriter(path, session.output_layout(name), shard_size=shard_size,
                                            metadata=metadata, inputs=inputs, force=force, copy_from=copy_from)
        bar = progress_for(progress)
        session.reduce(bar)
        count = 0
        written = 0
        session.buffers.recycle = True
        session.buffers.size = (IN_FLIGHT + 1) * len(targets)
        with _compute_threads(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvlang-write") as pool:
            pending: list[tuple[Future, torch.Tensor]] = []
            for output, name, tensor, whole in session.results(list(targets), bar, pieces=True):
                # A few writes in flight per output: memory stays bounded.
                while len(pending) >= IN_FLIGHT * len(targets):
                    future, done = pending.pop(0)
                    future.result()
                    session.buffers.give_back(done)
                write = writers[output].write if whole else writers[output].write_part
                pending.append((pool.submit(write, name, tensor), tensor))
                written += tensor.numel() * tensor.element_size()
            for future, done in pending:
                future.result()
                session.buffers.give_back(done)
        _commit_all(list(writers.values()))
        count = sum(len(writer.layout) for writer in writers.values())
        return RunSummary({k: str(v) for k, v in targets.items()}, count, written,
                          time.perf_counter() - started, plan.schedule.passes, notes(bound, session.layout, missing))
    except BaseException as exc:
        for writer in writers.values():
            writer.abort()  # a published or committed writer is left as it is
        if isinstance(exc, TvlangError):
            raise exc.with_context(source=plan.text, filename=plan.filename) from None
        raise
    finally:
        if bar is not None:
            bar.close()  # the bar's line is cleared on success, error and Ctrl-C alike
        bound.close()


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


def apply_to(plan: Plan, module: Any, bindings: Mapping[str, Any], *, output: str | None = None,
             **options: Any) -> int:
    """Compute one output and write it into ``module``'s parameters and buffers, in place.

    For sweeps that evaluate in memory (as the task_vectors code's ``apply_to`` does):
    each result tensor is copied into the module's tensor of the same name (names
    aligned as inputs are: ``module.``, ``model.`` and other prefixes), cast to its
    dtype and moved to its device; nothing else of the module changes. Returns the
    number of tensors written. A result the module has no tensor for is an error;
    tensors of the module the output lacks are left as they are.
    """
    targets = module.state_dict()
    shape = validate(plan, bindings, missing=options.get("missing", "error"))
    mapping, _ = align([*shape.names, *shape.passthrough, *shape.copied], list(targets))
    count = 0
    with torch.no_grad():
        for name, tensor in stream(plan, bindings, output=output, **options):
            key = mapping.get(name)
            if key is None:
                raise TvlangError(f"the module has no tensor for '{name}' (its names look like"
                                  f" '{next(iter(targets), '(none)')}')", tensor=name)
            target = targets[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise TvlangError(f"tensor '{name}' is {list(tensor.shape)} but the module's '{key}' is"
                                  f" {list(target.shape)}", tensor=name)
            target.copy_(tensor)
            count += 1
    return count
