"""The Ray executor's reduction passes: map tasks over parts of the tensors, merged on the driver.

A reduction level's pass (norms, dots, cosines, the two passes of a ``scope="model"``
threshold) is split into contiguous ranges of the tensor names (in the order a local
run streams them) of about equal bytes, one Ray task each. A task is handed copies of
the level's reducers as the driver holds them before the pass (what earlier passes
decided, nothing of this pass counted yet), streams its tensors through them, and
returns them; the driver merges them (the reducers' ``merge``) in range order and
ends the pass, exactly as if it had streamed every tensor itself.

The result is the local run's, bit for bit: ``norm``, ``dot`` and ``cos`` add their
sums exactly (``tvlang.ops.reduce.ExactSum``) and thresholds count histograms, so
neither the split nor the order of merging changes a value. A level with a reducer
that has no ``merge`` runs on the driver, as the local executor runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from tvlang.errors import TvlangError
from tvlang.run.bindings import bind
from tvlang.run.ray_tasks import (
    Job,
    LiveBytes,
    TaskFailed,
    TaskProgress,
    run_tasks,
    slots,
    worker_name,
    working_directory,
)
from tvlang.run.session import Session

__all__ = ["RayReductions", "partition", "reduce_part"]


def partition(names: list[str], nbytes: dict[str, int], parts: int) -> list[list[str]]:
    """``names`` cut into at most ``parts`` contiguous runs of about equal bytes (a run is never empty).

    >>> partition(list("abcde"), dict(a=4, b=4, c=4, d=4, e=16), 2)
    [['a', 'b', 'c', 'd'], ['e']]
    """
    total = sum(nbytes[name] for name in names)
    groups: list[list[str]] = []
    seen = 0
    for name in names:
        if not groups or (len(groups) < parts and seen >= total * len(groups) / parts):
            groups.append([])
        groups[-1].append(name)
        seen += nbytes[name]
    return groups


@dataclass(frozen=True)
class PartDone:
    """What a reduction task returns: the reducers it fed, who fed them, how long it took."""

    reducers: dict[str, Any]
    worker: str
    seconds: float


def reduce_part(job: Job, level: int, pass_index: int, reducers: dict[str, Any], names: list[str],
                index: int = 0) -> PartDone:
    """Run on a Ray worker: stream ``names`` through the reduction level's program into ``reducers``."""
    started = time.perf_counter()
    with working_directory(job.cwd):
        try:
            bound = bind(job.recipe.compile(), job.bindings)
        except TvlangError as exc:  # most often an input path this worker cannot read
            raise TaskFailed(exc, worker_name()) from None
        try:
            plan = bound.plan
            session = Session(bound, **job.options)
            session.reduced = {key: job.reduced[task.name] for key, task in plan.schedule.tasks.items()
                               if task.name in job.reduced}
            program = plan.schedule.levels[level][1]
            session.feed_pass(program, reducers, pass_index, names, TaskProgress.of(job, index))
        except TvlangError as exc:
            raise TaskFailed(exc.with_context(source=bound.plan.text, filename=bound.plan.filename),
                             worker_name()) from None
        finally:
            bound.close()
    return PartDone(reducers, worker_name(), time.perf_counter() - started)


class RayReductions:
    """``Session.reduce``'s ``map_pass`` on Ray: one task per range of tensors, at least one per task slot.

    ``job`` is the run's (its ``reduced`` filled level by level from ``session``);
    ``parts`` the least number of ranges (the main pass's task count).
    """

    def __init__(self, ray, job: Job, session: Session, *, parts: int, workers: int | None, max_retries: int,
                 gpu: bool, bar=None, timeout: float | None = None, task=reduce_part) -> None:
        self.ray = ray
        self.job = job
        self.session = session
        self.parts = max(parts, slots(ray, workers))
        self.workers = workers
        self.max_retries = max_retries
        self.gpu = gpu
        self.bar = bar
        self.timeout = timeout
        self.task = task
        self.tasks_run = 0  # reduction tasks run, for tests and the summary
        self.passes_run = 0  # passes run as tasks (each its own key in the job's ByteCounter)

    def __call__(self, level: int, pass_index: int, reducers: dict[str, Any], label: str) -> list[dict[str, Any]]:
        session = self.session
        plan = session.plan
        layout = session.layout
        reduced = {task.name: session.reduced[key] for key, task in plan.schedule.tasks.items()
                   if key in session.reduced}
        self.passes_run += 1
        job_ref = self.ray.put(replace(self.job, reduced=reduced, pass_key=self.passes_run))
        reducers_ref = self.ray.put(reducers)
        program = plan.schedule.levels[level][1]
        reads = len(program.reads)
        ranges = partition(layout.names, {n: layout.infos[n].nbytes for n in layout.names}, self.parts)
        nbytes = [reads * sum(layout.infos[n].nbytes for n in names) for names in ranges]
        labels = [f"{label.split(':')[0]} (reduction) over tensors {names[0]} .. {names[-1]}" for names in ranges]
        bar = self.bar
        if bar:
            bar.start(f"{label}: {len(ranges)} task{'s' if len(ranges) != 1 else ''} on Ray", len(ranges),
                      sum(nbytes))

        live = LiveBytes(self.ray, bar, self.job.counter, self.passes_run, labels, nbytes)
        results = run_tasks(self.ray, self.task, [(job_ref, level, pass_index, reducers_ref, names, index)
                                                  for index, names in enumerate(ranges)],
                            labels, limit=self.workers, max_retries=self.max_retries, gpu=self.gpu,
                            timeout=self.timeout, done=live.done,
                            poll=live.poll if self.job.counter is not None else None)
        self.tasks_run += len(ranges)
        return [result.reducers for result in results]
