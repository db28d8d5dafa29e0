"""The entry points: ``run`` (write every output), ``stream`` (yield one output's tensors).

``run`` plans every output's layout and opens its writers before anything is
computed (so a bad output path costs nothing), streams the results to the writers
with a few writes in flight per output, and commits the outputs together: all are
synced, then renamed, and a failure between renames withdraws those already
renamed (putting back what ``--force`` replaced).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch

from tvlang.errors import TvlangError
from tvlang.io import StreamingWriter, check_distinct_outputs, open_writer
from tvlang.io.atomic import AtomicReplace
from tvlang.plan.records import RunSummary
from tvlang.run import distributed
from tvlang.run.align import align
from tvlang.run.bindings import bind, protected_paths
from tvlang.run.extract import Extraction, adapter_forms, check_adapter_paths, prepare_adapter
from tvlang.run.layout import input_reports, notes, validate
from tvlang.run.lock import verified
from tvlang.run.model_config import attach_config
from tvlang.run.outputs import (
    IN_FLIGHT,
    commit_all,
    model_files_of,
    output_files,
    output_metadata,
    output_reports,
    output_targets,
    refuse_state_dict_outputs,
    write_results,
)
from tvlang.run.progress import progress_for
from tvlang.run.session import Session

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["IN_FLIGHT", "EXECUTORS", "TensorStream", "apply_to", "run", "stream"]

EXECUTORS = ("local", "ray")  # who computes: this process, or tasks on a Ray cluster (tvlang.run.distributed)


def stream(plan: Plan, bindings: Mapping[str, Any], *, output: str | None = None, device: Any = "cpu",
           dtype: Any = "float32", out_dtype: Any = None, missing: str = "error",
           allow_nonfinite: bool = False) -> "TensorStream":
    """(tensor name, tensor) of one output, in the base's order, computed as they are asked for.

    Nothing is opened until the first pair (or the length) is asked for. Each tensor
    is fresh memory (CPU, output dtype) that the caller keeps. ``len()`` of the stream
    is the number of pairs it yields, known from the inputs' headers (no weight is read).

    >>> import torch, tvlang
    >>> pairs = stream(tvlang.compile("pre + 0.5*(ft - pre)"),
    ...                {"pre": {"w": torch.zeros(2)}, "ft": {"w": torch.ones(2)}})
    >>> len(pairs), [(name, t.tolist()) for name, t in pairs]
    (1, [('w', [0.5, 0.5])])
    """
    return TensorStream(plan, bindings, output=output, device=device, dtype=dtype, out_dtype=out_dtype,
                        missing=missing, allow_nonfinite=allow_nonfinite)


class TensorStream:
    """The iterator ``stream`` returns: pairs of one output, with ``len()``.

    The inputs are bound (headers read, names aligned, the layout checked) when the
    length or the first pair is asked for, once; the reduction passes run before the
    first pair. The inputs are closed when the last pair has been yielded, on an error,
    or by ``close()`` (also on leaving a ``with`` block).
    """

    def __init__(self, plan: Plan, bindings: Mapping[str, Any], *, output: str | None, **options: Any) -> None:
        self._plan = plan
        self._bindings = bindings
        self._output = output
        self._options = options
        self._session: Session | None = None
        self._length: int | None = None
        self._pairs: Iterator[tuple[str, torch.Tensor]] | None = None
        self._closed = False
        self.destination: Callable[[str], torch.Tensor | None] | None = None  # apply_to: name -> its tensor

    def _start(self) -> Session:
        if self._session is None:
            bound = bind(self._plan, self._bindings)
            try:
                self._output = _chosen_output(bound.plan, self._output)
                self._session = Session(bound, **self._options)
                if self.destination is not None:
                    wanted, where = self._output, self.destination
                    self._session.destination = lambda out, name: where(name) if out == wanted else None
            except BaseException:
                bound.close()
                raise
            self._length = len(self._session.output_layout(self._output))
        return self._session

    def __len__(self) -> int:
        if self._length is None:
            if self._closed:
                return 0  # closed (by an error, or close()) before it was bound: it yields nothing
            self._guarded(self._start)
        return self._length

    def __iter__(self) -> "TensorStream":
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        if self._closed:
            raise StopIteration
        try:
            return self._guarded(self._next_pair)
        except StopIteration:
            self.close()
            raise

    def _next_pair(self) -> tuple[str, torch.Tensor]:
        if self._pairs is None:
            session = self._start()
            session.reduce()
            self._pairs = ((name, tensor) for _, name, tensor, _ in session.results([self._output]))
        return next(self._pairs)

    def _guarded(self, step):
        """``step()``; any error closes the stream, a TvlangError placed in the recipe."""
        try:
            return step()
        except StopIteration:
            raise
        except TvlangError as exc:
            self.close()
            raise exc.with_context(source=self._plan.text, filename=self._plan.filename) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the inputs; the stream yields nothing more."""
        self._closed = True
        self._pairs = None
        if self._session is not None:
            self._session.bound.close()
            self._session = None

    def __enter__(self) -> "TensorStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_session", None) is not None:
            self.close()


