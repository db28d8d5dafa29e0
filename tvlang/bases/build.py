"""Task vector bases: cluster N task vectors, merge each cluster into one basis.

``build_bases`` runs Algorithm 1 of Zhang et al.: the similarity matrix in one
streaming pass (``tvlang.bases.gram.similarity``), spectral clustering with k from
the eigengap (``tvlang.bases.clustering.cluster``), then one merge per cluster through the
public API (``tvlang.compile(recipe).run(bindings, out=...)``, the streaming
evaluator), each basis a Delta file ``basis_<i>.safetensors``, plus a
``manifest.json`` (format in docs/bases.md).

``recipe_for`` is the text each basis is computed from:

>>> a = TaskVectorInput("mnist", "/ckpt/mnist", "model", 0)
>>> b = TaskVectorInput("svhn", "/ckpt/svhn", "model", 0)
>>> print(recipe_for([a, b], "ties", 0.3).text, end="")
# tvlang bases: members mnist, svhn (merge: ties)
out = ties(mnist - pre, svhn - pre, density=0.3)
"""

from __future__ import annotations

import contextlib
import json
import keyword
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from tvlang.bases.clustering import cluster
from tvlang.bases.gram import DEFAULT_CHUNK_BYTES, format_matrix, similarity
from tvlang.errors import TvlangError
from tvlang.io import check_output_path, open_reader
from tvlang.io.atomic import AtomicReplace
from tvlang.run.adapters import lora_path, open_adapter
from tvlang.run.ray_tasks import cluster as ray_cluster
from tvlang.run.ray_tasks import import_ray
from tvlang.version import __version__

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "MERGE_METHODS",
    "TaskVectorInput",
    "BasisRecipe",
    "recipe_for",
    "inspect_inputs",
    "build_bases",
    "load_manifest",
    "against_bases",
    "Against",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tvlang.bases/1"
MERGE_METHODS = ("mean", "ties", "topk")
# The paper's Topk keeps the top 5% of entries by magnitude (Sec. 6.3).
TOPK_DEFAULT_DENSITY = 0.05
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RESERVED = {"pre", "out", "param", "true", "false"}


@dataclass(frozen=True)
class TaskVectorInput:
    """One task vector: a fine-tuned model (``kind="model"``) or a Delta file."""

    name: str
    path: str
    kind: str            # "model" | "delta"
    float_bytes: int     # bytes of floating-point tensor data (what storing it costs)


@dataclass(frozen=True)
class BasisRecipe:
    text: str
    bindings: dict
    sources: dict


def _identifiers(names: Sequence[str]) -> list[str]:
    """Recipe names for the members: the member's own name when it is a safe identifier."""
    from tvlang.language.checker import load_builtins

    builtins = load_builtins()
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        ident = name
        if (not _IDENT.match(name) or keyword.iskeyword(name) or name in _RESERVED
                or name in builtins or name in used):
            ident = f"t{i}"
            while ident in used or ident in names:
                ident = "_" + ident
        used.add(ident)
        out.append(ident)
    return out


def recipe_for(members: Sequence[TaskVectorInput], merge: str, density: float | None,
               base: str | None = None) -> BasisRecipe:
    """The recipe computing one basis from its members (a singleton is its own task vector)."""
    if merge not in MERGE_METHODS:
        raise TvlangError(f"unknown merge method '{merge}' (choose from {', '.join(MERGE_METHODS)})")
    idents = _identifiers([m.name for m in members])
    terms = [f"{ident} - pre" if m.kind == "model" else ident for ident, m in zip(idents, members)]
    if len(members) == 1:
        expr = terms[0]
    elif merge == "mean":
        expr = f"mean({', '.join(terms)})"
    elif merge == "ties":
        option = f", density={_num(density)}" if density is not None else ""
        expr = f"ties({', '.join(terms)}{option})"
    else:  # topk: prune each member to its top entries, then average
        d = _num(density if density is not None else TOPK_DEFAULT_DENSITY)
        expr = f"mean({', '.join(f'topk({t}, {d})' for t in terms)})"
    head = f"# tvlang bases: members {', '.join(m.name for m in members)} (merge: {merge})"
    text = f"{head}\nout = {expr}\n"
    bindings: dict = {ident: _delta_marker(m.path) if m.kind == "delta" else m.path
                      for ident, m in zip(idents, members)}
    sources = {ident: m.kind for ident, m in zip(idents, members)}
    if any(m.kind == "model" for m in members):
        if base is not None:
            bindings["pre"] = base
        sources["pre"] = "model"
    return BasisRecipe(text, bindings, sources)


