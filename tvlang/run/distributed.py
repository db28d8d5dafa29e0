"""The Ray executor: the same recipe computed as one task per output shard, the same bytes written.

``run(plan, bindings, out, executor="ray")`` goes through the steps of the local
run (``tvlang.run.driver``) up to the main pass, on the driver: bind the inputs,
plan every output's layout and shard boundaries (the same names, shapes, dtypes,
shard files and metadata), check the output paths, and run the reduction passes
(whole-model scalars: norms, model-scope thresholds). Then the main pass is split
by output shard: each Ray task recompiles the recipe, binds the same inputs (from
storage every worker sees), computes only its shard's tensors with the reduced
scalars it is handed, and writes the shard as one safetensors file, under a
temporary name renamed when complete, into the output's temporary directory.
Shards of several outputs that hold the same tensors are computed by one task, so
a recipe's outputs share one read of their inputs.

The driver then checks every shard (present, its header the planned one, its size
what the header says), writes the index and copies the base's config and tokenizer
files, and commits all outputs together by rename, as the local run does. A task
is retried by Ray when its worker dies (``MAX_RETRIES`` times); a failure that
outlives the retries, or a recipe or data error in a task, removes the temporary
directories and is reported as a ``TvlangError`` naming the shard and the worker.

The bytes are the local run's: a shard file written alone has the header and data
that the sharded writer gives it, and every per-tensor result depends only on the
tensor's name, its inputs and the reduced scalars (dare's randomness is keyed by
tensor name). Ray is an optional extra: ``pip install 'tvlang[ray]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from tvlang.errors import TvlangError
from tvlang.io import (
    StreamingWriter,
    TensorInfo,
    check_distinct_outputs,
)
from tvlang.plan.optimize import OptimizerFlags
from tvlang.plan.records import RunSummary
from tvlang.run.bindings import Bound, bind, protected_paths
from tvlang.run.layout import notes
from tvlang.run.lock import verified
from tvlang.run.outputs import (
    commit_all,
    model_files_of,
    output_files,
    output_metadata,
    output_targets,
    write_results,
)
from tvlang.run.progress import progress_for
from tvlang.run.session import Session
from tvlang.run.sharded_output import ShardedOutput, plan_shards

if TYPE_CHECKING:
    from tvlang.language import ast
    from tvlang.plan.compiler import Plan

__all__ = ["MAX_RETRIES", "compute_shards", "plan_shards", "run"]

MAX_RETRIES = 2  # Ray re-runs a task whose worker died this many times before the run fails
CANCEL_WAIT = 10.0  # seconds a cancelled task has to stop before its worker is killed
INSTALL_HINT = "pip install 'tvlang[ray]'"


# -- what a task is handed ---------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """What a worker needs to compile the driver's plan again (a Plan's schedule is keyed by object ids,
    which do not survive pickling)."""

    # The Plan class, carried rather than imported: tvlang.plan.compiler imports this layer to run a plan.
    plan_class: type
    text: str
    filename: str | None
    program: ast.Program
    sources: dict[str, str]  # free name -> "model" / "delta", as the bindings typed them
    params: dict[str, float]
    flags: OptimizerFlags

    @classmethod
    def of(cls, plan: Plan) -> "Recipe":
        return cls(type(plan), plan.text, plan.filename, plan.program, dict(plan.checked.sources),
                   dict(plan.params), plan.flags)

    def compile(self) -> Plan:
        return self.plan_class(self.text, self.filename, self.program, dict(self.sources), dict(self.params),
                               self.flags)


@dataclass(frozen=True)
class Job:
    """Everything the tasks of one run share (put in Ray's object store once)."""

    recipe: Recipe
    bindings: dict[str, Any]
    options: dict[str, Any]  # Session's: device, dtype, out_dtype, missing, allow_nonfinite
    reduced: dict[str, float]  # reduction task name ("r0", ...) -> its value
    cwd: str  # the driver's working directory: relative paths mean the same files on every worker


@dataclass(frozen=True)
class ShardFile:
    """One shard file that a task writes: the output it belongs to, where, and what it holds."""

    output: str
    path: str
    layout: list[TensorInfo]
    metadata: dict[str, str]


@dataclass(frozen=True)
class ShardTask:
    """One task: the tensor names it computes and the shard files (one per output) they go to."""

    names: tuple[str, ...]
    files: list[ShardFile]

    @property
    def label(self) -> str:
        outputs = ", ".join(f"'{f.output}'" for f in self.files)
        return f"shard {os.path.basename(self.files[0].path)} of output{'s' if len(self.files) > 1 else ''} {outputs}"

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for f in self.files for info in f.layout)


