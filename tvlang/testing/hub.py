"""A Hugging Face Hub cache written offline, for tests and docs: no network, huggingface_hub's layout.

``write_repo`` lays out one commit of a model repository the way ``huggingface_hub``
does when it downloads (its cache-system guide)::

    CACHE/models--org--name/
        blobs/<etag>                      file contents, named by their etag: the sha256
                                          of an LFS file (weights), the git blob sha1 of
                                          any other file
        refs/<revision>                   the commit sha a branch or tag points to (no newline)
        snapshots/<commit>/<path>         relative symbolic links to ../../blobs/<etag>

so ``huggingface_hub.try_to_load_from_cache``, ``snapshot_download(local_files_only=True)``
and ``hf_hub_download`` read it as a cache they wrote (tests/test_hub.py checks that).

>>> import os, tempfile
>>> cache = tempfile.mkdtemp()
>>> commit = write_repo(cache, "org/tiny", {"config.json": b"{}"})
>>> os.readlink(os.path.join(cache, "models--org--tiny", "snapshots", commit, "config.json"))
'../../blobs/9e26dfeeb6e641a33dae4961196235bdb965b21b'
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping

__all__ = ["LFS_SUFFIXES", "copy_model", "etag_of", "remove_repo", "repo_folder", "write_repo"]

# Files the Hub stores with git LFS (its default .gitattributes covers these and more).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".h5", ".onnx")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def repo_folder(cache: str | os.PathLike, repo_id: str) -> str:
    """``CACHE/models--org--name``: where a model repository's cache lives."""
    return os.path.join(os.fspath(cache), "models--" + repo_id.replace("/", "--"))


def etag_of(path: str, data: bytes) -> str:
    """The blob name of a file: sha256 of an LFS file, the git blob sha1 of a regular one."""
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_repo(cache: str | os.PathLike, repo_id: str, files: Mapping[str, bytes | str | os.PathLike], *,
               revision: str | None = "main", commit: str | None = None) -> str:
    """Write one commit of ``repo_id`` into the cache; its commit sha.

    ``files`` maps repository paths (``model.safetensors``, ``sub/config.json``) to
    contents, or to a local file whose contents to take. ``commit`` defaults to a sha
    derived from the files; ``revision`` (a branch or tag; None for none) is pointed
    at it, replacing what it pointed to before, as a download of a moved branch does.
    """
    storage = repo_folder(cache, repo_id)
    contents = {}
    for path, value in files.items():
        if isinstance(value, bytes):
            contents[path] = value
        else:
            with open(value, "rb") as f:
                contents[path] = f.read()
    etags = {path: etag_of(path, data) for path, data in contents.items()}
    if commit is None:
        listing = "".join(f"{path}\0{etags[path]}\n" for path in sorted(etags))
        commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
    if not _COMMIT.match(commit):
        raise ValueError(f"a commit sha is 40 lowercase hex digits, not {commit!r}")
    for path, data in contents.items():
        blob = os.path.join(storage, "blobs", etags[path])
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        if not os.path.exists(blob):
            with open(blob, "wb") as f:
                f.write(data)
        link = os.path.join(storage, "snapshots", commit, *path.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.unlink(link)
        depth = path.count("/") + 2  # up from snapshots/<commit>/<path> to the repo folder
        os.symlink(os.path.join(*([".."] * depth), "blobs", etags[path]), link)
    if revision is not None and not _COMMIT.match(revision):
        ref = os.path.join(storage, "refs", *revision.split("/"))
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        with open(ref, "w") as f:
            f.write(commit)
    return commit


def copy_model(directory: str | os.PathLike, prefix: str = "") -> dict[str, str]:
    """``{repository path: local file}`` for every file of a local model directory (for ``write_repo``)."""
    directory = os.fspath(directory)
    found = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            local = os.path.join(root, name)
            rel = os.path.relpath(local, directory).replace(os.sep, "/")
            found[prefix + rel] = local
    return found


def remove_repo(cache: str | os.PathLike, repo_id: str) -> None:
    """Delete a repository's cache folder (a test's clean-up)."""
    shutil.rmtree(repo_folder(cache, repo_id), ignore_errors=True)