def _chosen_output(plan: Plan, output: str | None) -> str:
    """The output a stream yields: ``output``, or the recipe's only one."""
    if output is None:
        if len(plan.outputs) != 1:
            raise TvlangError(f"this recipe has outputs {', '.join(plan.outputs)}: say which one with output=")
        return plan.outputs[0]
    if output not in plan.outputs:
        raise TvlangError(f"no output named '{output}'; the outputs are {', '.join(plan.outputs)}")
    return output


def run(plan: Plan, bindings: Mapping[str, Any], out: Any, *, device: Any = "cpu", dtype: Any = "float32",
        out_dtype: Any = None, shard_size: int | None = None, force: bool = False, missing: str = "error",
        progress: Any = False, allow_nonfinite: bool = False, executor: str = "local", address: str | None = None,
        workers: int | None = None, lock: str | os.PathLike | None = None, model_card: bool = True,
        task_timeout: float | None = None, config: Any = None) -> RunSummary:
    """Compute every output in one pass over the inputs and write them.

    ``lock`` is a lockfile (``tvlang lock``): the inputs are checked against it before
    anything is computed or written, and any difference is an error
    (:mod:`tvlang.run.lock`). A Model output written as a directory gets a model
    card, README.md (:mod:`tvlang.run.model_card`), unless ``model_card=False``.
    ``executor="ray"`` computes the output shards as tasks on a Ray cluster
    (``address``, or a local Ray instance of ``workers`` CPUs) and writes the same
    bytes; a task running past ``task_timeout`` seconds fails the run; see
    :mod:`tvlang.run.distributed`. ``config`` gives an in-memory base its config (a
    directory, a transformers config, or a model with ``.config``; a base module with
    ``.config`` uses its own) so that a Model output directory loads with
    ``from_pretrained`` (:mod:`tvlang.run.model_config`). An output whose expression is
    ``adapter(d, rank)`` is written as a PEFT adapter directory, in a pass of its own after
    the others (:mod:`tvlang.run.extract`), and committed with them.
    """
    if executor not in EXECUTORS:
        raise TvlangError(f"unknown executor '{executor}'; the executors are {', '.join(EXECUTORS)}")
    forms = adapter_forms(plan)
    if executor == "ray":
        if forms:
            raise TvlangError(f"output '{next(iter(forms))}' is an adapter, which the local executor writes"
                              " (executor='local', the default)")
        if config is not None:
            raise TvlangError("config= is an option of the local executor (executor='local')")
        refuse_state_dict_outputs(out)
        return distributed.run(plan, bindings, out, device=device, dtype=dtype, out_dtype=out_dtype,
                               shard_size=shard_size, force=force, missing=missing, progress=progress,
                               allow_nonfinite=allow_nonfinite, address=address, workers=workers, lock=lock,
                               model_card=model_card, task_timeout=task_timeout)
    if address is not None or workers is not None or task_timeout is not None:
        raise TvlangError("address=, workers= and task_timeout= are options of executor='ray'")
    started = time.perf_counter()
    bound = bind(plan, bindings)
    writers: dict[str, StreamingWriter] = {}
    adapters: dict[str, tuple[Extraction, AtomicReplace]] = {}
    bar = folder = None
    try:
        plan = bound.plan
        folder = attach_config(bound, bindings, config)
        targets = output_targets(plan, out)
        check_adapter_paths(targets, forms, force=force)
        # Inputs that are not the locked ones are refused before their tensors are looked at.
        locked = verified(bound, bindings, os.fspath(lock), report=progress is True) if lock is not None else None
        session = Session(bound, device=device, dtype=dtype, out_dtype=out_dtype, missing=missing,
                          allow_nonfinite=allow_nonfinite)
        check_distinct_outputs(targets)
        inputs = [*protected_paths(plan, bindings), *bound.readers.values()]
        for name, path in targets.items():
            if name in forms:
                continue
            kind = plan.output_kind(name)
            metadata = output_metadata(plan, bound, name, kind, locked)
            copy_from = model_files_of(bound, kind, path)
            files = output_files(plan, bound, name, kind, path, metadata, copy_from, locked, model_card)
            writers[name] = open_writer(path, session.output_layout(name), shard_size=shard_size,
                                        metadata=metadata, inputs=inputs, force=force, copy_from=copy_from,
                                        files=files)
        bar = progress_for(progress)
        written = 0
        if writers:
            session.reduce(bar)
            written = write_results(session, writers, bar)
        for name, options in forms.items():  # each adapter in a pass of its own (tvlang.run.extract)
            adapters[name] = prepare_adapter(plan, bindings, targets[name], output=name, force=force, dtype=dtype,
                                             missing=missing, **options)
            written += sum(info.nbytes for info in adapters[name][0].layout)
        commit_all([*writers.values(), *(replace for _, replace in adapters.values())])
        layouts = {name: writer.layout for name, writer in writers.items()}
        layouts.update({name: extraction.layout for name, (extraction, _) in adapters.items()})
        count = sum(len(layout) for layout in layouts.values())
        reports = output_reports(plan, targets, layouts)
        # The passes over the inputs: the plan's (its reductions and main pass) for the written outputs,
        # and again for each adapter (prepare_adapter runs its own session).
        passes = plan.schedule.passes * (bool(writers) + len(adapters))
        return RunSummary({k: str(v) for k, v in targets.items()}, count, written,
                          time.perf_counter() - started, passes, notes(bound, session.layout, missing),
                          reports, input_reports(bound, session.layout, missing), missing)
    except BaseException as exc:
        for writer in writers.values():
            writer.abort()  # a published or committed writer is left as it is
        for _, replace in adapters.values():
            replace.abort()
        if isinstance(exc, TvlangError):
            raise exc.with_context(source=plan.text, filename=plan.filename) from None
        raise
    finally:
        if bar is not None:
            bar.close()  # the bar's line is cleared on success, error and Ctrl-C alike
        bound.close()
        if folder is not None:
            folder.close()