class TaskFailed(Exception):
    """A task's TvlangError and the worker it happened on, on its way back to the driver."""

    def __init__(self, error: TvlangError, worker: str) -> None:
        super().__init__(error, worker)
        self.error = error
        self.worker = worker


@dataclass(frozen=True)
class ShardDone:
    """What a task returns: the files it wrote and their sizes, who wrote them, how long it took."""

    sizes: dict[str, int]  # path -> bytes on disk
    worker: str
    seconds: float
    nbytes: int  # tensor bytes written


# -- the task ------------------------------------------------------------------------------


class ShardSession(Session):
    """A Session whose main pass computes only some tensors (one task's shard), in the base's order."""

    def __init__(self, bound: Bound, names: tuple[str, ...], **options: Any) -> None:
        super().__init__(bound, **options)
        self.only = frozenset(names)

    def _order(self) -> list[str]:
        return [name for name in super()._order() if name in self.only]


def compute_shards(job: Job, task: ShardTask) -> ShardDone:
    """Run on a Ray worker: compute ``task``'s tensors and write its shard files (renamed when complete)."""
    started = time.perf_counter()
    with _working_directory(job.cwd):
        try:
            bound = bind(job.recipe.compile(), job.bindings)
        except TvlangError as exc:  # most often an input path this worker cannot read
            raise TaskFailed(exc, _worker()) from None
        writers: dict[str, StreamingWriter] = {}
        try:
            plan = bound.plan
            session = ShardSession(bound, task.names, **job.options)
            session.reduced = {key: job.reduced[reduction.name] for key, reduction in plan.schedule.tasks.items()}
            for file in task.files:
                if not os.path.isdir(os.path.dirname(file.path)):
                    raise TvlangError(f"{os.path.dirname(file.path)}: the output's temporary directory is not there",
                                      notes=("every worker must see the output's directory (shared storage),"
                                             " and the run must not have been cancelled",))
                # A retried task replaces the file an earlier attempt may have renamed into place.
                writers[file.output] = StreamingWriter(file.path, file.layout, metadata=file.metadata, force=True)
            nbytes = write_results(session, writers)
            for writer in writers.values():
                writer.commit()
        except TvlangError as exc:
            raise TaskFailed(exc.with_context(source=bound.plan.text, filename=bound.plan.filename), _worker()) \
                from None
        finally:
            for writer in writers.values():
                writer.abort()  # a committed writer is left as it is
            bound.close()
    sizes = {file.path: os.path.getsize(file.path) for file in task.files}
    return ShardDone(sizes, _worker(), time.perf_counter() - started, nbytes)


def _worker() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


@contextlib.contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """Relative input paths mean what they mean to the driver, where the worker has that directory."""
    previous = os.getcwd()
    if not os.path.isdir(path) or path == previous:
        yield
        return
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


# -- the driver ----------------------------------------------------------------------------


def run(plan: Plan, bindings: Mapping[str, Any], out: Any, *, device: Any = "cpu", dtype: Any = "float32",
        out_dtype: Any = None, shard_size: int | None = None, force: bool = False, missing: str = "error",
        progress: Any = False, allow_nonfinite: bool = False, address: str | None = None,
        workers: int | None = None, lock: str | os.PathLike | None = None, model_card: bool = True) -> RunSummary:
    """Compute every output as Ray tasks, one per output shard, and commit them (see the module docstring)."""
    ray = _import_ray()
    if workers is not None and workers < 1:
        raise TvlangError(f"workers must be at least 1, got {workers}")
    started = time.perf_counter()
    bound = bind(plan, bindings)
    outputs: list[ShardedOutput] = []
    bar = None
    try:
        plan = bound.plan
        targets = output_targets(plan, out)
        options = dict(device=device, dtype=dtype, out_dtype=out_dtype, missing=missing,
                       allow_nonfinite=allow_nonfinite)
        locked = verified(bound, bindings, os.fspath(lock), report=progress is True) if lock is not None else None
        session = Session(bound, **options)
        check_distinct_outputs(targets)
        inputs = [*protected_paths(plan, bindings), *bound.readers.values()]
        for name, path in targets.items():
            kind = plan.output_kind(name)
            copy_from = model_files_of(bound, kind, path)
            metadata = output_metadata(plan, bound, name, kind, locked)
            files = output_files(plan, bound, name, kind, path, metadata, copy_from, locked, model_card)
            outputs.append(ShardedOutput(name, path, session.output_layout(name), shard_size=shard_size,
                                         metadata=metadata, inputs=inputs, force=force, copy_from=copy_from,
                                         files=files))
        bar = progress_for(progress)
        session.reduce(bar)  # on the driver: one read of the inputs per reduction pass
        reduced = {plan.schedule.tasks[key].name: value for key, value in session.reduced.items()}
        job = Job(Recipe.of(plan), dict(bindings), options, reduced, os.getcwd())
        tasks = shard_tasks(outputs)
        if bar:
            label = "main pass" if not plan.schedule.levels else f"pass {plan.schedule.passes} (main)"
            bar.start(f"{label}: {len(tasks)} shard task{'s' if len(tasks) != 1 else ''} on Ray", len(tasks),
                      sum(task.nbytes for task in tasks))
        with _cluster(ray, address, workers):
            done = _run_tasks(ray, job, tasks, workers, device, bar)
        for output in outputs:
            output.check()
        commit_all(outputs)
        count = sum(len(output.layout) for output in outputs)
        return RunSummary({k: str(v) for k, v in targets.items()}, count, sum(d.nbytes for d in done),
                          time.perf_counter() - started, plan.schedule.passes, notes(bound, session.layout, missing))
    except BaseException as exc:
        for output in outputs:
            output.abort()  # a published or committed output is left as it is
        if isinstance(exc, TvlangError):
            raise exc.with_context(source=plan.text, filename=plan.filename) from None
        raise
    finally:
        if bar is not None:
            bar.close()
        bound.close()


