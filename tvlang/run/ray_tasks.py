"""What the Ray executor's tasks share: the job they are handed, the cluster, and running them.

:class:`Job` is what every task of a run needs (the recipe to compile again, the
bindings, the session options, the reduced scalars so far); :func:`cluster` connects
to Ray or starts a local instance; :func:`run_tasks` submits one task per item (at
most ``limit`` at a time), gathers their results in the items' order, and turns a
task's failure into a :class:`TvlangError` naming the item and the worker, or, past
``timeout`` seconds, cancels it and says so. A failure reported is always the
earliest item's that fails (the later tasks are cancelled, the earlier ones waited
for), not whichever task happened to fail first. :class:`LiveBytes` carries the bytes
that running tasks report (through a small Ray actor) to the driver's progress bar.
Used by the main pass (``tvlang.run.distributed``), the reduction passes
(``tvlang.run.distributed_reduce``) and the similarity matrix (``tvlang.bases.gram_ray``).
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

__all__ = ["CANCEL_WAIT", "INSTALL_HINT", "Job", "LiveBytes", "Recipe", "TaskFailed", "TaskProgress", "cluster",
           "import_ray", "require_gpus", "run_tasks", "slots", "task_options", "worker_name", "working_directory"]

CANCEL_WAIT = 10.0  # seconds a cancelled task has to stop before its worker is killed
INSTALL_HINT = "pip install 'tvlang[ray]'"
POLL_SECONDS = 0.25  # how often the driver asks for the running tasks' bytes (with a progress bar)
REPORT_SECONDS = 0.2  # how often a task reports its bytes (at most)


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
    counter: Any = None  # the ByteCounter actor the tasks report their bytes to (with a progress bar)
    pass_key: int = 0  # which pass the tasks belong to, in the counter


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


def require_gpus(ray) -> None:
    """A task asking for a GPU on a cluster without one would wait forever: refuse first."""
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise TvlangError("--device cuda on Ray runs each task on a GPU (num_gpus=1), but the Ray cluster has no GPU",
                          notes=("its tasks would wait for one forever; run with --device cpu (device='cpu'), or"
                                 " start the cluster's nodes with their GPUs (`ray start --num-gpus N`)",))


def task_options(max_retries: int, gpu: bool) -> dict[str, Any]:
    """Ray's options for every task: its retries, one CPU, and one GPU with ``--device cuda``."""
    return {"max_retries": max_retries, "num_cpus": 1, "num_gpus": 1 if gpu else 0}


# -- progress across workers ------------------------------------------------------------------


class ByteCounter:
    """A Ray actor (no CPU of its own): the bytes each running task has reported, by (pass, item)."""

    def __init__(self) -> None:
        self.reported: dict[tuple[int, int], int] = {}

    def report(self, pass_key: int, index: int, nbytes: int) -> None:
        self.reported[(pass_key, index)] = nbytes  # a retried task starts again from its own count

    def snapshot(self, pass_key: int) -> dict[int, int]:
        return {index: n for (key, index), n in self.reported.items() if key == pass_key}


class TaskProgress:
    """In a task: ``Session``'s progress, sent to the ByteCounter every ``REPORT_SECONDS`` at most."""

    def __init__(self, job: Job, index: int) -> None:
        self.job = job
        self.index = index
        self.nbytes = 0
        self.sent = 0.0

    def start(self, label: str, tensors: int, nbytes: int) -> None:
        pass

    def advance(self, name: str, nbytes: int) -> None:
        self.nbytes += nbytes
        now = time.monotonic()
        if now - self.sent >= REPORT_SECONDS:
            self.sent = now
            self.job.counter.report.remote(self.job.pass_key, self.index, self.nbytes)  # not waited for

    @classmethod
    def of(cls, job: Job, index: int) -> "TaskProgress | None":
        return cls(job, index) if job.counter is not None else None