def _delta_marker(path: str):
    """``tvlang.delta(path)``: binds a file as a task vector even without tvlang metadata."""
    import tvlang

    return tvlang.delta(path)


def _num(value: float) -> str:
    return repr(float(value)) if float(value) != int(value) else f"{int(value)}.0"


def _float_bytes(reader) -> int:
    return sum(reader.info(n).nbytes for n in reader.names() if reader.info(n).dtype.is_floating_point)


def inspect_inputs(pairs: Sequence[tuple[str, str]], base: str | None,
                   deltas: Sequence[str] = ()) -> list[TaskVectorInput]:
    """Open each input's header: its kind (model or delta) and storage size.

    An input is a Delta when its metadata says ``tvlang.kind = delta`` or its
    name is in ``deltas`` (the CLI's ``NAME=delta:PATH``)."""
    out = []
    for name, path in pairs:
        adapter = lora_path(path)
        if adapter is not None:  # a LoRA adapter is a task vector; it stores its factors only
            with open_adapter(adapter) as read:
                size = sum(read.file.info(n).nbytes for n in read.file.names())
            out.append(TaskVectorInput(name, os.fspath(path), "delta", size))
            continue
        reader = open_reader(path, label=os.fspath(path))
        try:
            kind = "delta" if reader.kind == "delta" or name in deltas else "model"
            if kind == "model" and base is None:
                raise TvlangError(
                    f"'{name}' ({path}) is a model, not a task vector, and no base was given",
                    notes=("pass the pretrained model with --base PRE (task vector = model - PRE)",),
                )
            out.append(TaskVectorInput(name, os.fspath(path), kind, _float_bytes(reader)))
        finally:
            reader.close()
    return out


def build_bases(
    base: str | None,
    pairs: Sequence[tuple[str, str]],
    out_dir: str,
    *,
    k: int | str = "auto",
    merge: str = "mean",
    density: float | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    force: bool = False,
    deltas: Sequence[str] = (),
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    random_state: int = 0,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    task_timeout: float | None = None,
) -> dict:
    """Cluster the task vectors ``pairs`` (name, path) and write one basis per cluster.

    Returns the manifest (also written to ``out_dir/manifest.json``). The
    directory is built under a temporary name and renamed into place; an
    existing ``out_dir`` is replaced only with ``force=True``, and never when
    it holds one of the inputs.

    ``executor="ray"`` computes the similarity matrix as Ray tasks and each basis
    with the Ray executor, on one cluster (``address``, or one local Ray instance of
    ``workers`` CPUs): the same manifest and the same basis files.
    """
    if merge not in MERGE_METHODS:
        raise TvlangError(f"unknown merge method '{merge}' (choose from {', '.join(MERGE_METHODS)})")
    if density is not None and not 0.0 < density <= 1.0:
        raise TvlangError(f"--density must be in (0, 1], not {density}")
    if density is not None and merge == "mean":
        raise TvlangError("--density applies to --merge ties or topk, not mean")
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir):
        force = True  # an empty directory holds nothing to lose
    inputs = [os.path.realpath(path) for _, path in list(pairs) + ([("base", base)] if base else [])]
    check_output_path(out_dir, force=force, inputs=inputs, owns=_is_bases_file, dirs=())
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TvlangError(f"output '{out_dir}' exists and is not a directory")
    say = log or (lambda _msg: None)
    distributed = executor_options(executor, address, workers, task_timeout)

    inputs = inspect_inputs(pairs, base, deltas)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        # The bases are written at a temporary next to out_dir, renamed into place when all
        # are; it is created before anything is computed, so an unwritable out_dir costs nothing.
        replace = AtomicReplace(os.path.abspath(out_dir), directory=True)
    except OSError as exc:
        raise TvlangError(f"{out_dir}: cannot create the output: {exc.strerror or exc}") from None
    tmp = replace.tmp
    try:
        with _cluster(distributed):
            manifest = _build(base, inputs, out_dir, tmp, k=k, merge=merge, density=density, include=include,
                              exclude=exclude, chunk_bytes=chunk_bytes, random_state=random_state, say=say,
                              progress=progress, distributed=distributed)
        try:
            with open(os.path.join(tmp, MANIFEST_NAME), "w") as fh:
                json.dump(manifest, fh, indent=2)
                fh.write("\n")
            replace.commit()  # synced, then renamed; an existing out_dir goes only once the new one is in
        except OSError as exc:
            reason = exc.strerror or exc
            raise TvlangError(f"{out_dir}: write failed: {reason}; nothing was written to the output") from None
    except BaseException:
        replace.abort()
        raise
    return manifest


