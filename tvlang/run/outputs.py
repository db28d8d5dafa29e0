"""What every executor does with a run's outputs: where they go, what they say, how they are written.

``output_targets`` maps each output to its path; ``output_metadata`` is the
``__metadata__`` of its files; ``write_results`` streams a session's results into
writers with a few writes in flight; ``commit_all`` makes several outputs appear
together. The local executor (``tvlang.run.driver``) and the Ray executor
(``tvlang.run.distributed``) share them, so both write the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from tvlang.errors import TvlangError
from tvlang.io.atomic import owned_by_this_run  # Plan.run's scope over its outputs' transactions
from tvlang.io.output_paths import output_format
from tvlang.run.model_card import CARD_NAME, model_card
from tvlang.run.provenance import location, recipe_dir
from tvlang.version import __version__

if TYPE_CHECKING:
    import torch

    from tvlang.io import StreamingWriter, TensorInfo
    from tvlang.plan.compiler import Plan
    from tvlang.run.bindings import Bound
    from tvlang.run.session import Session

# This module imports neither torch nor the readers at its top (compute_threads and
# base_model_folder import what they use): the torch-free executor (tvlang.run.direct) writes
# its outputs' metadata, files and reports with these functions too.

__all__ = ["IN_FLIGHT", "Committable", "base_model_folder", "commit_all", "compute_threads", "model_files_of",
           "output_files", "output_metadata", "output_reports", "output_targets", "owned_by_this_run",
           "refuse_state_dict_outputs", "write_results"]

IN_FLIGHT = 2  # writes queued per output by write_results (whole tensors or pieces)


class Committable(Protocol):
    """An output written under a temporary name, committed in three steps (see tvlang.io.atomic)."""

    def prepare(self) -> None: ...
    def publish(self) -> None: ...
    def withdraw(self) -> None: ...
    def finish(self) -> None: ...


def write_results(session: Session, writers: Mapping[str, StreamingWriter], progress: Any = None) -> int:
    """Stream ``session.results`` of every output in ``writers`` into its writer; the bytes written.

    A few writes are in flight per output, in a writer thread, so that computing
    and writing overlap while memory stays bounded (result buffers are recycled).
    Small tensors go to the thread in batches (up to ``BATCH_BYTES`` or
    ``BATCH_COUNT`` of them): handing each one over costs more than writing it, and
    a header of a million tiny tensors took 1 ms per tensor. The writer thread runs
    its tasks in order, so the files are the same either way.
    """
    written = 0
    session.buffers.recycle = True
    session.buffers.size = (IN_FLIGHT + 1) * len(writers)
    with compute_threads(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvlang-write") as pool:
        pending: list[tuple[Future, list[torch.Tensor]]] = []
        batch: list[tuple[Any, str, torch.Tensor]] = []
        batch_bytes = 0

        def submit(task: Future, tensors: list[torch.Tensor]) -> None:
            pending.append((task, tensors))
            while len(pending) > IN_FLIGHT * len(writers):  # a few writes in flight: memory stays bounded
                future, done = pending.pop(0)
                future.result()
                for tensor in done:
                    session.buffers.give_back(tensor)

        def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                submit(pool.submit(_write_batch, batch), [tensor for _, _, tensor in batch])
                batch, batch_bytes = [], 0

        for output, name, tensor, whole in session.results(list(writers), progress, pieces=True):
            write = writers[output].write if whole else writers[output].write_part
            nbytes = tensor.numel() * tensor.element_size()
            written += nbytes
            if nbytes < SMALL_TENSOR:
                batch.append((write, name, tensor))
                batch_bytes += nbytes
                if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_COUNT:
                    flush()
            else:
                flush()
                submit(pool.submit(write, name, tensor), [tensor])
        flush()
        for future, done in pending:
            future.result()
            for tensor in done:
                session.buffers.give_back(tensor)
    return written


SMALL_TENSOR = 1 << 16  # bytes: a tensor below this is written in a batch
BATCH_BYTES = 1 << 20
BATCH_COUNT = 512


def _write_batch(batch: list[tuple[Any, str, torch.Tensor]]) -> None:
    for write, name, tensor in batch:
        write(name, tensor)


def commit_all(outputs: list[Committable]) -> None:
    """Commit several outputs so that they appear together: sync all, then rename all.

    A failure (or Ctrl-C) before the last rename withdraws the outputs already
    renamed into place, putting back what was there before (``--force``). The last
    rename is the commit: a Ctrl-C or SIGTERM after it is too late to undo the run, so
    it does not stop the cleanup of what the outputs replaced (each ``finish()`` is
    re-run until done) and is not reported as a failure.
    """
    for output in outputs:
        output.prepare()
    published: list[Committable] = []
    try:
        for output in outputs:
            published.append(output)  # before: a signal as publish() returns must not skip its withdraw()
            output.publish()  # (withdraw() leaves an output that was not published as it is)
    except BaseException:
        for output in reversed(published):
            output.withdraw()
        raise
    for output in outputs:
        while True:
            try:
                output.finish()  # idempotent: deletes what was replaced, syncs the directory
                break
            except KeyboardInterrupt:
                continue


@contextlib.contextmanager
def compute_threads():
    """Leave a core to the writer thread (and the kernel's page-cache copies) during a run.

    Measured on 2 cores: chunked steps on one torch thread beat two threads that
    fight the writer for the second core; the setting is restored afterwards.
    """
    import torch

    previous = torch.get_num_threads()
    wanted = max(1, min(previous, (os.cpu_count() or 2) - 1))
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def output_targets(plan: Plan, out: Any) -> dict[str, Any]:
    """Output name -> path, from one path (a recipe with one output) or a mapping."""
    if out is None:
        raise TvlangError("no output path given (-o PATH)")
    if isinstance(out, Mapping):
        unknown = [k for k in out if k not in plan.outputs]
        if unknown:
            raise TvlangError(f"no output named '{unknown[0]}'; the outputs are {', '.join(plan.outputs)}")
        lacking = [k for k in plan.outputs if k not in out]
        if lacking:
            raise TvlangError(f"no path given for output '{lacking[0]}' (-o {lacking[0]}=PATH)")
        return dict(out)
    if len(plan.outputs) != 1:
        raise TvlangError(f"this recipe has outputs {', '.join(plan.outputs)}: give -o NAME=PATH for each")
    return {plan.outputs[0]: out}


def output_reports(plan: Plan, targets: Mapping[str, Any],
                   layouts: Mapping[str, list[TensorInfo]]) -> list[dict[str, Any]]:
    """Per output, what ``run --json`` says of it (docs/cli-json.md): name, path, kind, format,
    tensors and bytes (the tensors' bytes, from its layout)."""
    return [{"name": name, "path": str(path), "kind": plan.output_kind(name), "format": output_format(path),
             "tensors": len(layouts[name]), "bytes": sum(info.nbytes for info in layouts[name])}
            for name, path in targets.items()]


def refuse_state_dict_outputs(out: Any) -> None:
    """The Ray executor's refusal of a ``.pt``/``.pth``/``.bin`` output: that file is one ``torch.save``
    of the whole output from one process's memory (``tvlang.io.state_dict_writer``), and Ray's tasks
    write safetensors shards."""
    paths = out.values() if isinstance(out, Mapping) else [out] if out is not None else []
    for path in paths:
        if output_format(path) == "torch":
            raise TvlangError(f"{os.fspath(path)}: the Ray executor cannot write a PyTorch state dict file: it is"
                              " saved whole from one process's memory, and Ray's tasks write safetensors shards",
                              notes=("write a model directory or a .safetensors file with --executor ray, or run"
                                     " with --executor local (the default) to write a .pt file",))


def model_files_of(bound: Bound, kind: str, path: Any) -> str | None:
    """The folder whose config and tokenizer files a Model output directory copies: the base's, if it has one."""
    if kind != "model" or output_format(path) != "directory":
        return None
    return base_model_folder(bound)


def base_model_folder(bound: Bound) -> str | None:
    """The base's folder of config and tokenizer files, if it has one.

    A Hub base's files (a stack's: its first part's) are fetched first (only when asked:
    an output that copies none, or a task vector, never downloads them).
    """
    base = bound.readers[bound.base]
    if not base.root:
        return None
    # a stack's files are its first part's (StackedReader.config_files reads its config.json)
    source = base.parts[0][0].hub if _is_stack(base) else base.hub
    if source is not None:
        from tvlang.io.hub import fetch_model_files

        fetch_model_files(source)
    return base.root


def output_metadata(plan: Plan, bound: Bound, output: str, kind: str,
                    lock: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``__metadata__`` of an output's files: tvlang's version, the kind, the recipe, its inputs.

    An input is named as :func:`tvlang.run.provenance.location` says: a Hub reference
    pinned to its commit, a path relative to the recipe file. A run checked against
    a lockfile (``lock``, see tvlang.run.lock) also records the sha256 of each file
    of those inputs, as the lock has them (``tvlang.lock``).
    """
    base = recipe_dir(plan)
    keys = _output_inputs(plan, bound, output, kind)
    extra = {}
    if lock is not None:
        locked = lock["inputs"]
        hashes = {key: {name: f["sha256"] for name, f in locked[key]["files"].items()} for key in keys if key in locked}
        extra["tvlang.lock"] = json.dumps(hashes, sort_keys=True)
    return {
        "tvlang.version": __version__,
        "tvlang.kind": "delta" if kind == "delta" else "model",
        "tvlang.output": output,
        "tvlang.recipe": plan.text,
        "tvlang.params": json.dumps(plan.params, sort_keys=True),
        "tvlang.inputs": json.dumps({k: location(bound.readers[k], base) for k in keys}, sort_keys=True),
        **extra,
    }


def output_files(plan: Plan, bound: Bound, output: str, kind: str, path: Any, metadata: Mapping[str, str],
                 copy_from: str | None, lock: Mapping[str, Any] | None, card: bool) -> dict[str, bytes]:
    """The files an output directory gets besides weights and copied files: its model card (README.md),
    for a Model output written as a directory, unless ``card`` is off (``--no-model-card``); and when
    the base is a stack (layer surgery), its ``config.json`` with the stack's layer count."""
    if kind != "model" or output_format(path) != "directory":
        return {}
    base = bound.readers[bound.base]
    files = base.config_files() if _is_stack(base) and copy_from is not None else {}
    if card:
        files[CARD_NAME] = model_card(plan, bound, output, metadata, copy_from, lock).encode()
    return files


def _is_stack(reader: Any) -> bool:
    """Whether ``reader`` is a ``StackedReader`` (no reader is one where its module, which
    imports torch, was never imported)."""
    stacked = sys.modules.get("tvlang.run.stacked")
    return stacked is not None and isinstance(reader, stacked.StackedReader)


def _output_inputs(plan: Plan, bound: Bound, output: str, kind: str) -> list[str]:
    """The sources an output is computed from; a Model output also takes the base's integer tensors."""
    keys = [k for k in plan.sources_read(output) if k in bound.readers]
    if kind == "model" and bound.base not in keys:
        keys.append(bound.base)
    return keys
