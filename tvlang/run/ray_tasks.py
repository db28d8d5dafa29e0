"""What the Ray executor's tasks share: the job they are handed, the cluster, and running them.

:class:`Job` is what every task of a run needs (the recipe to compile again, the
bindings, the session options, the reduced scalars so far); :func:`cluster` connects
to Ray or starts a local instance; :func:`run_tasks` submits one task per item (at
most ``limit`` at a time), gathers their results in the items' order, and turns a
task's failure into a :class:`TvlangError` naming the item and the worker, or, past
``timeout`` seconds, cancels it and says so. Used by the main pass
(``tvlang.run.distributed``) and the reduction passes (``tvlang.run.distributed_reduce``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from tvlang.errors import TvlangError
from tvlang.plan.optimize import OptimizerFlags

if TYPE_CHECKING:
    from tvlang.language import ast
    from tvlang.plan.compiler import Plan

__all__ = ["CANCEL_WAIT", "INSTALL_HINT", "Job", "Recipe", "TaskFailed", "cluster", "import_ray", "run_tasks",
           "slots", "worker_name", "working_directory"]

CANCEL_WAIT = 10.0  # seconds a cancelled task has to stop before its worker is killed
INSTALL_HINT = "pip install 'tvlang[ray]'"


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
    """Everything the tasks of one run (or one reduction level) share (put in Ray's object store once)."""

    recipe: Recipe
    bindings: dict[str, Any]
    options: dict[str, Any]  # Session's: device, dtype, out_dtype, missing, allow_nonfinite
    reduced: dict[str, float]  # reduction task name ("r0", ...) -> its value, for those known so far
    cwd: str  # the driver's working directory: relative paths mean the same files on every worker


class TaskFailed(Exception):
    """A task's TvlangError and the worker it happened on, on its way back to the driver."""

    def __init__(self, error: TvlangError, worker: str) -> None:
        super().__init__(error, worker)
        self.error = error
        self.worker = worker


def worker_name() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


@contextlib.contextmanager
def working_directory(path: str) -> Iterator[None]:
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


# -- the cluster ---------------------------------------------------------------------------


def import_ray():
    try:
        import ray
    except ImportError:
        raise TvlangError("the Ray executor needs Ray, which is not installed", notes=(INSTALL_HINT,)) from None
    return ray


@contextlib.contextmanager
def cluster(ray, address: str | None, workers: int | None) -> Iterator[None]:
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


def slots(ray, workers: int | None) -> int:
    """How many tasks run at once: ``workers``, or the cluster's CPUs."""
    if workers is not None:
        return workers
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# -- running tasks -------------------------------------------------------------------------


def run_tasks(ray, function: Callable[..., Any], args: Sequence[tuple], labels: Sequence[str], *,
              limit: int | None, max_retries: int, gpu: bool = False, timeout: float | None = None,
              done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run ``function(*args[i])`` as Ray tasks (at most ``limit`` at a time); their results in ``args``' order.

    ``done(i, result)`` is called as each task finishes. The first failure (or Ctrl-C)
    cancels the other tasks and raises: a task's ``TaskFailed`` as a ``TvlangError``
    naming ``labels[i]`` and the worker; a task running past ``timeout`` seconds as one
    naming ``labels[i]`` and the timeout; a failure that outlived the retries as one
    naming ``labels[i]``.
    """
    remote = ray.remote(function).options(max_retries=max_retries, num_cpus=1, num_gpus=1 if gpu else 0)
    waiting = list(range(len(args)))
    running: dict[Any, tuple[int, float]] = {}  # ref -> (item, when submitted)
    results: list[Any] = [None] * len(args)
    # With a timeout, a task is submitted only when a slot is free, so that its clock starts when it does.
    limit = limit or (slots(ray, None) if timeout is not None else len(args))
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                index = waiting.pop(0)
                running[remote.remote(*args[index])] = (index, time.monotonic())
            wait = None
            if timeout is not None:
                oldest = min(started for _, started in running.values())
                wait = max(0.0, oldest + timeout - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait)
            if not ready:
                now = time.monotonic()
                late = min((index for index, started in running.values() if now - started >= timeout),
                           default=None)
                if late is not None:
                    raise TvlangError(f"{labels[late]} ran past the task timeout of {timeout:g} s and was cancelled",
                                      notes=("raise it with --task-timeout (task_timeout=), or give the run more"
                                             " workers or smaller shards",))
                continue
            for ref in ready:
                index, _ = running.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise _task_failed(ray, labels[index], exc, max_retries) from None
                if done is not None:
                    done(index, results[index])
    finally:
        if running:  # a failure or Ctrl-C: stop the others before their directories go
            _cancel(ray, list(running))
    return results


def _cancel(ray, refs: list) -> None:
    """Interrupt running tasks (they remove their own temporaries); kill those that do not stop."""
    for ref in refs:
        ray.cancel(ref)
    _, stuck = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT)
    for ref in stuck:
        ray.cancel(ref, force=True)
    if stuck:
        ray.wait(stuck, num_returns=len(stuck), timeout=CANCEL_WAIT)


def _task_failed(ray, label: str, exc: Exception, max_retries: int) -> BaseException:
    """The error to raise for a task that failed: the tvlang message, the item and the worker."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        if isinstance(exc.cause, TaskFailed):
            error, worker = exc.cause.error, exc.cause.worker
            return TvlangError(f"{label} failed on worker {worker}: {error.message}", error.span,
                               source=error.source, filename=error.filename, tensor=error.tensor, notes=error.notes)
        # Not the user's error: a bug in tvlang, which keeps its traceback (Ray's, from the worker).
        if hasattr(exc, "add_note"):  # Python 3.11
            exc.add_note(f"while computing {label}")
        return exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TvlangError(f"{label} failed: {first}",
                       notes=(f"tried {max_retries + 1} times; the Ray logs of the workers say more",))
