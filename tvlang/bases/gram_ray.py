"""The Gram matrix on Ray: partial sums over ranges of tensors, one task each, added on the driver.

``similarity(..., executor="ray")`` (and ``tvlang similarity``/``tvlang bases``
with ``--executor ray``) plans the job on the driver (inputs opened and checked,
the tensors, the compute dtype, the chunk width), cuts the tensors into contiguous
ranges of about equal size (``tvlang.run.distributed_reduce.partition``, two per
task slot), and runs one task per range: it opens the inputs where it runs
(storage every worker sees), sums its tensors' Gram matrices exactly
(``tvlang.bases.gram_stream.partial_gram``) and returns them. The driver adds the
parts exactly, so the matrix is the local one whatever the split. Failures,
retries, the task timeout and Ctrl-C are the run's (``tvlang.run.ray_tasks``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tvlang.bases.gram_stream import GramInputs, GramPlan, open_inputs, partial_gram
from tvlang.errors import TvlangError
from tvlang.ops.sums import ExactMatrix
from tvlang.run.distributed import MAX_RETRIES
from tvlang.run.distributed_reduce import partition
from tvlang.run.ray_tasks import TaskFailed, cluster, import_ray, run_tasks, slots, worker_name, working_directory

__all__ = ["GramJob", "GramPart", "gram_part", "ray_gram"]

PARTS_PER_SLOT = 2  # ranges per task slot: a slow worker holds up the end less, and progress moves


@dataclass(frozen=True)
class GramJob:
    """What every task of one similarity job is handed (put in Ray's object store once)."""

    inputs: GramInputs
    plan: GramPlan
    cwd: str  # the driver's working directory: relative paths mean the same files on every worker


@dataclass(frozen=True)
class GramPart:
    """What a task returns: the exact sum of its tensors' Gram matrices, who computed it, how long it took."""

    sums: ExactMatrix
    worker: str
    seconds: float


def gram_part(job: GramJob, names: list[str]) -> GramPart:
    """Run on a Ray worker: the exact sum of the Gram matrices of the tensors ``names``."""
    started = time.perf_counter()
    with working_directory(job.cwd):
        try:
            opened = open_inputs(job.inputs)
        except TvlangError as exc:  # most often an input path this worker cannot read
            raise TaskFailed(exc, worker_name()) from None
        try:
            sums = partial_gram(opened, job.plan, names)
        except TvlangError as exc:
            raise TaskFailed(exc, worker_name()) from None
        finally:
            opened.close()
    return GramPart(sums, worker_name(), time.perf_counter() - started)


def ray_gram(inputs: GramInputs, plan: GramPlan, *, address: str | None = None, workers: int | None = None,
             task_timeout: float | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> np.ndarray:
    """The Gram matrix of ``plan``'s tensors, summed by Ray tasks over ranges of them (see the module)."""
    ray = import_ray()
    if workers is not None and workers < 1:
        raise TvlangError(f"workers must be at least 1, got {workers}")
    if task_timeout is not None and not task_timeout > 0:
        raise TvlangError(f"task_timeout must be a positive number of seconds, got {task_timeout}")
    names = [name for name, _ in plan.tensors]
    with cluster(ray, address, workers):
        ranges = partition(names, dict(plan.tensors), PARTS_PER_SLOT * slots(ray, workers))
        labels = [f"similarity over tensors {part[0]} .. {part[-1]}" for part in ranges]
        done_tensors = 0

        def done(index: int, result: GramPart) -> None:
            nonlocal done_tensors
            done_tensors += len(ranges[index])
            if progress is not None:
                progress(ranges[index][-1], done_tensors - 1, len(names))

        job_ref = ray.put(GramJob(inputs, plan, os.getcwd()))
        parts = run_tasks(ray, gram_part, [(job_ref, part) for part in ranges], labels, limit=workers,
                          max_retries=MAX_RETRIES, timeout=task_timeout, done=done)
    total = ExactMatrix(len(inputs.items))
    for part in parts:
        total.merge(part.sums)
    return total.value()
