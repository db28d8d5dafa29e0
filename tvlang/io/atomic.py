"""One output path replaced in one step, or left as it was: the atomic-replace transaction.

An output (a file or a directory) is written under a temporary name next to its
target, ``.NAME.tvtmp-<pid>``, synced, then renamed into place, so a crash, a full
disk or Ctrl-C never leaves half an output at the target. A file replaces a file in
one atomic rename. A directory cannot be swapped atomically: the old target goes
aside (``.NAME.tvtmp-old-<pid>``) while the new one is renamed in, and comes back
if that rename fails.

``commit()`` is three steps, so that several outputs of one run appear together or
not at all: ``prepare()`` each (sync: the slow part), ``publish()`` each (renames),
``finish()`` each (drop what was replaced); ``withdraw()`` undoes a ``publish()``,
``abort()`` drops the temporary.

A signal can land between the moment a transaction is made and the moment its caller
keeps it (``writers[name] = StreamingWriter(...)``): the caller's cleanup then never sees
it. So every transaction whose temporary exists is listed until it is published or
aborted, and :func:`abort_unfinished` drops what is left (the command line calls it when
a command is interrupted). A run of the Python API (``Plan.run``) drops only its own:
:func:`owned_by_this_run` lists the transactions made in its thread while it lasts, and aborts
those still unfinished when it ends by an exception, so another run of the same process (in
another thread) keeps its outputs. A signal can also land just after a rename has returned, done: so
``publish()``'s cleanup looks at where the temporary is, not at which call raised, and an
output renamed into place counts as published (for the caller's ``withdraw()``).

>>> import os, tempfile
>>> target = os.path.join(tempfile.mkdtemp(), "out")
>>> replace = AtomicReplace(target, directory=True)
>>> with open(os.path.join(replace.tmp, "a.txt"), "w") as f:
...     _ = f.write("new")
>>> replace.commit()
>>> os.listdir(target), replace.state
(['a.txt'], <State.COMMITTED: 'committed'>)
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from enum import Enum
from typing import Iterator

__all__ = ["TEMPORARY_TAG", "AtomicReplace", "State", "abort_unfinished", "fsync_dir", "owned_by_this_run", "remove",
           "sync_tree"]

# Every temporary name holds this; what --force may replace skips such entries.
TEMPORARY_TAG = ".tvtmp-"


# The transactions of this process whose temporary exists (open or prepared).
_UNFINISHED: set[AtomicReplace] = set()


# The transactions made in this thread (context) since the innermost owned_by_this_run began; None outside one.
_OWNED: ContextVar[set | None] = ContextVar("tvlang_owned_transactions", default=None)


@contextmanager
def owned_by_this_run() -> Iterator[None]:
    """While it lasts, list every transaction made in this thread; if the block raises (Ctrl-C
    included), abort those of them whose temporary still exists, then let the exception go on.

    The executors abort the writers they keep; a signal that lands between a transaction's
    creation and its caller keeping it (``writers[name] = StreamingWriter(...)``) leaves one they
    never saw, whose hidden temporary would stay. Unlike :func:`abort_unfinished`, this drops no
    transaction of another run of the process (another thread's)."""
    mine: set = set()
    token = _OWNED.set(mine)
    try:
        yield
    except BaseException:
        for replace in mine:
            replace.abort()  # a no-op for one published or done
        raise
    finally:
        _OWNED.reset(token)


def abort_unfinished() -> int:
    """Abort every transaction of this process whose temporary still exists; how many there were.

    For the end of an interrupted command, when nothing of this process is still writing:
    a transaction whose caller was interrupted before it could keep it is dropped here.
    """
    left = list(_UNFINISHED)
    for replace in left:
        replace.abort()
    return len(left)


class State(Enum):
    OPEN = "open"  # the temporary exists and is being written
    PREPARED = "prepared"  # the temporary is complete and synced
    PUBLISHED = "published"  # the temporary is the target; a replaced target waits aside
    COMMITTED = "committed"  # done; the replaced target is deleted
    ABORTED = "aborted"  # the temporary is deleted, or a publish was withdrawn


def remove(path: str) -> None:
    """Delete a file, link or directory tree if it is there; best effort, never raises.

    It cleans up after failures (a temporary, an old output), where a second error
    would only hide the first.
    """
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def fsync_dir(path: str) -> None:
    """Sync a directory's entries (names created, renamed or deleted in it); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str) -> None:
    """Put a file, or every file and directory under ``path``, on disk (``fsync``).

    Files synced before (a writer syncs each shard as it ends) cost a system call each.
    """
    if not os.path.isdir(path):
        _fsync_file(path)
        return
    for directory, _, files in os.walk(path, topdown=False):
        for name in files:
            full = os.path.join(directory, name)
            if not os.path.islink(full):
                _fsync_file(full)
        fsync_dir(directory)


class AtomicReplace:
    """The transaction that puts a new output at ``target`` (see the module's docstring).

    Creating it creates the temporary: an empty file, or an empty directory when
    ``directory`` is true; write the output at ``tmp``. An ``OSError`` from creating it
    means the target's directory is not writable (nothing is left behind). Whether
    an existing target may be replaced is the caller's decision, made before
    ``publish()``.
    """

    def __init__(self, target: str, *, directory: bool) -> None:
        self.target = target
        self.directory = directory
        parent, base = os.path.split(target)
        self.parent = parent or "."
        self.tmp = os.path.join(parent, f".{base}{TEMPORARY_TAG}{os.getpid()}")
        self.aside = os.path.join(parent, f".{base}{TEMPORARY_TAG}old-{os.getpid()}")
        self.state = State.ABORTED  # until the temporary exists
        self._replaced = False  # the old target is at ``aside``
        remove(self.tmp)  # a stale temporary of an earlier process with this pid
        try:
            if directory:
                os.mkdir(self.tmp)
            else:
                open(self.tmp, "wb").close()
        except BaseException:  # Ctrl-C after the temporary was made: the caller never gets this object
            remove(self.tmp)
            raise
        self.state = State.OPEN
        _UNFINISHED.add(self)
        owned = _OWNED.get()
        if owned is not None:
            owned.add(self)

    def _require(self, state: State, step: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"{self.target}: cannot {step} an output that is {self.state.value}")

    def commit(self) -> None:
        """``prepare()``, ``publish()`` and ``finish()``: the output is at the target, on disk."""
        self.prepare()
        self.publish()
        self.finish()

    def prepare(self) -> None:
        """Sync the temporary (each file and directory in it) to disk."""
        self._require(State.OPEN, "prepare")
        try:
            sync_tree(self.tmp)
        except BaseException:
            self.abort()
            raise
        self.state = State.PREPARED

    def publish(self) -> None:
        """Rename the temporary to the target; a target already there is kept aside.

        On any failure the target is as it was and the temporary is deleted.
        """
        self._require(State.PREPARED, "publish")
        try:
            if os.path.lexists(self.target):
                self._swap()
            else:
                os.rename(self.tmp, self.target)
        except BaseException:
            if not os.path.lexists(self.tmp):
                # Renamed into place before the exception: a signal landed as the rename returned. The
                # output is published (the caller's withdraw() puts back what was there), not aborted.
                self.state = State.PUBLISHED
                _UNFINISHED.discard(self)
                raise
            self.abort()
            raise
        self.state = State.PUBLISHED
        _UNFINISHED.discard(self)

    def _swap(self) -> None:
        # A signal can land as a rename returns, done: each handler below looks at what is where
        # (the temporary gone means the new output is at the target) rather than at which call raised.
        remove(self.aside)
        if not self.directory and os.path.isfile(self.target) and self._link_aside():
            try:
                os.replace(self.tmp, self.target)  # one atomic step for a file over a file
            except BaseException:
                if os.path.lexists(self.tmp):  # not replaced: the link aside is not needed
                    remove(self.aside)
                    self._replaced = False
                raise  # (replaced: the old target is at aside, for withdraw())
            return
        try:
            os.rename(self.target, self.aside)
        except BaseException:
            if os.path.lexists(self.aside) and not os.path.lexists(self.target):
                os.rename(self.aside, self.target)  # it was moved: back it goes
            raise
        self._replaced = True
        try:
            os.rename(self.tmp, self.target)
        except BaseException:
            if os.path.lexists(self.tmp):  # not renamed: the old target goes back
                os.rename(self.aside, self.target)
                self._replaced = False
            raise  # (renamed: the old target is at aside, for withdraw())

    def _link_aside(self) -> bool:
        """Keep the old target file under the aside name too (a hard link), for withdraw()."""
        try:
            os.link(self.target, self.aside)
        except OSError:
            return False
        self._replaced = True
        return True

    def withdraw(self) -> None:
        """Undo ``publish()``: the target goes back to what it was, the new output is deleted."""
        if self.state is not State.PUBLISHED:
            return
        self.state = State.ABORTED
        if self._replaced:
            if os.path.isdir(self.target) or not os.path.isfile(self.aside):
                remove(self.target)
            os.replace(self.aside, self.target)
        else:
            remove(self.target)
        fsync_dir(self.parent)

    def finish(self) -> None:
        """After ``publish()``: delete the replaced target, sync the directory entry
        (again after an interrupted ``finish()``: it is idempotent)."""
        if self.state is State.COMMITTED:
            return
        self._require(State.PUBLISHED, "finish")
        if self._replaced:
            remove(self.aside)
        fsync_dir(self.parent)
        self.state = State.COMMITTED

    def abort(self) -> None:
        """Delete the temporary (before ``publish()``); the target is left as it was."""
        if self.state in (State.OPEN, State.PREPARED):
            self.state = State.ABORTED
            remove(self.tmp)
            if os.path.lexists(self.target):  # the target is the old one: what is aside (a link to the
                remove(self.aside)  # old file a signal stopped publish() after) is not needed
                self._replaced = False
        _UNFINISHED.discard(self)