def apply_to(plan: Plan, module: Any, bindings: Mapping[str, Any], *, output: str | None = None,
             **options: Any) -> int:
    """Compute one output and write it into ``module``'s parameters and buffers, in place.

    For sweeps that evaluate in memory (as the task_vectors code's ``apply_to`` does):
    each result tensor is copied into the module's tensor of the same name (names
    aligned as inputs are: ``module.``, ``model.`` and other prefixes), cast to its
    dtype and moved to its device (a result computed on the module's device stays there: no
    trip to the host and back); nothing else of the module changes. Returns the
    number of tensors written. A result the module has no tensor for is an error;
    tensors of the module the output lacks are left as they are.
    """
    targets = module.state_dict()
    shape = validate(plan, bindings, missing=options.get("missing", "error"))
    mapping, _ = align([*shape.names, *shape.passthrough, *shape.copied], list(targets))
    count = 0
    pairs = TensorStream(plan, bindings, output=output, to_host=False, **options)
    pairs.destination = lambda name: targets.get(mapping.get(name, ""))
    with torch.no_grad():
        for name, tensor in pairs:
            key = mapping.get(name)
            if key is None:
                raise TvlangError(f"the module has no tensor for '{name}' (its names look like"
                                  f" '{next(iter(targets), '(none)')}')", tensor=name)
            target = targets[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise TvlangError(f"tensor '{name}' is {list(tensor.shape)} but the module's '{key}' is"
                                  f" {list(target.shape)}", tensor=name)
            if tensor.data_ptr() != target.data_ptr():  # else computed in place (chunked.destination)
                target.copy_(tensor)
            count += 1
    return count
