"""The atomic-replace transaction (tvlang.io.atomic): a target is the old output or the
new one, never half of either, whatever fails between the steps."""

from __future__ import annotations

import os

import pytest

from tvlang.io import atomic
from tvlang.io.atomic import AtomicReplace, State, remove


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def write(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read(path) -> str:
    with open(path) as f:
        return f.read()


def new_directory(target: str, text: str = "new") -> AtomicReplace:
    replace = AtomicReplace(target, directory=True)
    write(os.path.join(replace.tmp, "a.txt"), text)
    return replace


def test_a_new_directory_appears_only_when_committed(tmp_path):
    target = str(tmp_path / "out")
    replace = new_directory(target)
    assert replace.state is State.OPEN
    assert listing(tmp_path) == [f".out.tvtmp-{os.getpid()}"]
    replace.prepare()
    assert replace.state is State.PREPARED and not os.path.exists(target)
    replace.publish()
    assert replace.state is State.PUBLISHED and read(os.path.join(target, "a.txt")) == "new"
    replace.finish()
    assert replace.state is State.COMMITTED
    assert listing(tmp_path) == ["out"]


def test_a_file_is_created_empty_at_once_and_replaces_a_file(tmp_path):
    target = str(tmp_path / "m.safetensors")
    write(target, "old")
    replace = AtomicReplace(target, directory=False)
    assert read(replace.tmp) == ""  # created now: an unwritable folder fails before any work
    write(replace.tmp, "new")
    replace.prepare()
    replace.publish()
    assert read(target) == "new"
    assert read(replace.aside) == "old"  # kept (a hard link) until finish(), for withdraw()
    replace.finish()
    assert listing(tmp_path) == ["m.safetensors"]


def test_replacing_a_directory_keeps_the_old_one_aside_until_finish(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    write(target / "a.txt", "old")
    replace = new_directory(str(target))
    replace.prepare()
    replace.publish()
    assert read(target / "a.txt") == "new"
    assert read(os.path.join(replace.aside, "a.txt")) == "old"
    replace.finish()
    assert listing(tmp_path) == ["out"]


def replacing_an_old_target(tmp_path, directory: bool):
    """``out`` holding "old" (a directory's a.txt, or the file), and a prepared replace writing "new"."""
    target = tmp_path / "out"
    if directory:
        target.mkdir()
        write(target / "a.txt", "old")
        replace = new_directory(str(target))
    else:
        write(target, "old")
        replace = AtomicReplace(str(target), directory=False)
        write(replace.tmp, "new")
    replace.prepare()
    return target, replace


@pytest.mark.parametrize("directory", [True, False])
def test_withdraw_puts_the_old_target_back(tmp_path, directory):
    target, replace = replacing_an_old_target(tmp_path, directory)
    replace.publish()
    replace.withdraw()
    assert replace.state is State.ABORTED
    assert read(target / "a.txt" if directory else target) == "old"
    assert listing(tmp_path) == ["out"]


def test_withdraw_of_a_new_target_removes_it(tmp_path):
    replace = new_directory(str(tmp_path / "out"))
    replace.prepare()
    replace.publish()
    replace.withdraw()
    assert listing(tmp_path) == []


def test_a_failure_between_the_renames_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    write(target / "a.txt", "old")
    replace = new_directory(str(target))
    replace.prepare()
    real = os.rename

    def failing(src, dst):
        if src == replace.tmp:  # the old target is aside by now
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="No space left"):
        replace.publish()
    monkeypatch.undo()
    assert replace.state is State.ABORTED
    assert read(target / "a.txt") == "old"
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("after", [1, 2], ids=["first-rename", "second-rename"])
@pytest.mark.parametrize("directory", [True, False], ids=["directory", "file"])
def test_a_signal_as_a_rename_of_publish_returns(tmp_path, monkeypatch, directory, after):
    """Ctrl-C landing just after one of publish()'s renames has returned, done: publish() raises,
    and the transaction says where things are. Published (the new output in place): withdraw()
    puts the old target back; aborted: the target is the old one. Either way nothing is left
    aside. (A file over a file takes one rename, os.replace: ``after`` 2 never fires there.)"""
    target, replace = replacing_an_old_target(tmp_path, directory)
    calls = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def done_then_interrupted(src, dst, _real=real):
            _real(src, dst)
            calls.append((src, dst))
            if len(calls) == after:
                raise KeyboardInterrupt

        monkeypatch.setattr(os, name, done_then_interrupted)
    if not directory and after == 2:
        replace.publish()  # one rename: nothing interrupts it
        monkeypatch.undo()
        assert replace.state is State.PUBLISHED and read(target) == "new"
        return
    with pytest.raises(KeyboardInterrupt):
        replace.publish()
    monkeypatch.undo()
    new_in_place = after == 2 or not directory  # the rename that fired put the new output in place
    assert replace.state is (State.PUBLISHED if new_in_place else State.ABORTED)
    assert read(target / "a.txt" if directory else target) == ("new" if new_in_place else "old")
    replace.withdraw()
    assert read(target / "a.txt" if directory else target) == "old"
    assert listing(tmp_path) == ["out"]
    assert replace not in atomic._UNFINISHED


def test_a_signal_as_the_old_file_is_linked_aside_leaves_nothing_aside(tmp_path, monkeypatch):
    """Ctrl-C landing just after publish() linked the old file aside, before the replace: the
    target is the old file, and neither the temporary nor the link stays."""
    target, replace = replacing_an_old_target(tmp_path, directory=False)
    real = os.link

    def linked_then_interrupted(src, dst):
        real(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", linked_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace.publish()
    monkeypatch.undo()
    assert replace.state is State.ABORTED
    assert read(target) == "old"
    assert listing(tmp_path) == ["out"]


def test_abort_removes_the_temporary_and_is_idempotent(tmp_path):
    replace = new_directory(str(tmp_path / "out"))
    replace.abort()
    replace.abort()
    assert replace.state is State.ABORTED
    assert listing(tmp_path) == []
    with pytest.raises(RuntimeError, match="cannot prepare an output that is aborted"):
        replace.prepare()


def test_prepare_syncs_every_file_and_directory(tmp_path, monkeypatch):
    replace = new_directory(str(tmp_path / "out"))
    os.mkdir(os.path.join(replace.tmp, "1_Pooling"))
    write(os.path.join(replace.tmp, "1_Pooling", "config.json"), "{}")
    synced = []
    real = os.fsync

    def recording(fd):
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), replace.tmp))
        real(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names descriptors through /proc/self/fd")
    monkeypatch.setattr(os, "fsync", recording)
    replace.prepare()
    assert sorted(synced) == [".", "1_Pooling", "1_Pooling/config.json", "a.txt"]


def test_a_folder_that_cannot_be_written_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "mkdir", refused)
    with pytest.raises(PermissionError):
        AtomicReplace(str(tmp_path / "out"), directory=True)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("directory", [True, False])
