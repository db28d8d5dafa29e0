"""The Ray executor: the same recipe computed as one task per output shard, the same bytes written.

``run(plan, bindings, out, executor="ray")`` goes through the steps of the local
run (``tvlang.run.driver``) up to the main pass, on the driver: bind the inputs,
plan every output's layout and shard boundaries (the same names, shapes, dtypes,
shard files and metadata), and check the output paths. The reduction passes
(whole-model scalars: norms, model-scope thresholds) run as map tasks over ranges
of tensors whose reducers the driver merges (``tvlang.run.distributed_reduce``).
Then the main pass is split
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

While tasks run, each reports the bytes it has written (at most five times a second)
to a small Ray actor that the driver polls, so a progress bar counts shards and bytes
across workers. With ``device="cuda"`` each task asks Ray for one GPU (``num_gpus=1``)
and computes on it; a cluster without a GPU is refused before any task is submitted
(the task would wait for one forever). Of several failing shards, the earliest is
reported (``tvlang.run.ray_tasks.run_tasks``).

The bytes are the local run's: a shard file written alone has the header and data
that the sharded writer gives it, and every per-tensor result depends only on the
tensor's name, its inputs and the reduced scalars (dare's randomness is keyed by
tensor name). Ray is an optional extra: ``pip install 'tvlang[ray]'``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from tvlang.errors import TvlangError
from tvlang.io import (
    StreamingWriter,
    TensorInfo,
    check_distinct_outputs,
)
from tvlang.plan.records import RunSummary
from tvlang.run.bindings import Bound, bind, protected_paths
from tvlang.run.distributed_reduce import RayReductions, reduce_part
from tvlang.run.layout import input_reports, notes
from tvlang.run.lock import verified
from tvlang.run.outputs import (
    commit_all,
    model_files_of,
    output_files,
    output_metadata,
    output_reports,
    output_targets,
    write_results,
)
from tvlang.run.progress import progress_for
from tvlang.run.ray_tasks import (
    Job,
    LiveBytes,
    Recipe,
    TaskFailed,
    TaskProgress,
    cluster,
    import_ray,
    run_tasks,
    worker_name,
    working_directory,
)
from tvlang.run.session import Session
from tvlang.run.sharded_output import ShardedOutput, plan_shards

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["MAX_RETRIES", "Job", "Recipe", "compute_shards", "plan_shards", "run"]

MAX_RETRIES = 2  # Ray re-runs a task whose worker died this many times before the run fails


# -- what a task is handed ---------------------------------------------------------------


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
    index: int = 0  # its place among the run's tasks (the order of the base's tensors)

    @property
    def label(self) -> str:
        outputs = ", ".join(f"'{f.output}'" for f in self.files)
        return f"shard {os.path.basename(self.files[0].path)} of output{'s' if len(self.files) > 1 else ''} {outputs}"

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for f in self.files for info in f.layout)


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
    with working_directory(job.cwd):
        try:
            bound = bind(job.recipe.compile(), job.bindings)
        except TvlangError as exc:  # most often an input path this worker cannot read
            raise TaskFailed(exc, worker_name()) from None
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
            nbytes = write_results(session, writers, TaskProgress.of(job, task.index))
            for writer in writers.values():
                writer.commit()
        except TvlangError as exc:
            raise TaskFailed(exc.with_context(source=bound.plan.text, filename=bound.plan.filename), worker_name()) \
                from None
        finally:
            for writer in writers.values():
                writer.abort()  # a committed writer is left as it is
            bound.close()
    sizes = {file.path: os.path.getsize(file.path) for file in task.files}
    return ShardDone(sizes, worker_name(), time.perf_counter() - started, nbytes)


# -- the driver ----------------------------------------------------------------------------


def run(plan: Plan, bindings: Mapping[str, Any], out: Any, *, device: Any = "cpu", dtype: Any = "float32",
        out_dtype: Any = None, shard_size: int | None = None, force: bool = False, missing: str = "error",
        progress: Any = False, allow_nonfinite: bool = False, address: str | None = None,
        workers: int | None = None, lock: str | os.PathLike | None = None, model_card: bool = True,
        task_timeout: float | None = None) -> RunSummary:
    """Compute every output as Ray tasks, one per output shard, and commit them (see the module docstring)."""
    ray = import_ray()
    if workers is not None and workers < 1:
        raise TvlangError(f"workers must be at least 1, got {workers}")
    if task_timeout is not None and not task_timeout > 0:
        raise TvlangError(f"task_timeout must be a positive number of seconds, got {task_timeout}")
    started = time.perf_counter()
    bound = bind(plan, bindings)
    outputs: list[ShardedOutput] = []
    bar = None
    try:
        plan = bound.plan
        targets = output_targets(plan, out)
        options = dict(device=device, dtype=dtype, out_dtype=out_dtype, missing=missing,
                       allow_nonfinite=allow_nonfinite)
        gpu = str(device).startswith("cuda")
        if gpu:
            # The tasks compute on the GPU Ray gives each (CUDA_VISIBLE_DEVICES: it is their cuda:0);
            # the driver plans, and streams here a reduction level that cannot be split, on its CPU.
            options["device"] = "cuda"
        locked = verified(bound, bindings, os.fspath(lock), report=progress is True) if lock is not None else None
        session = Session(bound, **{**options, "device": "cpu" if gpu else device})
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
        tasks = shard_tasks(outputs)
        with cluster(ray, address, workers):
            counter = LiveBytes.counter_for(ray, bar)  # the tasks' bytes, while they run
            try:
                job = Job(Recipe.of(plan), dict(bindings), options, {}, os.getcwd(), counter)
                # The reduction passes: map tasks over ranges of tensors, merged here in order (a level
                # with a reducer that cannot merge runs here, one read of the inputs per pass).
                reductions = RayReductions(ray, job, session, parts=len(tasks), workers=workers,
                                           max_retries=MAX_RETRIES, gpu=gpu, bar=bar, timeout=task_timeout,
                                           task=reduce_part)
                session.reduce(bar, map_pass=reductions)
                job = replace(job, reduced={plan.schedule.tasks[key].name: value
                                            for key, value in session.reduced.items()}, pass_key=0)
                labels = [task.label for task in tasks]
                nbytes = [task.nbytes for task in tasks]
                if bar:
                    label = "main pass" if not plan.schedule.levels else f"pass {plan.schedule.passes} (main)"
                    bar.start(f"{label}: {len(tasks)} shard task{'s' if len(tasks) != 1 else ''} on Ray",
                              len(tasks), sum(nbytes))
                live = LiveBytes(ray, bar, counter, 0, labels, nbytes)
                job_ref = ray.put(job)
                done = run_tasks(ray, compute_shards, [(job_ref, task) for task in tasks], labels, limit=workers,
                                 max_retries=MAX_RETRIES, gpu=gpu, timeout=task_timeout, done=live.done,
                                 poll=live.poll if counter is not None else None)
            finally:
                if counter is not None:
                    ray.kill(counter)
        for output in outputs:
            output.check()
        commit_all(outputs)
        count = sum(len(output.layout) for output in outputs)
        reports = output_reports(plan, targets, {output.name: output.layout for output in outputs})
        return RunSummary({k: str(v) for k, v in targets.items()}, count, sum(d.nbytes for d in done),
                          time.perf_counter() - started, plan.schedule.passes, notes(bound, session.layout, missing),
                          reports, input_reports(bound, session.layout, missing), missing)
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
    return [ShardTask(names, files, index) for index, (names, files) in enumerate(tasks.items())]