def executor_options(executor: str, address: str | None, workers: int | None,
                     task_timeout: float | None) -> dict:
    """The keyword arguments that send ``similarity`` and ``Plan.run`` to ``executor``."""
    if executor == "local":
        if address is not None or workers is not None or task_timeout is not None:
            raise TvlangError("address=, workers= and task_timeout= are options of executor='ray'")
        return {}
    if executor != "ray":
        raise TvlangError(f"unknown executor '{executor}'; the executors are local, ray")
    return {"executor": "ray", "address": address, "workers": workers, "task_timeout": task_timeout}


@contextlib.contextmanager
def _cluster(distributed: dict) -> Iterator[None]:
    """One Ray instance (or connection) for the similarity pass and every basis's run."""
    if not distributed:
        yield
        return
    with ray_cluster(import_ray(), distributed["address"], distributed["workers"]):
        yield


def _build(base, inputs, out_dir, tmp, *, k, merge, density, include, exclude, chunk_bytes, random_state, say,
           progress, distributed) -> dict:
    """The similarity pass, the clusters and one basis file per cluster in ``tmp``; the manifest."""
    deltas = [t.name for t in inputs if t.kind == "delta"]
    sim = similarity([(t.name, t.path) for t in inputs], base=base, include=include, exclude=exclude,
                     deltas=deltas, chunk_bytes=chunk_bytes, progress=progress, **distributed)
    clustering = cluster(sim.cosine, k, random_state=random_state)
    say(f"{len(inputs)} task vectors -> {clustering.k} bases (k {'auto' if k == 'auto' else 'given'};"
        f" eigengap suggests {clustering.k_auto})")
    bases = []
    after = 0
    after_files = 0
    for index, members in enumerate(clustering.clusters):
        group = [inputs[i] for i in members]
        recipe = recipe_for(group, merge, density, base)
        filename = f"basis_{index}.safetensors"
        say(f"basis {index}: {', '.join(m.name for m in group)}")
        try:
            _run_recipe(recipe, os.path.join(tmp, filename), distributed)
        except TvlangError as exc:
            exc.notes = (*exc.notes, f"while writing basis {index} from {', '.join(m.name for m in group)}")
            raise
        reader = open_reader(os.path.join(tmp, filename), label=os.path.join(out_dir, filename))
        try:
            size = _float_bytes(reader)
        finally:
            reader.close()
        after += size
        after_files += os.path.getsize(os.path.join(tmp, filename))
        bases.append({
            "index": index,
            "file": filename,
            "members": [{"name": m.name, "path": os.path.abspath(m.path), "kind": m.kind} for m in group],
            "recipe": recipe.text,
            "float_bytes": size,
        })
    before = sum(t.float_bytes for t in inputs)
    manifest = {
        "format": MANIFEST_FORMAT,
        "tvlang_version": __version__,
        "base": os.path.abspath(base) if base else None,
        "inputs": [{"name": t.name, "path": os.path.abspath(t.path), "kind": t.kind,
                    "float_bytes": t.float_bytes} for t in inputs],
        "include": list(include),
        "exclude": list(exclude),
        "similarity": {"names": sim.names, "tensors": len(sim.tensors), "parameters": sim.elements,
                       "cosine": [[round(float(x), 6) for x in row] for row in sim.cosine],
                       "norms": [float(x) for x in sim.norms]},
        "affinity": "clip",
        "eigenvalues": clustering.eigenvalues,
        "k": clustering.k,
        "k_requested": k if k == "auto" else int(k),
        "k_eigengap": clustering.k_auto,
        "merge": {"method": merge,
                  "density": density if density is not None or merge != "topk" else TOPK_DEFAULT_DENSITY},
        "bases": bases,
        "storage": {
            "before_bytes": before,
            "after_bytes": after,
            "saved_bytes": before - after,
            "saved_percent": round(100.0 * (before - after) / before, 2) if before else 0.0,
            "after_file_bytes": after_files,
            "counts": "bytes of floating-point tensor data (headers and integer buffers excluded)",
        },
    }
    return manifest