def test_ctrl_c_just_after_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch, directory):
    """The temporary exists but the constructor never returned: nobody else could delete it."""
    real_mkdir, real_open = os.mkdir, open

    def then_interrupted(made):
        def step(path, *args, **kwargs):
            result = made(path, *args, **kwargs)
            if directory:
                raise KeyboardInterrupt
            return Interrupting(result)
        return step

    class Interrupting:
        def __init__(self, f):
            self.f = f

        def close(self):
            self.f.close()
            raise KeyboardInterrupt

    if directory:
        monkeypatch.setattr(os, "mkdir", then_interrupted(real_mkdir))
    else:
        monkeypatch.setattr(atomic, "open", then_interrupted(real_open), raising=False)
    with pytest.raises(KeyboardInterrupt):
        AtomicReplace(str(tmp_path / "out"), directory=directory)
    assert listing(tmp_path) == []


def test_remove_never_raises(tmp_path, monkeypatch):
    remove(str(tmp_path / "missing"))
    write(tmp_path / "f", "x")

    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(os, "unlink", read_only)
    remove(str(tmp_path / "f"))  # cleaning up after a failure must not raise a second error
    monkeypatch.undo()
    assert listing(tmp_path) == ["f"]
    assert atomic.TEMPORARY_TAG in os.path.basename(AtomicReplace(str(tmp_path / "o"), directory=False).tmp)
