"""The lockfile: which bytes a recipe's inputs were when it was locked, and the check that they still are.

``tvlang lock RECIPE`` writes ``RECIPE.lock``: for every input of the recipe (its
``load()`` paths and the names bound with ``--bind``), how it is named (a Hub
reference as written, with the commit it resolved to; a local path relative to the
recipe file) and the files a run reads from it (weights, index and shards; for the
base of a recipe with a model output, the config and tokenizer files an output
directory copies), each with its size and sha256. ``run --locked`` and
``check --locked`` compare the inputs as they resolve now with the lock and refuse
any difference, naming the file and what differs (docs/hub.md, "The lockfile").

The format is JSON with sorted keys, indented, one file per line-group, so a change
of inputs is a readable diff::

    {"format": 1, "inputs": {KEY: {"reference": "hf:org/name@main", "commit": SHA,
                                    "files": {PATH: {"sha256": HEX, "size": N}}}, ...}}

A key is the input's name in ``tvlang.inputs`` (a bound name, or an inline
``load("...")`` by its text); a local input has ``"path"`` instead of
``"reference"``/``"commit"``. A ``stack(...)`` of layer ranges has ``"stack"``: each
part's ``path`` or ``reference``/``commit``, in order; its ``files`` are every part's,
each named after its part (``PART/FILE``, PART as the part's entry names it). An input
the optimized plan does not read is listed with no files (its bytes do not reach the
output).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tvlang.errors import TvlangError
from tvlang.io import TensorReader
from tvlang.io.atomic import AtomicReplace
from tvlang.io.hashing import Hasher
from tvlang.io.hub import is_reference
from tvlang.io.model_files import model_file_names
from tvlang.plan.records import DeltaBinding
from tvlang.run.adapters import lora_path
from tvlang.run.bindings import Bound, bind
from tvlang.run.outputs import base_model_folder
from tvlang.run.provenance import recipe_dir, relative
from tvlang.run.stacked import StackedReader

__all__ = ["FORMAT", "LOCK_SUFFIX", "check_lockfile", "lock_inputs", "lock_path", "read_lock", "verified",
           "verify_lock", "write_lock", "write_lockfile"]

FORMAT = 1
LOCK_SUFFIX = ".lock"


def lock_path(recipe: str | os.PathLike) -> str:
    """The lockfile of a recipe file: ``RECIPE.lock`` beside it."""
    return os.fspath(recipe) + LOCK_SUFFIX


@dataclass
class _Input:
    """One input as it resolves now: how the lock names it, and its files (lock name -> local path)."""

    key: str
    entry: dict[str, Any]  # "reference" (+ "commit") or "path"
    files: dict[str, str]
    shown: Callable[[str], str]  # a file's lock name -> how a message names it


def _value(plan, key: str, bindings: Mapping[str, Any]) -> Any:
    """What the recipe or the bindings say input ``key`` is: a Hub reference, a path, or an object."""
    spec = plan.unoptimized.sources[key]
    if spec.path is not None:
        return spec.path
    value = bindings.get(key)
    if isinstance(value, DeltaBinding):
        value = value.value
    adapter = lora_path(value)
    return adapter if adapter is not None else value


def _current(bound: Bound, bindings: Mapping[str, Any]) -> dict[str, _Input]:
    """Every input of the plan as it resolves now (reading no weights: names, sizes come later)."""
    plan = bound.plan
    base_dir = recipe_dir(plan)
    model_output = any(plan.output_kind(name) == "model" for name in plan.outputs)
    found: dict[str, _Input] = {}
    for key in plan.unoptimized.sources:
        spec = plan.unoptimized.sources[key]
        value = _value(plan, key, bindings)
        reader = bound.readers.get(key)
        copies = key == bound.base and model_output  # an output directory copies its config files
        if spec.parts:
            found[key] = _stack_input(key, spec.parts, reader, bound, copies, base_dir)
        elif isinstance(reader, StackedReader):  # load(..., layers=[START, END]): that model's files
            found[key] = _one_input(key, value, reader.parts[0][0], bound, copies, base_dir)
        elif isinstance(value, (str, os.PathLike)):
            found[key] = _one_input(key, value, reader, bound, copies, base_dir)
        else:
            raise TvlangError(f"input '{key}' is bound to a {type(value).__name__}, which a lockfile cannot pin:"
                              " bind it to a file, a directory or an hf: reference")
    return found


def _one_input(key: str, value: str | os.PathLike, reader: TensorReader | None, bound: Bound, copies: bool,
               base_dir: str | None) -> _Input:
    if is_reference(value):
        return _hub_input(key, os.fspath(value), reader, bound, copies)
    return _local_input(key, os.fspath(value), reader, bound, copies, base_dir)


def _stack_input(key: str, parts: tuple, reader: TensorReader | None, bound: Bound, copies: bool,
                 base_dir: str | None) -> _Input:
    """A ``stack(...)``: each part as an input of its own, their files together, named after their part
    (the base's config files, for a model output, from the first part, as the output takes them)."""
    entries: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    names: dict[str, str] = {}
    for number, part in enumerate(parts):
        part_reader = reader.parts[number][0] if isinstance(reader, StackedReader) else None
        one = _one_input(key, part.path, part_reader, bound, copies and number == 0, base_dir)
        entries.append(one.entry)
        prefix = one.entry.get("reference") or one.entry["path"]
        for name, local in one.files.items():
            files[f"{prefix}/{name}"] = local
            names[f"{prefix}/{name}"] = one.shown(name)
    return _Input(key, {"stack": entries}, files, lambda name: names.get(name, name))


def _hub_input(key: str, text: str, reader: TensorReader | None, bound: Bound, copies: bool) -> _Input:
    entry: dict[str, Any] = {"reference": text}
    files: dict[str, str] = {}
    shown = str
    source = reader.hub if reader is not None else None
    if source is not None:
        entry["commit"] = source.commit
        files = {path: source.local(path) for path in source.files}
        if copies:
            folder = base_model_folder(bound)
            prefix = f"{source.reference.folder}/" if source.reference.folder else ""
            files.update({prefix + name: os.path.join(folder, name) for name in model_file_names(folder)})
        repo, commit = source.reference.repo_id, source.commit

        def shown(path: str) -> str:
            return f"hf:{repo}@{commit}/{path}"
    return _Input(key, entry, files, shown)


def _local_input(key: str, path: str, reader: TensorReader | None, bound: Bound, copies: bool,
                 base_dir: str | None) -> _Input:
    entry = {"path": relative(path, base_dir) if base_dir is not None else os.path.abspath(path).replace(os.sep, "/")}
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    files: dict[str, str] = {}
    if reader is not None:
        names = _names_in(folder)
        for real in reader.paths:
            name = names.get(real) or os.path.relpath(real, os.path.realpath(folder)).replace(os.sep, "/")
            files[name] = real
        if copies:
            root = base_model_folder(bound)
            files.update({name: os.path.join(root, name) for name in model_file_names(root)})

    def shown(name: str) -> str:
        return os.path.normpath(os.path.join(folder, name))
    return _Input(key, entry, files, shown)


def _names_in(folder: str) -> dict[str, str]:
    """Resolved path -> name of each entry of ``folder`` (a model's files may be links into a cache)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return {}
    return {os.path.realpath(os.path.join(folder, e)): e for e in sorted(entries, reverse=True)}


def verified(bound: Bound, bindings: Mapping[str, Any], path: str, *, report: bool) -> dict[str, Any]:
    """:func:`verify_lock` for a run: hashing reported on stderr (and a summary line) when ``report``."""
    hasher = Hasher(_stderr if report else None)
    lock = verify_lock(bound, bindings, path, hasher)
    if report:
        _stderr(f"{path}: inputs match the lock; {hasher.summary()}")
    return lock


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def lock_inputs(bound: Bound, bindings: Mapping[str, Any], hasher: Hasher) -> dict[str, Any]:
    """The lock of a bound plan: every input, its resolved revision, and its files' sizes and sha256."""
    inputs = {}
    for key, current in _current(bound, bindings).items():
        files = {name: {"sha256": hasher.sha256(path, current.shown(name)), "size": os.path.getsize(path)}
                 for name, path in current.files.items()}
        inputs[key] = {**current.entry, "files": files}
    return {"format": FORMAT, "inputs": inputs}


def write_lock(path: str, lock: Mapping[str, Any]) -> None:
    """Write ``lock`` to ``path``: sorted, indented JSON, replaced in one step."""
    data = (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode()
    try:
        replace = AtomicReplace(os.path.abspath(path), directory=False)
        with open(replace.tmp, "wb") as f:
            f.write(data)
        replace.commit()
    except OSError as exc:
        raise TvlangError(f"cannot write the lockfile: {exc.strerror or exc}", filename=path) from None


def read_lock(path: str) -> dict[str, Any]:
    """A lockfile's contents, or an error that names the file and says what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            lock = json.load(f)
    except FileNotFoundError:
        raise TvlangError("no lockfile", filename=path, notes=("write one with `tvlang lock RECIPE`",)) from None
    except (OSError, ValueError) as exc:
        raise TvlangError(f"cannot read the lockfile: {exc}", filename=path) from None
    if not isinstance(lock, dict) or lock.get("format") != FORMAT or not isinstance(lock.get("inputs"), dict):
        raise TvlangError(f"not a tvlang lockfile of format {FORMAT}", filename=path)
    for key, entry in lock["inputs"].items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict) or not all(
                isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("size"), int)
                for f in files.values()):
            raise TvlangError(f"input '{key}' is malformed (each file needs sha256 and size)", filename=path)
        stack = entry.get("stack", [])
        if not isinstance(stack, list) or not all(isinstance(p, dict) for p in stack):
            raise TvlangError(f"input '{key}' is malformed (a stack is a list of parts)", filename=path)
    return lock


def verify_lock(bound: Bound, bindings: Mapping[str, Any], path: str, hasher: Hasher) -> dict[str, Any]:
    """Check the inputs as they resolve now against the lockfile at ``path``; the lock when they match.

    Every difference is reported, in one error: an input added or gone, another
    reference or path, a revision that now resolves to another commit, a file added
    or gone, a size (no hashing needed), a sha256. A file's hash comes from the Hub
    cache's blob name or the hash cache when they have it (see tvlang.io.hashing).
    """
    lock = read_lock(path)
    locked: dict[str, Any] = lock["inputs"]
    problems: list[str] = []
    current = _current(bound, bindings)
    for key in sorted(set(locked) - set(current)):
        problems.append(f"the lock has input '{key}', which the recipe no longer has")
    for key, now in current.items():
        if key not in locked:
            problems.append(f"input '{key}' ({_named(now.entry)}) is not in the lock")
            continue
        was = locked[key]
        differs = _compare_entry(key, now, was)
        # Another input altogether, or another commit: its files would only repeat that.
        problems += differs or _compare_files(key, now, was["files"], hasher)
    if problems:
        raise TvlangError("the inputs do not match the lock", filename=path,
                          notes=(*problems, "if the change is intended, run `tvlang lock` again"))
    return lock


def _named(entry: Mapping[str, Any]) -> str:
    if "stack" in entry:
        return "stack(" + ", ".join(_named(part) for part in entry["stack"]) + ")"
    return entry.get("reference") or entry.get("path") or "?"


def _compare_entry(key: str, now: _Input, was: Mapping[str, Any]) -> list[str]:
    if "stack" in now.entry and "stack" in was and len(now.entry["stack"]) == len(was["stack"]):
        return [problem for number, (part, locked) in enumerate(zip(now.entry["stack"], was["stack"]))
                for problem in _compare_one(f"input '{key}', part {number}", part, locked)]
    return _compare_one(f"input '{key}'", now.entry, was)


def _compare_one(who: str, now: Mapping[str, Any], was: Mapping[str, Any]) -> list[str]:
    if "stack" in now or "stack" in was:
        return [f"{who}: it is {_named(now)}, the lock says {_named(was)}"]
    if "reference" in now or "reference" in was:
        if now.get("reference") != was.get("reference"):
            return [f"{who}: it is {_named(now)}, the lock says {_named(was)}"]
        if "commit" in now and "commit" in was and now["commit"] != was["commit"]:
            return [f"{who}: {now['reference']} resolves to commit {now['commit']} now, the lock says"
                    f" commit {was['commit']} (the revision moved)"]
        return []
    if now.get("path") != was.get("path"):
        return [f"{who}: it is {_named(now)}, the lock says {_named(was)}"]
    return []


def _compare_files(key: str, now: _Input, was: Mapping[str, Any], hasher: Hasher) -> list[str]:
    problems = []
    for name in sorted(set(was) - set(now.files)):
        problems.append(f"input '{key}': the lock lists {name}, which a run no longer reads")
    for name, local in sorted(now.files.items()):
        shown = now.shown(name)
        if name not in was:
            problems.append(f"input '{key}': {shown} is read, but the lock does not list it")
            continue
        size = os.path.getsize(local)
        if size != was[name]["size"]:
            problems.append(f"{shown}: size is {size} bytes, the lock says {was[name]['size']}")
            continue
        digest = hasher.sha256(local, shown)
        if digest != was[name]["sha256"]:
            problems.append(f"{shown}: sha256 is {digest}, the lock says {was[name]['sha256']}")
    return problems



def write_lockfile(plan, bindings: Mapping[str, Any], path: str, *, report: bool = False) -> dict[str, Any]:
    """Bind ``plan``, hash what it reads, and write the lock to ``path`` (``tvlang lock``); the lock."""
    bound = bind(plan, bindings)
    try:
        hasher = Hasher(_stderr if report else None)
        lock = lock_inputs(bound, bindings, hasher)
    except TvlangError as exc:
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    finally:
        bound.close()
    write_lock(path, lock)
    if report:
        count = sum(len(entry["files"]) for entry in lock["inputs"].values())
        _stderr(f"wrote {path}: {len(lock['inputs'])} inputs, {count} files; {hasher.summary()}")
    return lock


def check_lockfile(plan, bindings: Mapping[str, Any], path: str, *, report: bool = False) -> dict[str, Any]:
    """Bind ``plan`` and check its inputs against the lock at ``path`` (``check --locked``); the lock."""
    bound = bind(plan, bindings)
    try:
        return verified(bound, bindings, path, report=report)
    except TvlangError as exc:
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    finally:
        bound.close()
