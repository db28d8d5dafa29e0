"""The sha256 of checkpoint files: streamed, reported, and computed once per version of a file.

A file is hashed in 1 MiB blocks (never whole in memory). Its hash is remembered in
a small JSON cache keyed by the file's resolved path, size and modification time
(nanoseconds): a file that has not changed since it was hashed is not read again.
A file in the Hugging Face cache whose blob is named by its sha256 (the Hub stores
weights with git LFS, and ``huggingface_hub`` names an LFS file's blob by its sha256)
is not read at all: the name is the hash.

The cache lives in ``$TVLANG_CACHE_DIR``, else ``$XDG_CACHE_HOME/tvlang``, else
``~/.cache/tvlang``, as ``hashes.json``.

>>> import os, tempfile
>>> cache = tempfile.mkdtemp()
>>> path = os.path.join(tempfile.mkdtemp(), "w.bin")
>>> with open(path, "wb") as f:
...     _ = f.write(b"abc")
>>> hasher = Hasher(directory=cache)
>>> hasher.sha256(path)
'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
>>> again = Hasher(directory=cache)      # a later run: the hash comes from the cache
>>> again.sha256(path) == hasher.sha256(path), again.hashed
(True, 0)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator

from tvlang.io.atomic import remove

__all__ = ["BLOCK", "CACHE_FILE", "Hasher", "cache_dir", "lfs_sha256"]

BLOCK = 1 << 20  # bytes read at a time
CACHE_FILE = "hashes.json"
CACHE_LIMIT = 20_000  # entries kept; the least recently used go first
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def cache_dir() -> str:
    """Where tvlang keeps what it caches: ``TVLANG_CACHE_DIR``, ``XDG_CACHE_HOME/tvlang`` or ``~/.cache/tvlang``."""
    explicit = os.environ.get("TVLANG_CACHE_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache"), "tvlang")


def lfs_sha256(path: str) -> str | None:
    """The sha256 of a file in the Hugging Face cache, from its blob's name; None for any other file.

    ``huggingface_hub`` keeps a repository's files as ``models--org--name/blobs/<etag>``
    (linked from ``snapshots/<commit>/``); an LFS file's etag is its sha256 (64 hex
    digits), a regular file's is a git sha1 (40), which says nothing about sha256.
    """
    real = os.path.realpath(path)
    folder, name = os.path.split(real)
    repo = os.path.dirname(folder)
    if os.path.basename(folder) == "blobs" and os.path.basename(repo).startswith("models--") and _SHA256.match(name):
        return name
    return None


def _blocks(path: str) -> Iterator[bytes]:
    """The bytes of ``path``, a block at a time (module level: tests count what is read)."""
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                return
            yield block


class Hasher:
    """sha256 of files, from a blob name, the cache, or by reading them; ``report`` gets a line per file read.

    ``hashed`` and ``hashed_bytes`` count what this hasher read; ``save()`` writes
    the cache back (``sha256`` does after each file it reads).
    """

    def __init__(self, report: Callable[[str], None] | None = None, *, directory: str | None = None) -> None:
        self.report = report
        self.path = os.path.join(directory or cache_dir(), CACHE_FILE)
        self.entries: dict[str, list] = self._load()
        self.hashed = 0
        self.hashed_bytes = 0
        self.seconds = 0.0

    def _load(self) -> dict[str, list]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):  # none yet, or unreadable: start afresh (it is only a cache)
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("version") == 1 else None
        return {k: v for k, v in files.items() if _valid(v)} if isinstance(files, dict) else {}

    def sha256(self, path: str, label: str | None = None) -> str:
        """The sha256 of the file ``path`` (hex); ``label`` names it in the report."""
        blob = lfs_sha256(path)
        if blob is not None:
            return blob
        real = os.path.realpath(path)
        info = os.stat(real)
        entry = self.entries.get(real)
        if entry is not None and entry[0] == info.st_size and entry[1] == info.st_mtime_ns:
            entry[3] = time.time()
            return entry[2]
        started = time.perf_counter()
        digest = hashlib.sha256()
        for block in _blocks(real):
            digest.update(block)
        seconds = time.perf_counter() - started
        value = digest.hexdigest()
        self.hashed += 1
        self.hashed_bytes += info.st_size
        self.seconds += seconds
        if self.report is not None:
            self.report(f"sha256 {label or path}: {_size(info.st_size)} in {seconds:.2f} s"
                        f" ({_rate(info.st_size, seconds)})")
        self.entries[real] = [info.st_size, info.st_mtime_ns, value, time.time()]
        self.save()
        return value

    def summary(self) -> str:
        """One line: how much was read and how fast."""
        if not self.hashed:
            return "hashed no file (every hash from the cache or the Hub's blob names)"
        return (f"hashed {self.hashed} file{'s' if self.hashed != 1 else ''}, {_size(self.hashed_bytes)} in"
                f" {self.seconds:.2f} s ({_rate(self.hashed_bytes, self.seconds)})")

    def save(self) -> None:
        """Write the cache (merged with what another process wrote meanwhile), atomically; best effort."""
        merged = {**self._load(), **self.entries}
        if len(merged) > CACHE_LIMIT:
            merged = dict(sorted(merged.items(), key=lambda item: item[1][3])[-CACHE_LIMIT:])
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "files": merged}, f)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home: hashes are recomputed next time, nothing else changes
            remove(tmp)
        self.entries = merged


def _valid(entry: object) -> bool:
    return (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], int) and isinstance(entry[1], int)
            and isinstance(entry[2], str) and _SHA256.match(entry[2]) is not None
            and isinstance(entry[3], (int, float)))


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 2**20 / seconds:.0f} MiB/s" if seconds > 0 else "cached"