class LiveBytes:
    """On the driver: one pass's bar, counting finished tasks and the bytes that every task has done so far.

    ``counter`` is the run's ByteCounter actor (None without a bar: nothing is polled);
    ``labels`` and ``nbytes`` are the pass's tasks'.
    """

    def __init__(self, ray, bar, counter, pass_key: int, labels: Sequence[str], nbytes: Sequence[int]) -> None:
        self.ray, self.bar, self.counter, self.pass_key = ray, bar, counter, pass_key
        self.labels, self.nbytes = labels, nbytes
        self.finished: set[int] = set()
        self.reported: dict[int, int] = {}

    def _show(self, name: str) -> None:
        running = sum(min(n, self.nbytes[i]) for i, n in self.reported.items() if i not in self.finished)
        self.bar.show(name, sum(self.nbytes[i] for i in self.finished) + running, len(self.finished))

    def poll(self) -> None:
        if self.bar is None or self.counter is None:
            return
        reported = self.ray.get(self.counter.snapshot.remote(self.pass_key))
        if reported != self.reported:
            self.reported = reported
            busiest = max(reported, key=lambda i: (i not in self.finished, reported[i]), default=None)
            self._show(self.labels[busiest] if busiest is not None else "")

    def done(self, index: int, result: Any = None) -> None:
        if self.bar is None:
            return
        self.finished.add(index)
        self._show(self.labels[index])

    @classmethod
    def counter_for(cls, ray, bar) -> Any:
        """The run's ByteCounter actor when there is a bar to draw, else None."""
        return ray.remote(num_cpus=0)(ByteCounter).remote() if bar is not None else None


# -- running tasks -------------------------------------------------------------------------


def run_tasks(ray, function: Callable[..., Any], args: Sequence[tuple], labels: Sequence[str], *,
              limit: int | None, max_retries: int, gpu: bool = False, timeout: float | None = None,
              done: Callable[[int, Any], None] | None = None, poll: Callable[[], None] | None = None) -> list[Any]:
    """Run ``function(*args[i])`` as Ray tasks (at most ``limit`` at a time); their results in ``args``' order.

    ``done(i, result)`` is called as each task finishes, ``poll()`` every
    ``POLL_SECONDS`` while tasks run. A failure (or Ctrl-C) cancels the tasks after it
    and raises, once the tasks before it have ended, the earliest item's failure: a
    task's ``TaskFailed`` as a ``TvlangError`` naming ``labels[i]`` and the worker; a
    task running past ``timeout`` seconds as one naming ``labels[i]`` and the timeout;
    a failure that outlived the retries as one naming ``labels[i]``. With ``gpu``, each
    task asks for one GPU, and a cluster without one is refused first.
    """
    if gpu:
        require_gpus(ray)
    remote = ray.remote(function).options(**task_options(max_retries, gpu))
    waiting = list(range(len(args)))
    running: dict[Any, tuple[int, float]] = {}  # ref -> (item, when submitted)
    results: list[Any] = [None] * len(args)
    failed: tuple[int, BaseException] | None = None  # the earliest item that failed so far, and its error
    # With a timeout, a task is submitted only when a slot is free, so that its clock starts when it does.
    limit = limit or (slots(ray, None) if timeout is not None else len(args))

    def fail(index: int, error: BaseException) -> None:
        """Keep the earliest failure; the tasks after it are not needed any more."""
        nonlocal failed
        if failed is None or index < failed[0]:
            failed = (index, error)
        later = [ref for ref, (item, _) in running.items() if item > failed[0]]
        for ref in later:
            del running[ref]
        if later:
            _cancel(ray, later)

    try:
        while running or (waiting and failed is None):
            # Items are submitted in order, so once one has failed, every earlier one is running or done.
            while failed is None and waiting and len(running) < limit:
                index = waiting.pop(0)
                running[remote.remote(*args[index])] = (index, time.monotonic())
            wait = POLL_SECONDS if poll is not None else None
            if timeout is not None:
                oldest = min(started for _, started in running.values())
                wait = min(wait if wait is not None else timeout, max(0.0, oldest + timeout - time.monotonic()))
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait)
            if poll is not None and failed is None:
                poll()
            if not ready:
                now = time.monotonic()
                late = min((index for index, started in running.values()
                            if timeout is not None and now - started >= timeout), default=None)
                if late is not None:
                    fail(late, TvlangError(f"{labels[late]} ran past the task timeout of {timeout:g} s and was"
                                           " cancelled",
                                           notes=("raise it with --task-timeout (task_timeout=), or give the run"
                                                  " more workers or smaller shards",)))
                    late_refs = [ref for ref, (item, _) in running.items() if item == late]
                    for ref in late_refs:
                        del running[ref]
                    _cancel(ray, late_refs)
                continue
            for ref in ready:
                if ref not in running:  # cancelled by a failure among the same ready refs
                    continue
                index, _ = running.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    fail(index, _task_failed(ray, labels[index], exc, max_retries))
                    continue
                if done is not None and failed is None:
                    done(index, results[index])
        if failed is not None:
            raise failed[1]
    finally:
        if running:  # Ctrl-C (or a bug): stop the others before their directories go
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
