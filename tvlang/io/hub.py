"""Hugging Face Hub references: ``hf:org/name[@revision][/path]``, read through ``huggingface_hub``.

A reference names a model repository on the Hub, a revision (branch, tag or commit
sha; the default branch ``main`` when left out) and optionally a path inside the
repository: a subfolder (a model directory) or one file (a weights file or an index),
told apart by the last component's suffix as for a local path. A revision holding a
``/`` is written with ``%2F`` (``@refs%2Fpr%2F3``).

Everything about the cache is ``huggingface_hub``'s own: where it is (``HF_HOME``,
``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE``), tokens, the
``models--org--name/{blobs,refs,snapshots}`` layout. This module asks it three
things: the commit and file listing of a revision (``HfApi.model_info``; offline, the
cached snapshot folder from ``snapshot_download(local_files_only=True)``), and each
file it needs (``hf_hub_download`` at that commit). Only the weight files the
reference reads are fetched; the base model's config and tokenizer files are
fetched when an output copies them (:func:`fetch_model_files`).

>>> ref = parse_reference("hf:org/name@v1.0/text_encoder")
>>> ref.repo_id, ref.revision, ref.path, ref.is_file
('org/name', 'v1.0', 'text_encoder', False)
>>> parse_reference("hf:org/name@main/merged.safetensors").is_file
True
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

from tvlang.errors import TvlangError
from tvlang.io.base import TensorReader
from tvlang.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tvlang.io.open import choose_weights, open_reader
from tvlang.io.output_paths import COPIED_DIRS, COPIED_FILES
from tvlang.io.sharded import read_index

__all__ = ["PREFIX", "HubReference", "HubSource", "fetch_model_files", "is_reference", "open_hub",
           "parse_reference", "resolve"]

PREFIX = "hf:"
DEFAULT_REVISION = "main"  # huggingface_hub's default branch name
INSTALL = "pip install 'tvlang[hub]' (or pip install huggingface_hub)"

# A path whose last component ends so is one file; any other path is a folder.
FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_reference(value: object) -> bool:
    """True for a string that names a Hub repository (``hf:...``)."""
    return isinstance(value, str) and value.startswith(PREFIX)


@dataclass(frozen=True)
class HubReference:
    """``hf:REPO[@REVISION][/PATH]`` taken apart."""

    text: str  # as written
    repo_id: str
    revision: str | None  # None: the default branch
    path: str  # "" (the repository's top folder), a subfolder, or a file

    @property
    def is_file(self) -> bool:
        return self.path.endswith(FILE_SUFFIXES)

    @property
    def folder(self) -> str:
        """The folder of the repository that holds the model ("" for the top)."""
        return os.path.dirname(self.path) if self.is_file else self.path

    def at(self, commit: str) -> str:
        """The reference pinned to ``commit``: it names the same bytes for ever."""
        return f"{PREFIX}{self.repo_id}@{commit}" + (f"/{self.path}" if self.path else "")


def parse_reference(text: str) -> HubReference:
    """``hf:org/name[@revision][/path]`` -> :class:`HubReference`; an error names a malformed one.

    Without ``@``, the repository id is the first two components (``org/name``) and
    the rest is the path; a legacy id without an organisation (``hf:gpt2``) takes
    no path.
    """
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text
    revision: str | None = None
    if "@" in body:
        repo_id, _, rest = body.partition("@")
        revision, _, path = rest.partition("/")
        revision = unquote(revision)
        if not revision:
            raise _malformed(text, "nothing after '@' (a branch, tag or commit sha)")
    else:
        parts = body.split("/")
        repo_id, path = "/".join(parts[:2]), "/".join(parts[2:])
    path = path.strip("/")
    if not _REPO.match(repo_id):
        raise _malformed(text, f"'{repo_id}' is not a repository id (org/name)")
    if any(part in ("", ".", "..") for part in path.split("/")) and path:
        raise _malformed(text, f"'{path}' is not a path inside the repository")
    return HubReference(text, repo_id, revision, path)


def _malformed(text: str, why: str) -> TvlangError:
    return TvlangError(f"{text}: malformed Hub reference: {why}",
                       notes=("write hf:org/name, hf:org/name@REVISION, or hf:org/name@REVISION/PATH"
                              " (PATH a subfolder, or a file such as model.safetensors)",))


@dataclass(frozen=True)
class HubSource:
    """A reference resolved to a commit, with the files it reads in the local cache."""

    reference: HubReference
    commit: str
    snapshot: str  # the local snapshot folder of the commit (huggingface_hub's cache)
    weights: str  # repository path of the file a reader opens (weights or index)
    files: tuple[str, ...]  # repository paths of every file the reader reads (index, shards)
    listing: tuple[str, ...] | None  # the repository's files at the commit, when the Hub was asked
    local_only: bool  # resolved from the cache alone (offline, or the Hub out of reach)

    def local(self, path: str) -> str:
        """The cached copy of the repository file ``path``."""
        return os.path.join(self.snapshot, *path.split("/"))

    @property
    def revision(self) -> str:
        return self.reference.revision or DEFAULT_REVISION

    @property
    def pinned(self) -> str:
        return self.reference.at(self.commit)


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401  (submodules: the package loads them lazily)
        import huggingface_hub.errors  # noqa: F401
    except ImportError:
        raise TvlangError("reading hf: references needs huggingface_hub, which is not installed",
                          notes=(INSTALL,)) from None
    return huggingface_hub


def _offline(hub) -> bool:
    is_offline = getattr(hub.constants, "is_offline_mode", None)
    return bool(is_offline()) if is_offline is not None else bool(hub.constants.HF_HUB_OFFLINE)


class _Unreachable(Exception):
    """The Hub could not answer; ``reason`` says why (offline mode, no network, a token)."""

    def __init__(self, reason: str, token: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.token = token


def resolve(text: str, kind: str = "model") -> HubSource:
    """Resolve ``hf:...`` to a commit and fetch (or find in the cache) the weight files it reads.

    ``kind="adapter"``: the reference names a PEFT adapter folder (``lora("hf:...")``), and
    the files fetched are its ``adapter_config.json`` and factors.

    A commit sha whose files are cached needs no network. A branch or tag asks the
    Hub which commit it is now, unless offline (``HF_HUB_OFFLINE=1``) or the Hub is
    out of reach; then the cache's record of the branch is used, as huggingface_hub
    itself does.
    """
    hub = _hub()
    ref = parse_reference(text)
    revision = ref.revision or DEFAULT_REVISION
    unreachable: _Unreachable | None = _Unreachable("HF_HUB_OFFLINE is set") if _offline(hub) else None
    if unreachable is None and _COMMIT.match(revision):
        cached = _try_cache(hub, ref, revision, kind)
        if cached is not None:
            return cached
    if unreachable is None:
        try:
            commit, listing = _ask_hub(hub, ref, revision)
            return _fetch(hub, ref, commit, listing, local_only=False, kind=kind)
        except _Unreachable as exc:
            unreachable = exc
    snapshot = _cached_snapshot(hub, ref, revision, unreachable)
    return _fetch(hub, ref, os.path.basename(snapshot), None, local_only=True, snapshot=snapshot, why=unreachable,
                  kind=kind)


def _try_cache(hub, ref: HubReference, revision: str, kind: str = "model") -> HubSource | None:
    """The reference from the cache alone, or None when anything it needs is not there."""
    try:
        snapshot = hub.snapshot_download(ref.repo_id, revision=revision, allow_patterns=[], local_files_only=True)
        return _fetch(hub, ref, os.path.basename(snapshot), None, local_only=True, snapshot=snapshot, kind=kind)
    except (TvlangError, OSError):
        return None


def _ask_hub(hub, ref: HubReference, revision: str) -> tuple[str, tuple[str, ...]]:
    """(commit, files) of ``revision`` from the Hub; :class:`_Unreachable` when it cannot say."""
    errors = hub.errors
    try:
        info = hub.HfApi().model_info(ref.repo_id, revision=revision)
    except errors.RevisionNotFoundError:
        raise TvlangError(f"{ref.text}: the repository has no revision '{revision}' on the Hub") from None
    except errors.GatedRepoError:
        raise _Unreachable("the repository is gated: accept its terms on the Hub and log in"
                           " (hf auth login, or HF_TOKEN)", token=True) from None
    except errors.RepositoryNotFoundError:
        raise _Unreachable("the Hub says no such repository, or it is private and needs a token"
                           " (hf auth login, or HF_TOKEN)", token=True) from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise _Unreachable(f"the Hub refused access (HTTP {status}): it needs a token with access"
                               " (hf auth login, or HF_TOKEN)", token=True) from None
        raise _Unreachable(f"the Hub answered HTTP {status}") from None
    except Exception as exc:  # no network, a proxy, a timeout: what huggingface_hub falls back from too
        raise _Unreachable(f"the Hub could not be reached ({type(exc).__name__})") from None
    files = tuple(s.rfilename for s in info.siblings or ())
    return info.sha, files


def _cached_snapshot(hub, ref: HubReference, revision: str, why: _Unreachable) -> str:
    """The cached snapshot folder of ``revision``, or the error that says what is missing."""
    try:
        return hub.snapshot_download(ref.repo_id, revision=revision, allow_patterns=[], local_files_only=True)
    except OSError:  # LocalEntryNotFoundError: no snapshot of this revision in the cache
        pass
    if why.token:
        raise TvlangError(f"{ref.text}: {why.reason}; it is not in the local cache either") from None
    what = f"revision '{revision}' of {ref.repo_id}" if ref.revision else ref.repo_id
    raise TvlangError(f"{ref.text}: {what} is not in the local Hugging Face cache, and {why.reason}",
                      notes=(f"cache: {hub.constants.HF_HUB_CACHE}",
                             "download it with network access (unset HF_HUB_OFFLINE), or point HF_HUB_CACHE"
                             " at a cache that holds it")) from None


def _fetch(hub, ref: HubReference, commit: str, listing: tuple[str, ...] | None, *, local_only: bool,
           snapshot: str | None = None, why: _Unreachable | None = None, kind: str = "model") -> HubSource:
    """Choose the weight files of ``ref`` at ``commit`` and make sure each is in the cache.

    ``listing`` is the repository's files when the Hub was asked; from the cache alone
    (``local_only``) the cached ``snapshot`` folder is what there is.
    """

    def get(path: str) -> str:
        try:
            return hub.hf_hub_download(ref.repo_id, path, revision=commit, local_files_only=local_only)
        except OSError as exc:  # not cached (local_only), gone from the Hub, or a failed transfer
            if local_only:
                reason = f" ({why.reason})" if why is not None else ""
                raise TvlangError(f"{ref.text}: file {path} of commit {commit[:12]} is not in the local"
                                  f" Hugging Face cache{reason}") from None
            raise TvlangError(f"{ref.text}: file {path} of commit {commit[:12]} could not be downloaded"
                              f" ({type(exc).__name__}: {exc})") from None

    folder = ref.folder
    if kind == "adapter":
        return _fetch_adapter(ref, commit, listing, snapshot, local_only, get)
    if ref.is_file:
        weights = ref.path
        if listing is not None and weights not in listing:
            raise TvlangError(f"{ref.text}: the repository has no file {weights} at commit {commit[:12]}")
    else:
        names = _folder_names(folder, listing, snapshot)
        chosen = choose_weights(names)
        if chosen is None:
            where = f"folder '{folder}'" if folder else "the repository"
            seen = "the Hub lists" if listing is not None else "the local cache holds"
            raise TvlangError(f"{ref.text}: {where} holds no model weights at commit {commit[:12]}",
                              notes=("looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin,"
                                     f" or a single *.safetensors; {seen}: {', '.join(sorted(names)[:8]) or 'nothing'}",))
        weights = f"{folder}/{chosen}" if folder else chosen
    local = get(weights)
    snapshot = local[: len(local) - len(os.path.join(*weights.split("/")))].rstrip(os.sep)
    files = [weights]
    if weights.endswith(".json"):
        shards = dict.fromkeys(read_index(ref.text, local).values())
        prefix = f"{os.path.dirname(weights)}/" if os.path.dirname(weights) else ""
        for shard in shards:
            get(prefix + shard)
            files.append(prefix + shard)
    return HubSource(ref, commit, snapshot, weights, tuple(files), listing, local_only)


def _fetch_adapter(ref: HubReference, commit: str, listing: tuple[str, ...] | None, snapshot: str | None,
                   local_only: bool, get) -> HubSource:
    """The files of a PEFT adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors``
    (else ``adapter_model.bin``), fetched into the cache."""
    if ref.is_file:
        raise TvlangError(f"{ref.text}: lora() reads an adapter folder, not one file",
                          notes=("name the folder that holds adapter_config.json: hf:org/name[@REVISION][/FOLDER]",))
    folder = ref.path
    names = set(_folder_names(folder, listing, snapshot))
    weights = next((name for name in ADAPTER_WEIGHTS if name in names), None)
    if ADAPTER_CONFIG not in names or weights is None:
        where = f"folder '{folder}'" if folder else "the repository"
        seen = "the Hub lists" if listing is not None else "the local cache holds"
        raise TvlangError(f"{ref.text}: {where} holds no PEFT adapter at commit {commit[:12]}",
                          notes=(f"looked for {ADAPTER_CONFIG} and {' or '.join(ADAPTER_WEIGHTS)}; {seen}:"
                                 f" {', '.join(sorted(names)[:8]) or 'nothing'}",))
    prefix = f"{folder}/" if folder else ""
    files = (prefix + ADAPTER_CONFIG, prefix + weights)
    local = [get(path) for path in files]
    snapshot = local[0][: len(local[0]) - len(os.path.join(*files[0].split("/")))].rstrip(os.sep)
    return HubSource(ref, commit, snapshot, files[1], files, listing, local_only)


def _folder_names(folder: str, listing: tuple[str, ...] | None, snapshot: str | None) -> list[str]:
    """The file names directly in ``folder`` of the repository: from the listing, or the cached snapshot."""
    if listing is not None:
        prefix = f"{folder}/" if folder else ""
        return [p[len(prefix):] for p in listing if p.startswith(prefix) and "/" not in p[len(prefix):]]
    directory = os.path.join(snapshot or "", *folder.split("/")) if folder else snapshot or ""
    try:
        return [e for e in os.listdir(directory) if os.path.isfile(os.path.join(directory, e))]
    except OSError:
        return []


def fetch_model_files(source: HubSource) -> str:
    """Fetch the config and tokenizer files of ``source``'s folder (those an output copies); its local folder.

    Only files the repository has are fetched (from the Hub's listing); resolved
    from the cache alone, the folder holds what the cache has.
    """
    hub = _hub()
    folder = source.reference.folder
    prefix = f"{folder}/" if folder else ""
    if source.listing is not None:
        wanted = [prefix + name for name in COPIED_FILES]
        wanted += [p for p in source.listing for d in COPIED_DIRS if p.startswith(f"{prefix}{d}/")]
        for path in (p for p in wanted if p in source.listing):
            try:
                hub.hf_hub_download(source.reference.repo_id, path, revision=source.commit)
            except OSError as exc:
                raise TvlangError(f"{source.reference.text}: file {path} could not be downloaded"
                                  f" ({type(exc).__name__}: {exc})") from None
    return source.local(folder) if folder else source.snapshot


def open_hub(text: str) -> TensorReader:
    """A reader of ``hf:...``: its weights resolved (and fetched) through huggingface_hub.

    The reader's ``label`` is the reference as written; ``root`` is its folder in the
    cache (a folder reference); ``hub`` the :class:`HubSource`.
    """
    source = resolve(text)
    reader = open_reader(source.local(source.weights), label=text)
    if not source.reference.is_file:
        folder = source.reference.folder
        reader.root = source.local(folder) if folder else source.snapshot
    reader.hub = source
    return reader