def shard_tasks(outputs: list[ShardedOutput]) -> list[ShardTask]:
    """One task per distinct list of tensor names: shards of several outputs that hold the same tensors share one."""
    tasks: dict[tuple[str, ...], list[ShardFile]] = {}
    for output in outputs:
        for shard in output.shards:
            names = tuple(info.name for info in shard.layout)
            tasks.setdefault(names, []).append(ShardFile(output.name, output.shard_path(shard), shard.layout,
                                                         output.shard_metadata(shard)))
    return [ShardTask(names, files) for names, files in tasks.items()]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise TvlangError("the Ray executor needs Ray, which is not installed", notes=(INSTALL_HINT,)) from None
    return ray


@contextlib.contextmanager
def _cluster(ray, address: str | None, workers: int | None) -> Iterator[None]:
    """Connect to the cluster at ``address``, or start a local Ray instance; a Ray already started is used as it is."""
    if ray.is_initialized():
        yield
        return
    try:
        if address is None:
            # One machine: loopback only, no dashboard, one CPU per worker.
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise TvlangError(f"cannot start or reach {where}: {exc}",
                          notes=("start one with `ray start --head` and pass its address (or auto)",)) from None
    try:
        yield
    finally:
        ray.shutdown()


def _run_tasks(ray, job: Job, tasks: list[ShardTask], workers: int | None, device: Any, bar) -> list[ShardDone]:
    """Submit the tasks (at most ``workers`` at a time), gather what they return, and fail on the first failure."""
    gpu = str(device).startswith("cuda")
    remote = ray.remote(compute_shards).options(max_retries=MAX_RETRIES, num_cpus=1, num_gpus=1 if gpu else 0)
    job_ref = ray.put(job)
    waiting = list(tasks)
    running: dict[Any, ShardTask] = {}
    done: list[ShardDone] = []
    limit = workers or len(tasks)
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                task = waiting.pop(0)
                running[remote.remote(job_ref, task)] = task
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                task = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise _task_failed(ray, task, exc) from None
                done.append(result)
                if bar:
                    bar.advance(task.label, task.nbytes)
    finally:
        if running:  # a failure or Ctrl-C: stop the others before their directories go
            _cancel(ray, list(running))
    return done


def _cancel(ray, refs: list) -> None:
    """Interrupt running tasks (they remove their own temporaries); kill those that do not stop."""
    for ref in refs:
        ray.cancel(ref)
    _, stuck = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT)
    for ref in stuck:
        ray.cancel(ref, force=True)
    if stuck:
        ray.wait(stuck, num_returns=len(stuck), timeout=CANCEL_WAIT)


def _task_failed(ray, task: ShardTask, exc: Exception) -> BaseException:
    """The error to raise for a task that failed: the tvlang message, the shard and the worker."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        if isinstance(exc.cause, TaskFailed):
            error, worker = exc.cause.error, exc.cause.worker
            return TvlangError(f"{task.label} failed on worker {worker}: {error.message}", error.span,
                               source=error.source, filename=error.filename, tensor=error.tensor, notes=error.notes)
        # Not the user's error: a bug in tvlang, which keeps its traceback (Ray's, from the worker).
        if hasattr(exc, "add_note"):  # Python 3.11
            exc.add_note(f"while computing {task.label}")
        return exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TvlangError(f"{task.label} failed: {first}",
                       notes=(f"tried {MAX_RETRIES + 1} times; the Ray logs of the workers say more",))