def _run_recipe(recipe: BasisRecipe, out: str, distributed: dict) -> None:
    import tvlang

    tvlang.compile(recipe.text, sources=recipe.sources).run(recipe.bindings, out=out, **distributed)


def _is_bases_file(entry: str) -> bool:
    """A file name that ``build_bases`` writes into its output directory."""
    return entry == MANIFEST_NAME or re.fullmatch(r"basis_\d+\.safetensors", entry) is not None


# -- using stored bases ---------------------------------------------------------------

def load_manifest(path: str) -> tuple[dict, str]:
    """The manifest and its directory; ``path`` is the manifest or the bases directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise TvlangError(f"no bases manifest at '{path}' (run 'tvlang bases ... -o DIR' first)") from None
    except (OSError, ValueError) as exc:
        raise TvlangError(f"cannot read bases manifest '{path}': {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise TvlangError(f"'{path}' is not a tvlang bases manifest (format {MANIFEST_FORMAT})")
    return manifest, os.path.dirname(os.path.abspath(path))


@dataclass
class Against:
    """Cosine of each new task vector with each stored basis."""

    names: list[str]
    bases: list[str]                 # "basis_<i>"
    members: list[list[str]]         # member names per basis
    cosine: np.ndarray               # len(names) x len(bases)
    norms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "names": self.names,
            "bases": self.bases,
            "members": self.members,
            "cosine": [[float(x) for x in row] for row in self.cosine],
            "most_similar": [self.bases[int(np.argmax(row))] for row in self.cosine],
        }

    def format_table(self) -> str:
        return format_matrix(self.cosine, self.names, self.bases)

    def above(self, threshold: float) -> list[list[str]]:
        return [[b for b, c in zip(self.bases, row) if c >= threshold] for row in self.cosine]


def against_bases(manifest_path: str, pairs: Sequence[tuple[str, str]], base: str | None = None, *,
                  include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                  deltas: Sequence[str] = (), chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  progress: Callable[[str, int, int], None] | None = None, executor: str = "local",
                  address: str | None = None, workers: int | None = None,
                  task_timeout: float | None = None) -> Against:
    """Similarity of new task vectors (name, path) to every basis of a manifest, in one pass
    (``executor="ray"``: as Ray tasks, as ``similarity`` does)."""
    manifest, folder = load_manifest(manifest_path)
    base = base if base is not None else manifest.get("base")
    include = manifest.get("include", []) if include is None else include
    exclude = manifest.get("exclude", []) if exclude is None else exclude
    bases = manifest["bases"]
    labels = [f"basis_{b['index']}" for b in bases]
    clash = [name for name, _ in pairs if name in labels]
    if clash:
        raise TvlangError(f"name '{clash[0]}' is taken by a stored basis; call the new task vector something else")
    inputs = list(pairs) + [(label, os.path.join(folder, b["file"])) for label, b in zip(labels, bases)]
    sim = similarity(inputs, base=base, include=include, exclude=exclude, deltas=[*labels, *deltas],
                     chunk_bytes=chunk_bytes, progress=progress, executor=executor, address=address,
                     workers=workers, task_timeout=task_timeout)
    n = len(pairs)
    return Against(
        names=[name for name, _ in pairs],
        bases=labels,
        members=[[m["name"] for m in b["members"]] for b in bases],
        cosine=sim.cosine[:n, n:],
        norms=[float(x) for x in sim.norms[:n]],
    )
