"""The torch-free executor: linear recipes and the common merge operators over safetensors files, without torch.

Importing torch takes 2.1-2.6 s of every ``tvlang run`` on the development machine: as long
as reading and writing a 1.5 GB model (docs/performance.md). A recipe whose outputs are linear
in its inputs needs none of torch's kernels, so :meth:`Plan.run <tvlang.plan.compiler.Plan.run>`
tries this executor first, and it runs the recipe when every one of these holds (else it
returns ``None`` before anything is written, and the local or Ray executor runs it as always):

- the local executor on the CPU, float32 compute (``dtype``), the output in the base's dtype or
  float32 (``out_dtype``), no lockfile (``--locked``) and no in-memory ``config=``;
  ``TVLANG_DIRECT=0`` in the environment turns it off;
- the plan has no scalar or adapter outputs; its passes before the main one, if any, reduce
  with whole-model ``norm``, ``dot`` or ``cos`` over reads and arithmetic steps (:func:`_reduce`,
  :class:`_Reduction`: the reducers' sums, block by block, added exactly); its per-tensor program
  is reads, the arithmetic steps (``set``, ``add``, ``scale``, ``axpy``) with constant
  coefficients or whole-model scalars of those reductions (no per-tensor values), calls with
  constant or per-tensor options (``layers()``, ``where()``, resolved for each tensor) of
  ``nearswap`` and ``ram`` (kernels whose float32 loop is the compiled helper's in the local
  executor too), of ``dare``, ``dare_ties`` (unit weights)
  and ``dare_linear`` (the masks of tvlang.ops.drops, as the local executor draws them; with
  ``rescale_by="l1"``, only where the call's inputs need no other call), or of ``ties`` (unit
  weights, an election, ``scope="tensor"``) and ``breadcrumbs``, without ``rescale_by="l1"`` and with
  no DARE call beside them, or of ``slerp``,
  ``model_stock`` (not ``filter_wise``), ``nuslerp`` (flattened), ``multislerp`` and ``karcher``
  (constant weights; :data:`GRAM_CALLS`) and ``random_like`` (:class:`_Noise`), with no threshold
  or DARE call beside them, or of ``sce``
  (alone of its kind, its inputs needing no other call: :class:`_Sce`), or of ``della`` (unit
  weights, an election) and ``della_linear`` (unit weights, ``merge="sum"``; with
  ``rescale_by="l1"``, only where the call's inputs need no other call: its norms are a pass before
  the main one) (:class:`_Della`, alone of their kind; chunks of whole rows, so a row of
  more than CHUNK_ELEMENTS entries leaves the run to the local executor), and writes;
- every source the recipe names is a local ``.safetensors`` file, a ``.safetensors.index.json``
  with its shards, or a model directory of either (no Hub reference, LoRA adapter, ``.bin`` file,
  stack, layer range or renaming),
  its kind is the one the plan was typed with, and every floating-point tensor of every input
  read is float32, bfloat16 or float16 (computed in float32 and written in the base's dtype, or
  float32 with ``out_dtype="float32"``, as the local executor converts them; with
  ``allow_nonfinite`` float32 only, where no conversion can meet a NaN), with the same names and
  shapes in all of them (integer tensors, copied from the base into Model outputs as the local
  executor copies them, of one dtype in all);
- the compiled helper is built and this CPU computes torch's steps as the helper does
  (:func:`tvlang.ops.native.linear_steps`: fused multiply-adds, on AVX2, FMA and F16C);
- every output is a model directory or a ``.safetensors`` file.

It reads each input's tensors a chunk at a time as views of the files mapped read-only (their pages
dropped from the process every RELEASE_BYTES: :meth:`_Input.view`; where a file cannot be mapped,
into numpy buffers with ``pread``, :func:`_aligned`), runs the steps with the helper (the same bits
as torch's ``mul`` and ``add(alpha=)``: tests/test_direct.py compares every file with the local
executor's; a step that would change a mapped view writes into its read step's buffer instead, and
a run of linear steps is one loop, :func:`_linear_runs`), and hands each chunk to the same
:class:`~tvlang.io.writer.StreamingWriter`, with the same metadata, model card, copied files,
commit (:func:`tvlang.run.outputs.commit_all`), progress and summary; on two cores or more the
writes run on a thread of their own (:func:`_overlapped`). DARE masks are drawn on
a second thread, a few blocks ahead (which, where no other call needs the second core, also takes
the writes: :func:`_writes_beside_masks`); ``ties``' thresholds are found (:class:`_Select`: the local
executor's window, or its radix select) on another, one tensor ahead of the main pass, and so are the
GRAM_CALLS' norms and dot products (:class:`_Gram`: the helper's block sums, as tvlang.ops.sums sums
them, and the kernels' coefficients from tvlang.ops.coefficients). A recipe whose one call is
``della`` reads each chunk while the rows of the one before are sampled, in blocks of rows that
both threads take (:func:`_pipelined`, :class:`RowBlocks`); with ``rescale_by="l1"``, its norms'
pass (each input sampled, in such blocks) runs one tensor ahead of the main pass (:class:`_Ahead`),
which takes the keep flags it kept. A result
that is not finite, or an input that cannot be read as its header says, withdraws what was
written and leaves the run to the local executor, which reports it as always.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy

from tvlang.errors import TvlangError
from tvlang.io.base import file_identity, kind_from_metadata, open_regular, read_at
from tvlang.io.open import find_weights
from tvlang.io.output_paths import check_distinct_outputs, output_format
from tvlang.io.safetensors_format import read_header
from tvlang.language.pertensor import PerTensor
from tvlang.ops.coefficients import (
    cosine,
    karcher_coefficients,
    multislerp_coefficients,
    noise_scale,
    nuslerp_coefficients,
    sce_weights,
    slerp_factors,
    stock_factor,
    stock_pairs,
)
from tvlang.ops.context import TensorContext
from tvlang.ops.drops import CHUNK as DROP_CHUNK
from tvlang.ops.drops import DropRule, l1_factor
from tvlang.ops.magprune import (
    SAVED_BITS_LIMIT,
    SCRATCH,
    RowBlocks,
    input_bits,
    ramp,
    row_blocks,
    row_length,
    sample,
    stream_words,
)
from tvlang.ops.names import count_layers
from tvlang.ops.native import (
    BLOCK,
    GRAM_VECTORS,
    MERGE_CODES,
    FusedInput,
    keep_bits,
    normal_f32,
    window_gather,
    window_gather2,
    window_gather_axpy,
)
from tvlang.ops.pertensor import resolve_options
from tvlang.ops.ranks import (
    bits_to_float,
    breadcrumb_counts,
    breadcrumb_windows,
    keep_count,
    pick_bin,
    read_window,
    sample_ranges,
    tie_span,
    truncated_count,
    window_of,
)
from tvlang.plan.records import DeltaBinding, RunSummary, input_report
from tvlang.plan.schedule import STEP_OPS, needed_steps, resolve_coef, scalar_value
from tvlang.run.outputs import (
    commit_all,
    model_files_of,
    output_files,
    output_metadata,
    output_reports,
    output_targets,
)
from tvlang.run.progress import progress_for

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["CHUNK_ELEMENTS", "DISABLE", "attempt"]

DISABLE = "TVLANG_DIRECT"  # "0" in the environment: never use this executor
CHUNK_ELEMENTS = 1 << 18  # entries per chunk: 1 MiB buffers, which stay in the cache (faster here than 4 MiB)
MAP_READS = True  # read the chunks as views of the mapped files (_Input.view), where _idle_second_core
#: whether a program whose calls keep the second core busy reads views too (True, False), or as the
#: processor says (None: _views_beside_calls)
VIEWS_BESIDE_CALLS: bool | None = None
RELEASE_BYTES = 16 << 20  # bytes of an input viewed between drops of its maps' pages (_Input.view)
MAPS_HELD = 2  # files of an input kept mapped (_Input.view: a sharded input whose tensors come in another order)
ALIGN_SLACK = 64  # bytes to spare in a read step's buffers, so that a chunk is read where it copies fast (_aligned)
MASKS_AHEAD = 4  # blocks of DARE masks drawn ahead per input (1 MiB each)
NOISE_BLOCK = 1 << 18  # entries of a block of random_like's noise drawn ahead for the main pass (_Noise)
NOISE_AHEAD = 2  # blocks of that noise drawn ahead of the one in use
AHEAD_TENSORS = 64  # tensors whose thresholds are searched ahead of the main pass (_Ahead)
ARITHMETIC_OPS = ("set", "add", "scale", "axpy")
#: kernels this executor runs, and their options: their chunk forms in the local executor call the
#: same loops of the helper (tvlang.ops.nearswap, tvlang.ops.ram, and the DARE masks and sign merge
#: of tvlang.ops.drops and tvlang.ops.ties) or the same IEEE operations (a product, a division), so
#: the bits are the same; DROP_CALLS with ``rescale_by="l1"`` find their norms in a pass before the
#: main one (:class:`_L1`); dare_ties takes unit weights only (the helper's sign merge)
NATIVE_CALLS = {"nearswap": ("t",), "ram": ("epsilon",)}
#: ties and breadcrumbs, with their thresholds found before the main pass (not beside a DARE call:
#: those passes run the steps their inputs need again, and would draw its masks again)
THRESHOLD_CALLS = {"ties": ("count", "density", "elect", "elect_on", "merge", "rescale_by", "scope", "weights"),
                   "breadcrumbs": ("count", "density", "gamma", "rescale_by")}
DROP_CALLS = {"dare": ("p", "rescale", "rescale_by", "seed"),
              "dare_ties": ("elect", "elect_on", "merge", "p", "rescale", "rescale_by", "seed", "weights"),
              "dare_linear": ("merge", "p", "rescale", "rescale_by", "seed", "weights")}
#: the merges whose result is a weighted sum of their inputs with coefficients from the inputs' norms and
#: dot products (tvlang.ops.coefficients), found in a pass before the main one by the helper's block
#: sums, as tvlang.ops.sums sums them; each with its options (not beside a threshold or DARE call)
GRAM_CALLS = {"slerp": ("t",), "model_stock": ("filter_wise",), "nuslerp": ("flatten", "row_wise", "t"),
              "multislerp": ("eps", "normalize_weights", "weights"), "karcher": ("max_iter", "tol", "weights")}
#: random_like, its norms found with the GRAM_CALLS' sums (:class:`_Noise`)
NOISE_OPTIONS = ("seed",)
SUMS_CALLS = (*GRAM_CALLS, "random_like")  # the calls whose pass before the main one sums norms and products
#: sce, its selection and weights found in passes before the main one (:class:`_Sce`), alone of its kind
SCE_OPTIONS = ("count", "select_topk")
#: della and della_linear (:class:`_Della`): MAGPRUNE by the helper over chunks of whole rows, no pass before
#: the main one with ``rescale_by="probability"``, one for the norms with ``"l1"``; unit weights; della with
#: an election (the helper's sign merge), della_linear with ``merge="sum"``; alone of their kind
DELLA_CALLS = {"della": ("density", "elect", "elect_on", "epsilon", "lambda", "merge", "rescale", "rescale_by",
                         "seed", "weights"),
               "della_linear": ("density", "epsilon", "lambda", "merge", "rescale", "rescale_by", "seed", "weights")}
_PREFIXES = ("hf:", "lora:")  # a Hub reference or an adapter: another executor's
_F32 = ("float32", "torch.float32")
# codes of the tensors the local executor copies from the base (not floating point), and numpy's types
_COPIED = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# the floating-point codes read, and the helper's conversions to float32 and back
_FLOATS = {"F32": None, "BF16": ("tv_bf16_to_f32", "tv_f32_to_bf16"), "F16": ("tv_f16_to_f32", "tv_f32_to_f16")}
FUSED_PARTS = 16  # the most inputs of a call the helper's fused loop takes (native.c's FUSED_PARTS)
DELLA_PARTS = 16  # the most inputs of a della call the helper's row loop takes (native.c's DELLA_PARTS)
#: the trims' plans (_Trims._plan) as the fused loop's forms (tv_fused_merge_f32); 1 is DARE's keep bits
_FORMS = {"all": 0, "above": 2, "band": 3, "below": 4, "nothing": 5}
_KEEP_BITS = 1
_L1_BITS = 6  # the fused loop's form for keep bits then the L1 rule's factor (two products)


class _Fallback(Exception):
    """This run is the local executor's after all (a non-finite result, an unreadable input)."""


@dataclass
class _Input:
    """One source, opened: what the metadata and model card functions read of a reader (``label``,
    ``paths``, ``root``, ``hub``), its files (one, or a sharded index's shards) and its tensors.
    Its files are read as views of their maps (:meth:`view`, at most MAPS_HELD at a time); where
    one cannot be mapped, through one descriptor open at a time (``fd``): a sharded model's
    shards are read in turn."""

    key: str
    label: str
    paths: tuple[str, ...]  # resolved: the index first, if any, then the weight files
    root: str | None
    kind: str
    files: list[str] = field(default_factory=list)  # the weight files
    identities: list[tuple] = field(default_factory=list)  # each file as its header was read
    # name -> (shape, code, file index, offset in the file)
    tensors: dict[str, tuple[tuple[int, ...], str, int, int]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # names: the files in turn, each in file order
    hub: None = None
    _open: tuple[int, int] | None = None  # (file index, descriptor)
    _maps: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # file -> (its bytes mapped, the map): view()
    # bytes viewed since the maps' pages were last dropped: a list, so that a copy of this source
    # (_Ahead's, made by dataclasses.replace) counts with it, as it shares its maps and lock
    _viewed: list[int] = field(default_factory=lambda: [0])
    mapping: bool = False  # whether the run reads its chunks as views (_idle_second_core, _views_beside_calls)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # for the threads that view (main, _Ahead)

    def fd(self, file: int) -> int:
        """A descriptor of weight file ``file``, closing the one open before; a file that is not the
        one whose header was read (replaced since) is the local executor's to report."""
        if self._open is not None and self._open[0] == file:
            return self._open[1]
        self._close_fd()
        try:
            fd, _ = open_regular(self.files[file], self.files[file])  # a regular file: never a pipe that blocks
        except TvlangError:
            raise _Fallback from None
        if file_identity(os.fstat(fd)) != self.identities[file]:
            os.close(fd)
            raise _Fallback
        self._open = (file, fd)
        return fd

    def view(self, file: int, position: int, nbytes: int):
        """Bytes ``position:position+nbytes`` of weight file ``file`` as a read-only numpy view of the
        file mapped (:func:`_read_step` reads the chunks so: no copy), or ``None`` where the file
        cannot be mapped or is shorter than that (read, then, as the header says: a short read).

        The last MAPS_HELD files' maps are kept (a sharded input whose tensors come in another
        order than the base's goes back and forth between its shards; a map lives on while a view
        of it does), each made from a descriptor of its own, opened and closed here (the map holds
        a copy); a lock guards them, so that any thread may view. Their pages are dropped from this process every
        RELEASE_BYTES viewed (``MADV_DONTNEED``: they stay in the page cache, and a view still
        in use maps them again as it is read), so that the process holds no more of the files
        than that: else every page read stays mapped, and counts in its private memory, until
        the run ends. A file cut short while it is mapped kills the process with SIGBUS when a
        view reaches past its new end: as the local executor's maps of whole tensors
        (tvlang.io.safetensors_file)."""
        with self._lock:
            held = self._maps.get(file)
            if held is None:
                held = self._maps[file] = self._map(file)
                while len(self._maps) > MAPS_HELD:
                    del self._maps[next(iter(self._maps))]
            whole, mapping = held
            if whole is None or position + nbytes > len(whole):
                return None
            self._viewed[0] += nbytes
            if self._viewed[0] >= RELEASE_BYTES:
                self._viewed[0] = 0
                for _, held_map in self._maps.values():
                    if held_map is not None:
                        try:
                            held_map.madvise(mmap.MADV_DONTNEED)
                        except (OSError, ValueError):  # advice only
                            pass
            return whole[position:position + nbytes]

    def chunk(self, file: int, position: int, target):
        """Bytes from ``position`` of weight file ``file``, as many as ``target`` holds, as entries of
        its dtype: a read-only view of the mapped file (:meth:`view`) where this run reads views and
        ``position`` is a whole number of entries, else read into ``target`` (which is returned)."""
        if self.mapping and position % target.itemsize == 0:
            view = self.view(file, position, target.nbytes)
            if view is not None:
                return view.view(target.dtype)
        _read_into(self.fd(file), position, target)
        return target

    def _map(self, file: int) -> tuple[Any, Any]:
        """Weight file ``file`` mapped read-only: ``(its bytes as a numpy array, the map)``, or ``(None,
        None)`` where it cannot be (a file system without mmap, an empty file); one that is not the
        file whose header was read (replaced since) is the local executor's to report."""
        try:
            fd, _ = open_regular(self.files[file], self.files[file])
        except TvlangError:
            raise _Fallback from None
        try:
            if file_identity(os.fstat(fd)) != self.identities[file]:
                raise _Fallback
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return numpy.frombuffer(mapping, dtype=numpy.uint8), mapping
        except (OSError, ValueError):
            return None, None
        finally:
            os.close(fd)

    def _close_fd(self) -> None:
        if self._open is not None:
            os.close(self._open[1])
            self._open = None

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
        self._close_fd()


@dataclass
class _Bound:
    """The inputs as :mod:`tvlang.run.outputs` reads a ``Bound``."""

    plan: Plan
    readers: dict[str, _Input]
    base: str


def attempt(plan: Plan, bindings: Mapping[str, Any], out: Any, *, device: Any, dtype: Any, out_dtype: Any,
            shard_size: int | None, force: bool, missing: str, progress: Any, allow_nonfinite: bool,
            executor: str, address: Any, workers: Any, lock: Any, model_card: bool, task_timeout: Any,
            config: Any) -> RunSummary | None:
    """Run ``plan`` here and return its summary, or ``None`` (nothing written) where this executor
    does not apply: the options of :func:`tvlang.run.driver.run`."""
    if os.environ.get(DISABLE, "1") == "0":
        return None
    if executor != "local" or address is not None or workers is not None or task_timeout is not None:
        return None
    if lock is not None or config is not None or str(device) != "cpu" or str(dtype) not in _F32:
        return None
    if out_dtype is not None and str(out_dtype) not in _F32:
        return None
    from tvlang.ops.native import linear_steps

    lib = linear_steps()
    if lib is None or not _runnable(plan):
        return None
    try:
        targets = output_targets(plan, out)
    except TvlangError:
        return None  # the local executor says what is wrong
    if any(output_format(path) not in ("safetensors", "directory") for path in targets.values()):
        return None
    bound = _open(plan, bindings)
    if bound is None:
        return None
    out_code = None if out_dtype is None else "F32"  # None: each tensor in the base's dtype
    codes = {entry[1] for source in bound.readers.values() for entry in source.tensors.values()}
    try:
        if allow_nonfinite and codes & {"BF16", "F16"}:  # a NaN written: its bits must be torch's
            return None
        return _run(plan, bindings, bound, targets, lib, shard_size=shard_size, force=force, missing=missing,
                    progress=progress, allow_nonfinite=allow_nonfinite, model_card=model_card,
                    out_code=out_code)
    except _Fallback:
        return None
    except TvlangError as exc:
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    finally:
        for source in bound.readers.values():
            source.close()


def _runnable(plan: Plan) -> bool:
    """Whether the plan is one pass of reads, constant arithmetic, the helper's kernels with constant
    options, and writes of Model or Delta outputs."""
    schedule = plan.schedule
    program = schedule.main
    if schedule.scalars or schedule.call_reductions or not program.reads:
        return False
    if schedule.levels and not _levels_runnable(schedule):
        return False
    if sorted(program.writes) != sorted(plan.outputs):
        return False
    if any(plan.output_kind(name) not in ("model", "delta") for name in plan.outputs):
        return False
    calls = {step.name for step in program.steps if step.op == "call"}
    if calls & set(THRESHOLD_CALLS) and calls & set(DROP_CALLS):
        return False  # the thresholds' passes would draw DARE's masks again
    if calls & set(SUMS_CALLS) and calls & {*THRESHOLD_CALLS, *DROP_CALLS}:
        return False  # one kind of pass before the main one
    if "sce" in calls and calls & {*THRESHOLD_CALLS, *DROP_CALLS, *SUMS_CALLS}:
        return False
    if calls & set(DELLA_CALLS) and calls & {*THRESHOLD_CALLS, *DROP_CALLS, *SUMS_CALLS, "sce"}:
        return False  # its rows share the second thread with no other call's work
    for index, step in enumerate(program.steps):
        if (_l1_call(step) or step.op == "call" and step.name == "sce") and any(
                program.steps[i].op == "call" for i in needed_steps(program, {index}) if i != index):
            return False  # its norms' pass would run the call before it, whose masks or norms are the main pass's
    for step in program.steps:
        if step.op in ("read", "write"):
            continue
        if step.op == "call":
            if not _call_runnable(step.name, dict(step.options), len(step.srcs)):
                return False
            continue
        if step.op not in ARITHMETIC_OPS or not _coefs_known(step, schedule.tasks):
            return False
    return True


#: the whole-model reductions this executor runs before the main pass (:class:`_Reduction`), and the
#: vectors each takes
REDUCTIONS = {"norm": 1, "dot": 2, "cos": 2}
_SCALAR_NODES = ("const", "reduce", "neg", "add", "sub", "mul", "div")


def _coefs_known(step, tasks: dict) -> bool:
    """Whether each coefficient of an arithmetic step is a number, or a whole-model scalar made of
    numbers and the reductions in ``tasks`` (known before the pass runs: :func:`_reduce`); a
    per-tensor value is a node of another kind."""
    coefs = step.coef if step.op == "add" else (step.coef,)
    for coef in coefs:
        if isinstance(coef, tuple) and coef and coef[0] == "div":
            coef = coef[1]
        if type(coef) in (float, int):
            continue
        stack = [coef]
        while stack:
            node = stack.pop()
            if getattr(node, "op", None) not in _SCALAR_NODES or node.op == "reduce" and id(node) not in tasks:
                return False
            if node.op != "reduce":
                stack.extend(node.args)
    return True


def _levels_runnable(schedule) -> bool:
    """Whether every pass before the main one reduces with ``norm``, ``dot`` or ``cos`` (no options)
    over vectors of reads and arithmetic, whose coefficients the earlier passes' scalars give."""
    for tasks, program in schedule.levels:
        takes = {task.name: REDUCTIONS.get(task.builtin) for task in tasks}
        if any(task.options or takes[task.name] is None for task in tasks) or not program.reads:
            return False
        for step in program.steps:
            if step.op == "read":
                continue
            if step.op == "feed":
                if takes.get(step.name) != len(step.srcs):
                    return False
            elif step.op not in ARITHMETIC_OPS or not _coefs_known(step, schedule.tasks):
                return False
    return True


def _call_runnable(name: str, options: dict, n_inputs: int) -> bool:
    """Whether a call of kernel ``name`` with ``options`` is one this executor runs (each number a
    constant or a per-tensor value: :func:`_number`)."""
    if name in NATIVE_CALLS:
        return sorted(options) == sorted(NATIVE_CALLS[name]) and all(map(_number, options.values()))
    if name in GRAM_CALLS:
        return sorted(options) == sorted(GRAM_CALLS[name]) and _gram_runnable(name, options, n_inputs)
    if name == "random_like":
        return sorted(options) == sorted(NOISE_OPTIONS) and _number(options["seed"])
    if name == "sce":
        return (sorted(options) == sorted(SCE_OPTIONS) and _number(options["select_topk"])
                and options["count"] in ("floor", "mergekit"))
    if name in DELLA_CALLS:
        return _della_runnable(name, options, n_inputs)
    if name in THRESHOLD_CALLS:
        if sorted(options) != sorted(THRESHOLD_CALLS[name]) or not _number(options["density"]):
            return False
        if options["rescale_by"] == "l1" or options["count"] not in ("floor", "mergekit"):
            return False
        if name == "breadcrumbs":
            return _number(options["gamma"])
        return options["scope"] == "tensor" and _unit_merge(options, n_inputs)
    if name not in DROP_CALLS or sorted(options) != sorted(DROP_CALLS[name]):
        return False
    if not _number(options["p"]) or not _number(options["seed"]):
        return False
    if type(options["rescale"]) is not bool or options["rescale_by"] not in ("probability", "l1"):
        return False
    if name == "dare":
        return True
    weights = options["weights"]
    if not isinstance(weights, tuple) or not all(map(_number, weights)):
        return False
    if weights and len(weights) != n_inputs or options["merge"] not in MERGE_CODES:
        return False
    if name == "dare_ties":
        return _unit_merge(options, n_inputs)
    return True


def _della_runnable(name: str, options: dict, n_inputs: int) -> bool:
    """Whether a della or della_linear call is one :class:`_Della` runs: numbers for its scalars,
    ``rescale_by="probability"`` or ``"l1"`` (its norms in a pass before the main one), unit weights,
    della with an election and della_linear with ``merge="sum"``."""
    if sorted(options) != sorted(DELLA_CALLS[name]) or type(options["rescale"]) is not bool:
        return False
    if not all(_number(options[key]) for key in ("density", "epsilon", "lambda", "seed")):
        return False
    if options["rescale_by"] not in ("probability", "l1"):
        return False
    if name == "della":
        return _unit_merge(options, n_inputs)
    weights = options["weights"]
    return (options["merge"] == "sum" and isinstance(weights, tuple) and (not weights or len(weights) == n_inputs)
            and all(type(w) in (float, int) and w == 1.0 for w in weights))


def _l1_call(step) -> bool:
    """Whether ``step`` is a DARE or della call that restores each input's L1 norm (``rescale_by="l1"``):
    the norms before and after the drop are a pass before the main one (:class:`_L1`, :class:`_Della`)."""
    return (step.op == "call" and step.name in (*DROP_CALLS, *DELLA_CALLS) and dict(step.options).get("rescale") is True
            and dict(step.options).get("rescale_by") == "l1")


def _gram_runnable(name: str, options: dict, n_inputs: int) -> bool:
    """Whether a GRAM_CALLS call is its flattened, per-tensor form with numbers for its scalars
    (``filter_wise``, ``flatten=false``: per row, the local executor's)."""
    if name == "slerp":
        return n_inputs == 2 and _number(options["t"])
    if name == "model_stock":
        return n_inputs >= 3 and options["filter_wise"] is False
    if name == "nuslerp":
        return n_inputs == 2 and options["flatten"] is True and _number(options["t"])
    weights = options["weights"]
    if not isinstance(weights, tuple) or not all(type(w) in (float, int) for w in weights):
        return False
    if name == "multislerp":
        return type(options["normalize_weights"]) is bool and _number(options["eps"])
    return _number(options["max_iter"]) and _number(options["tol"])


def _number(value: object) -> bool:
    """Whether an option's value is a number, or a per-tensor one (``layers()``, ``where()``: resolved
    for each tensor as the local executor resolves it; not a value a reduction pass computes)."""
    return type(value) in (float, int) or isinstance(value, PerTensor)


def _unit_merge(options: dict, n_inputs: int) -> bool:
    """Whether a merge's options are the helper's sign merge: unit weights (or none), an election."""
    weights = options["weights"]
    return (isinstance(weights, tuple) and (not weights or len(weights) == n_inputs)
            and all(type(w) in (float, int) and w == 1.0 for w in weights)
            and options["elect"] in ("total", "frequency") and options["merge"] in MERGE_CODES)


def _source_path(plan: Plan, bindings: Mapping[str, Any], key: str) -> tuple[str, str, bool] | None:
    """(path, label, marked as a Delta) of source ``key``, where it is a plain local path
    (a ``load()`` is never marked: its function says its kind)."""
    spec = plan.optimized.sources[key]
    if spec.path is None:
        value = bindings.get(key)
        marked = isinstance(value, DeltaBinding)
        if marked:
            value = value.value
        if not isinstance(value, (str, os.PathLike)):
            return None
        path = os.fspath(value)
        return None if path.startswith(_PREFIXES) else (path, path, marked)
    if spec.func not in ("load", "load_delta") or spec.layers is not None or spec.parts:
        return None
    if spec.strip_prefix or spec.add_prefix or spec.path.startswith(_PREFIXES):
        return None
    return spec.path, spec.path, False


def _every_source_local(plan: Plan, bindings: Mapping[str, Any]) -> bool:
    """Every source the recipe names, read or not, is a local path (so that the paths no output
    may replace are the ones :func:`tvlang.run.bindings.protected_paths` finds)."""
    for spec in plan.unoptimized.sources.values():
        for part in (*spec.parts, spec):
            if part.path is not None and (part.path.startswith(_PREFIXES) or part.func not in ("load", "load_delta")):
                return False
    for name in plan.checked.sources:
        value = bindings.get(name)
        if isinstance(value, DeltaBinding):
            value = value.value
        if not isinstance(value, (str, os.PathLike)) or os.fspath(value).startswith(_PREFIXES):
            return False
    return True


def _protected(plan: Plan, bindings: Mapping[str, Any]) -> list[str]:
    """Every path the recipe names or is bound to (all local: :func:`_every_source_local`)."""
    paths = [part.path for spec in plan.unoptimized.sources.values() for part in (*spec.parts, spec)
             if part.path is not None]
    for name in plan.checked.sources:
        value = bindings[name]
        paths.append(os.fspath(value.value if isinstance(value, DeltaBinding) else value))
    return paths


def _open(plan: Plan, bindings: Mapping[str, Any]) -> _Bound | None:
    """Every source the plan reads, opened, where all are safetensors files of float32, bfloat16 or
    float16 (and integer) tensors whose names and shapes agree and whose kinds are the plan's; else
    ``None`` (nothing is left open)."""
    if any(name not in bindings for name in plan.checked.sources) or not _every_source_local(plan, bindings):
        return None
    opened: dict[str, _Input] = {}
    try:
        for key in plan.schedule.sources_read:
            source = _open_source(plan, bindings, key)
            if source is None:
                return None
            opened[key] = source
        order = plan.schedule.sources_read
        models = [k for k in order if plan.optimized.sources[k].kind == "model"]
        base = models[0] if models else order[0]
        expected = _shapes(opened[base])
        if not expected or any(_shapes(source) != expected for source in opened.values()):
            return None
        bound = _Bound(plan, opened, base)
        opened = {}  # the caller closes them now
        return bound
    finally:
        for source in opened.values():
            source.close()


def _shapes(source: _Input) -> dict[str, tuple]:
    """Each tensor's shape, and its dtype where it is an integer one (the float dtypes may differ:
    each is converted to float32)."""
    return {name: (entry[0], None if entry[1] in _FLOATS else entry[1]) for name, entry in source.tensors.items()}


def _open_source(plan: Plan, bindings: Mapping[str, Any], key: str) -> _Input | None:
    """Source ``key``'s file, or a sharded index's shards, with every header read and checked as the
    local executor's readers check them (``tvlang.io.open``, ``tvlang.io.sharded``); ``None``
    where it is not one this executor reads, or anything is wrong (the local executor says what)."""
    found = _source_path(plan, bindings, key)
    if found is None:
        return None
    path, label, marked = found
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return None  # the local executor refuses an adapter directory, saying why
        weights = find_weights(path)
        if weights is None or not weights.endswith((".safetensors", ".safetensors.index.json")):
            return None
        root: str | None = os.path.realpath(path)
        path, file_label = os.path.join(path, weights), os.path.join(label, weights)
    elif path.endswith(".safetensors.index.json") and os.path.isfile(path):
        root, file_label = os.path.realpath(os.path.dirname(os.path.abspath(path))), label
    elif path.endswith(".safetensors") and os.path.isfile(path):
        parent = os.path.dirname(os.path.realpath(path))
        root, file_label = (parent if os.path.isfile(os.path.join(parent, "config.json")) else None), label
    else:
        return None
    source = _Input(key, label, (), root, "model")
    try:
        if path.endswith(".json"):
            from tvlang.io.sharded import read_index, shard_path

            weight_map = read_index(file_label, path)
            directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
            by_shard: dict[str, set[str]] = {}
            for name, shard in weight_map.items():
                by_shard.setdefault(shard, set()).add(name)
            shards = sorted(by_shard)
            if not all(shard.endswith(".safetensors") for shard in shards):
                return None
            files = [(shard_path(file_label, directory, shard), by_shard[shard]) for shard in shards]
            source.paths = (os.path.realpath(path),)
        else:
            files = [(path, None)]
        metadata: dict[str, str] = {}
        for index, (file, wanted) in enumerate(files):
            found_meta = _read_file(source, index, file, wanted)
            if found_meta is None:
                return None
            for name, value in found_meta.items():
                metadata.setdefault(name, value)  # the first shard's win, as ShardedReader's
        source.close()
    except (TvlangError, OSError):
        source.close()
        return None
    spec = plan.optimized.sources[key]
    source.kind = "delta" if marked or kind_from_metadata(metadata) == "delta" else "model"
    if (source.kind != spec.kind) if spec.path is None else (spec.kind == "model" and source.kind == "delta"):
        return None  # the local executor re-types the free name, or refuses the load()
    return source


def _read_file(source: _Input, index: int, path: str, wanted: set[str] | None) -> dict[str, str] | None:
    """Add weight file ``path`` (holding the tensors ``wanted`` of an index, or all) to ``source``:
    its metadata, or ``None`` where a tensor is of a dtype this executor does not read."""
    fd, size = open_regular(path, path)
    try:
        metadata, entries = read_header(path, fd, size, codes=True)
        identity = file_identity(os.fstat(fd))
    finally:
        os.close(fd)
    source.files.append(path)
    source.identities.append(identity)
    source.paths = (*source.paths, os.path.realpath(path))
    names = {entry[0] for entry in entries}
    if wanted is not None and not wanted <= names:
        return None  # the index lists a tensor the shard lacks: the local executor says so
    for name, shape, code, begin, _ in entries:
        if wanted is not None and name not in wanted:
            continue
        if code not in _FLOATS and code not in _COPIED:
            return None
        source.tensors[name] = (shape, code, index, begin)
        source.order.append(name)
    return metadata


def _run(plan: Plan, bindings: Mapping[str, Any], bound: _Bound, targets: dict[str, Any], lib, *,
         shard_size: int | None, force: bool, missing: str, progress: Any, allow_nonfinite: bool,
         model_card: bool, out_code: str | None) -> RunSummary:
    from tvlang.io.base import TensorInfo
    from tvlang.io.safetensors_format import itemsize
    from tvlang.io.writer import StreamingWriter

    started = time.perf_counter()
    base = bound.readers[bound.base]
    order = base.order
    read = {name: _numel(base.tensors[name][0]) * itemsize(base.tensors[name][1]) for name in order}  # progress
    every = []
    for name in order:
        shape, code = base.tensors[name][:2]
        code = out_code or code if code in _FLOATS else code  # floats in the output dtype, integers as they are
        every.append(TensorInfo(name, shape, code, _numel(shape) * itemsize(code), ""))
    computed = [info for info in every if info.dtype in _FLOATS]  # Delta outputs hold these only
    program = plan.schedule.main
    if not _rows_fit(program, every):
        raise _Fallback  # before anything is written
    check_distinct_outputs(targets)
    inputs = [*_protected(plan, bindings), *(path for source in bound.readers.values() for path in source.paths)]
    writers: dict[str, StreamingWriter] = {}
    bar = None
    drawing = ThreadPoolExecutor(1, thread_name_prefix="tvlang-masks")  # a thread only once a DARE call asks
    ahead = None
    writing = None
    try:
        bar = progress_for(progress)
        if plan.schedule.levels:  # before any output's temporary exists
            program = _reduce(plan, bound, computed, read, lib, bar)
        if _idle_second_core(program):
            writing = _writing_thread()  # before any output's temporary exists
        shared = _writes_beside_masks(program)
        if shared:
            drawing.submit(int).result()  # its thread started before any output's temporary exists (as above)
        for name, path in targets.items():
            kind = plan.output_kind(name)
            metadata = output_metadata(plan, bound, name, kind)
            copy_from = model_files_of(bound, kind, path)
            files = output_files(plan, bound, name, kind, path, metadata, copy_from, None, model_card)
            writers[name] = StreamingWriter(path, every if kind == "model" else computed, shard_size=shard_size,
                                            metadata=metadata, inputs=inputs, force=force, copy_from=copy_from,
                                            files=files)
        buffers, halves, drops = _workspace(program)
        fused = _fusions(program)
        if bar:
            bar.start("main pass" if not plan.schedule.levels else f"pass {_passes(plan)} (main)", len(every),
                      sum(read.values()) * len(writers))
        models = [w for name, w in writers.items() if plan.output_kind(name) == "model"]
        num_layers = count_layers(base.order)  # as the local executor's layout counts them
        idle = writing is not None  # (_idle_second_core: then no call runs ahead either)
        for source in bound.readers.values():  # before _Ahead copies them: its pass reads as the main one
            source.mapping = MAP_READS and (idle or _views_beside_calls(program))
        ahead = _Ahead(program, bound, lib, every, drawing, num_layers) if any(
            step.op == "call" and step.name in (*THRESHOLD_CALLS, *SUMS_CALLS, "sce") or _l1_call(step)
            for step in program.steps) else None
        if ahead is None and _pipelines(program):
            _pipelined(program, bound, every, [(buffers, halves, drops), _workspace(program)], writers, models, lib,
                       drawing, num_layers, fused, not allow_nonfinite, bar, read, len(writers))
        elif idle or shared:
            _overlapped(program, bound, every, [(buffers, halves, drops)] + [_workspace(program)
                                                                          for _ in range(WRITES_AHEAD)],
                        writers, models, lib, drawing if shared else writing, drawing, num_layers, fused,
                        not allow_nonfinite, bar, read, len(writers))
        else:
            following = _Following(program, every, drawing, num_layers, fused.packed)
            unread = _unread(program)
            for position, info in enumerate(every):
                numel = _numel(info.shape)
                if info.dtype not in _FLOATS or numel == 0:
                    _write_uncomputed(base, info, writers, models)
                streams = ahead.streams(position) if ahead else following.streams(position)
                step = _chunk_size(program, info)
                for start in range(0, _floats(info), step):
                    if not ahead:
                        following.ask_next(position, streams)
                    _chunk(program, bound, info, start, min(numel - start, step), buffers, halves, drops,
                           streams, writers, lib, check=not allow_nonfinite, fused=fused, skip=unread)
                if bar:
                    bar.advance(info.name, read[info.name] * len(writers))
        commit_all(list(writers.values()))
        layouts = {name: writer.layout for name, writer in writers.items()}
        floats = len(computed)
        inputs_report = [input_report(bound.base, base.label, True, [], floats, 0, [], [], [], [], [])]
        inputs_report += [input_report(key, source.label, False, [], floats, 0, [], [], [], [], [])
                          for key, source in bound.readers.items() if key != bound.base]
        return RunSummary({k: str(v) for k, v in targets.items()}, sum(map(len, layouts.values())),
                          sum(info.nbytes for layout in layouts.values() for info in layout),
                          time.perf_counter() - started, _passes(plan), [],
                          output_reports(plan, targets, layouts), inputs_report, missing)
    except BaseException:
        for writer in writers.values():
            writer.abort()  # a published or committed writer is left as it is
        raise
    finally:
        if ahead is not None:
            ahead.close()
        if writing is not None:
            writing.shutdown(wait=True, cancel_futures=True)
        drawing.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()


class _Reduction:
    """A whole-model ``norm``, ``dot`` or ``cos`` (tvlang.ops.reduce's reducers, without torch): the
    block sums of the squares and products it needs over every computed tensor (the helper's,
    tv_gram_sums_f32, a chunk at a time: blocks counted from each tensor's first entry, as
    ``BlockSums`` counts them), added exactly at the end (``math.fsum``, correctly rounded, as
    ``ExactSum.value()`` rounds the same exact sum), and the reducer's ``result()`` of them."""

    def __init__(self, builtin: str) -> None:
        self.builtin = builtin
        self.pairs = {"norm": [(0, 0)], "dot": [(0, 1)], "cos": [(0, 1), (0, 0), (1, 1)]}[builtin]
        self.index = numpy.array(self.pairs, dtype=numpy.int32).reshape(-1)
        self.blocks: list[numpy.ndarray] = []

    def observe(self, pieces: list, lib) -> None:
        count = len(pieces[0])
        if not count:
            return
        out = numpy.empty((len(self.pairs), -(-count // BLOCK)), dtype=numpy.float64)
        lib.tv_gram_sums_f32(_pointers(pieces), len(pieces), None, self.index.ctypes.data, len(self.pairs), count,
                             out.shape[1], out.ctypes.data, None)
        self.blocks.append(out)

    def result(self) -> float:
        sums = _exact_sums(numpy.concatenate(self.blocks, axis=1) if self.blocks
                           else numpy.zeros((len(self.pairs), 0)))
        if self.builtin == "norm":
            return math.sqrt(sums[0])
        if self.builtin == "dot":
            return sums[0]
        return cosine(*sums)  # sums: the products, then each vector's squares


def _exact_sums(blocks) -> list[float]:
    """Each row of block values (float64) added exactly (``math.fsum``, correctly rounded, as
    ``ExactSum.value()`` rounds the same exact sum); a value that is not finite leaves the run to the
    local executor, whose error it is to report."""
    if not numpy.isfinite(blocks).all():
        raise _Fallback
    return [math.fsum(row) for row in blocks.tolist()]


def _passes(plan: Plan) -> int:
    """``plan.schedule.passes`` without making the reducers (whose module imports torch): the
    reductions this executor runs take one pass each."""
    return len(plan.schedule.levels) + (1 if plan.schedule.main.steps else 0)


def _resolved(program, scalar: Callable) -> Any:
    """``program`` with each arithmetic step's coefficients as numbers (``resolve_coef``, as the local
    executor resolves them); a division by zero is the local executor's error to report."""
    steps = []
    try:
        for step in program.steps:
            if step.op in ARITHMETIC_OPS:
                coef = (tuple(resolve_coef(c, scalar) for c in step.coef) if step.op == "add"
                        else resolve_coef(step.coef, scalar))
                step = replace(step, coef=coef)
            steps.append(step)
    except TvlangError:
        raise _Fallback from None
    return replace(program, steps=steps)


def _reduce(plan: Plan, bound: _Bound, computed: list, read: dict, lib, bar) -> Any:
    """The passes before the main one (whole-model ``norm``, ``dot`` and ``cos``: :class:`_Reduction`),
    each over every computed tensor a chunk at a time; then the main program with its coefficients as
    numbers. A scalar that is not finite leaves the run to the local executor, which reports it."""
    reduced: dict[int, float] = {}
    cache: dict[int, float] = {}

    def scalar(node) -> float:
        return scalar_value(node, reduced, cache)

    total = _passes(plan)
    for number, (tasks, level) in enumerate(plan.schedule.levels, 1):
        program = _resolved(level, scalar)
        states = {task.name: _Reduction(task.builtin) for task in tasks}
        observing = {index: (lambda pieces, state=states[step.name]: state.observe(pieces, lib))
                     for index, step in enumerate(program.steps) if step.op == "feed"}
        buffers, halves, drops = _workspace(program)
        if bar:
            bar.start(f"pass {number} of {total}: {', '.join(sorted({task.builtin for task in tasks}))}",
                      len(computed), len(program.reads) * sum(read[info.name] for info in computed))
        for info in computed:
            numel = _numel(info.shape)
            for start in range(0, numel, CHUNK_ELEMENTS):
                _chunk(program, bound, info, start, min(numel - start, CHUNK_ELEMENTS), buffers, halves, drops, {},
                       {}, lib, check=False, observing=observing)
            if bar:
                bar.advance(info.name, len(program.reads) * read[info.name])
        for task in tasks:
            value = float(states[task.name].result())
            if not math.isfinite(value):
                raise _Fallback
            reduced[id(task.node)] = value
        cache.clear()
    return _resolved(plan.schedule.main, scalar)


class _Coded:
    """A numpy array of raw 16-bit entries in the dtype of a code (``BF16``, ``F16``; numpy has no
    bfloat16), as :class:`~tvlang.io.writer.StreamingWriter` takes a piece: ``dtype``, ``nbytes``,
    ``shape`` and ``reshape``. A float32 array is handed over as it is."""

    def __init__(self, array, code: str) -> None:
        self.array, self.dtype, self.nbytes, self.shape = array, code, array.nbytes, array.shape

    def reshape(self, *shape):
        return self.array.reshape(*shape)


class _Drawn:
    """A stream of ``numel`` entries drawn in blocks of ``block`` entries from the first, on ``drawing``
    (one thread: the blocks in the order asked for) up to ``depth`` blocks ahead of the one in use,
    into ``buffers`` in turn (reused, not allocated per block); a subclass's :meth:`_draw` fills one
    and returns the block. :meth:`runs` hands the entries out in pieces of any size.

    (A method, not a function kept on the object: a bound method of itself kept there would make a
    reference cycle, which only the cyclic garbage collector frees, so each tensor's buffers outlived
    it; a ``random_like`` run held 170 MiB, not 38, at 1.5 GB.)"""

    def __init__(self, numel: int, block: int, depth: int, drawing: ThreadPoolExecutor, buffers: list) -> None:
        self.numel, self.block_size, self.depth = numel, block, depth
        self.drawing, self.buffers = drawing, buffers
        self.block = None  # the block in use
        self.size = 0  # its entries
        self.used = 0  # its entries handed out
        self.asked = 0  # entries whose blocks are drawn or being drawn
        self.ahead: deque[tuple[Future, int]] = deque()
        self.turn = 0
        self._ask()

    def _ask(self) -> None:
        while len(self.ahead) < self.depth and self.asked < self.numel:
            size = min(self.block_size, self.numel - self.asked)
            self.ahead.append((self.drawing.submit(self._draw, size, self.buffers[self.turn % len(self.buffers)]),
                               size))
            self.turn += 1
            self.asked += size

    def runs(self, count: int) -> Iterator[tuple[Any, int, int]]:
        """The next ``count`` entries as ``(block, first entry, entries)`` runs. The next block is
        taken (and one more asked for, into the buffer after those ahead) only as the run after
        it is asked for: a consumer that is done with each run before the next keeps one buffer
        busy, one that holds them all (a list) two."""
        while count:
            if self.used == self.size:
                future, self.size = self.ahead.popleft()
                self.block = future.result()
                self.used = 0
                self._ask()
            first, n = self.used, min(count, self.size - self.used)
            self.used += n
            count -= n
            yield self.block, first, n

    def _draw(self, size: int, buffer):
        raise NotImplementedError


class _Masks(_Drawn):
    """One input's DARE masks over a tensor, handed out in pieces of any size: blocks of
    :data:`tvlang.ops.drops.CHUNK` entries drawn in turn from the tensor's first entry, as
    tvlang.ops.dare.Dropper draws them, so any chunk size gives its masks. The blocks are drawn
    on ``drawing`` (:class:`_Drawn`), up to
    :data:`MASKS_AHEAD` ahead of the one in use, on the other core while this one computes (the
    helper's loop releases the GIL; drawing the masks here took 2 of 5.3 s at 1.5 GB). ``packed``:
    the masks as keep bits (``keep_bits``, a bit an entry; :meth:`take_bits`), for the fused calls."""

    def __init__(self, rule: DropRule, bits, numel: int, drawing: ThreadPoolExecutor, packed: bool = False) -> None:
        self.rule, self.bits, self.packed = rule, bits, packed
        # the blocks' buffers: those drawn ahead, the one in use, and the one before it (a piece
        # that spans two blocks holds a view of its end)
        length = min(DROP_CHUNK, numel)
        buffers = [numpy.empty(-(-length // 8), dtype=numpy.uint8) if packed else
                   numpy.empty(length, dtype=numpy.float32)
                   for _ in range(min(MASKS_AHEAD + 2, -(-numel // DROP_CHUNK)))]
        super().__init__(numel, DROP_CHUNK, MASKS_AHEAD, drawing, buffers)

    def _draw(self, size: int, buffer):
        if self.packed:
            return keep_bits(self.bits, size, self.rule.threshold, buffer)
        return self.rule.mask(self.bits, size, numpy.float32, buffer)

    def take_bits(self, count: int) -> list[tuple[numpy.ndarray, int, int]]:
        """The next ``count`` entries' keep bits (``packed``), as ``(block, first bit, entries)`` runs."""
        return list(self.runs(count))

    def take(self, count: int) -> numpy.ndarray:
        pieces = [block[first:first + n] for block, first, n in self.runs(count)]
        return pieces[0] if len(pieces) == 1 else numpy.concatenate(pieces)


class _Select:
    """One input's k-th largest magnitude among ``numel`` entries, exactly, as the local executor's
    tvlang.ops.threshold.WindowSelect finds it (the same value and tie split, read from the same bit
    patterns): a window of bit patterns guessed from a sample, one pass gathering the entries
    inside it; where the k-th largest falls outside it (or it gathers too many), a histogram of the
    high 16 bits in a pass, then one of the low 16 bits of the entries in the bin found."""

    def __init__(self, k: int, numel: int) -> None:
        self.k, self.numel = k, numel
        self.limit = max(1 << 16, min(numel // 8, 1 << 23))  # entries gathered, as WindowSelect's
        self.stage = "sample"  # then "window", "high", "low"; found: (bits, need, tied)
        self.sample: list[numpy.ndarray] = []
        self.bounds: tuple[int, int | None] = (0, None)
        self.inside: list[numpy.ndarray] = []
        self.above = 0
        self.gathered = 0
        self.counts: numpy.ndarray | None = None
        self.rank = 0
        self.found: tuple[int, int, int] | None = None

    def end_sample(self) -> None:
        bits = numpy.sort(numpy.concatenate(self.sample))
        self.sample = []
        window = window_of(bits, bits.size, self.k, self.numel) if bits.size else None
        if window is None:
            self.stage, self.counts = "high", numpy.zeros(1 << 15, dtype=numpy.int64)
        else:
            self.stage, self.bounds = "window", window

    def feed(self, raw: numpy.ndarray, scratch: numpy.ndarray) -> None:
        """The next piece's magnitudes' bit patterns (``raw``, int32 patterns of the values)."""
        if self.stage == "sample":
            self.sample.append(numpy.bitwise_and(raw, 0x7FFFFFFF))
        elif self.stage == "high":
            self.counts += numpy.bincount(numpy.right_shift(numpy.bitwise_and(raw, 0x7FFFFFFF), 16),
                                          minlength=1 << 15)
        elif self.gathers():
            self.take(*window_gather(raw, *self.bounds, scratch))

    def gathers(self) -> bool:
        """Whether the next piece is gathered from a window (:meth:`take` takes what it gathers)."""
        return self.stage in ("window", "low") and self.gathered <= self.limit

    def take(self, picked: numpy.ndarray, above: int) -> None:
        """A piece's patterns inside the window, and how many lie above it."""
        self.above += above
        if self.stage == "low":
            self.counts += numpy.bincount(numpy.bitwise_and(picked, 0xFFFF), minlength=1 << 16)
        else:
            self.inside.append(picked)
            self.gathered += picked.size

    def end_pass(self) -> None:
        if self.stage == "window":
            found = read_window(self.inside, self.above, self.k) if self.gathered <= self.limit else None
            self.inside, self.above, self.gathered = [], 0, 0
            if found is None:  # the k-th largest is not inside: a radix select's two passes
                self.stage, self.counts = "high", numpy.zeros(1 << 15, dtype=numpy.int64)
            self.found = found
        elif self.stage == "high":
            high, self.rank = pick_bin(self.counts, self.k)
            self.stage, self.bounds = "low", (high << 16, (high << 16) | 0xFFFF)
            self.counts, self.above = numpy.zeros(1 << 16, dtype=numpy.int64), 0
        else:
            low, need = pick_bin(self.counts, self.rank)
            self.found = (self.bounds[0] | low, need, int(self.counts[low]))
            self.counts = None  # (a tensor searched ahead keeps its cuts only: _Ahead)


class _TieWindow:
    """tvlang.ops.common.TieWindow on numpy pieces: the entries of magnitude ``value`` numbered 1, 2,
    ... in flat order over the tensor (a running count from piece to piece); those numbered in
    ``(start, stop]`` take ``x``'s value in ``out``, the others 0."""

    def __init__(self, value: float, start: float, stop: float) -> None:
        self.bits = int(numpy.float32(value).view(numpy.int32))
        self.start, self.stop = start, stop
        self.seen = 0

    def apply(self, x: numpy.ndarray, out: numpy.ndarray) -> None:
        at = numpy.flatnonzero(numpy.bitwise_and(x.view(numpy.int32), 0x7FFFFFFF) == self.bits)
        m = at.size
        if m:
            lo, hi = tie_span(self.start, self.stop, self.seen, m)
            out[at[:lo]] = 0.0
            out[at[hi:]] = 0.0
            out[at[lo:hi]] = x[at[lo:hi]]
        self.seen += m


class _Trims:
    """The trims of a ``ties`` or ``breadcrumbs`` call over one tensor (tvlang.ops.prune.trim with its
    tie windows, as tvlang.ops.chunks' ``_Ties`` and ``_Breadcrumbs``): the k-th largest magnitudes
    they need (``_Select``, found before the main pass), then, a piece at a time, each input's
    entries with ``low <= |x| < high`` kept (torch's ``hardshrink`` at the float below each cut: the
    helper's ``tv_hardshrink_f32`` and ``tv_band_f32``) and the entries tied at a cut kept or not
    by their place in flat order (``_TieWindow``)."""

    def __init__(self, name: str, options: dict, n_inputs: int, numel: int) -> None:
        self.name, self.options, self.n_inputs, self.numel = name, options, n_inputs, numel
        if name == "ties":
            self.k = keep_count(float(options["density"]), numel, options["count"])
            ranks = [self.k]
        else:  # breadcrumbs: the entries ranked top+1 .. top+keep
            self.keep, self.top = breadcrumb_counts(float(options["density"]), float(options["gamma"]), numel,
                                                    options["count"])
            ranks = [self.top + self.keep, self.top] if 0 < self.keep < numel else []
        self.selects = {(i, k): _Select(k, numel) for i in range(n_inputs) for k in ranks if 0 < k < numel}
        self.windows: list[list[_TieWindow]] | None = None  # each input's, once the selects are done
        self.plans: list[tuple[str, float, float]] = []  # each input's trim (_plan), with the windows

    def restart(self) -> None:
        """A pass over the tensor starts: the tie windows count from its first entry."""
        self.windows = None

    def kth(self, i: int, k: int) -> float:
        """The k-th largest magnitude of input ``i`` (``0`` for ``k >= numel``, ``inf`` for ``k == 0``)."""
        if k <= 0:
            return math.inf
        return 0.0 if k >= self.numel else bits_to_float(self.selects[i, k].found[0])

    def split(self, i: int, k: int) -> tuple[int, int]:
        """``(need, tied)`` at the k-th largest magnitude of input ``i``."""
        return self.selects[i, k].found[1:] if 0 < k < self.numel else (0, 0)

    def cuts(self, i: int) -> tuple[float, float] | None:
        """Input ``i``'s kept magnitudes ``[low, high)``; ``None``: keep nothing."""
        if self.name == "ties":
            return None if self.k == 0 else (self.kth(i, self.k), math.inf)
        if self.keep == 0:
            return None
        if self.keep >= self.numel:
            return 0.0, math.inf
        return self.kth(i, self.top + self.keep), self.kth(i, self.top) if self.top > 0 else math.inf

    def _windows(self, i: int) -> list[_TieWindow]:
        if self.name == "ties":
            t = self.kth(i, self.k)
            need, tied = self.split(i, self.k)
            return [_TieWindow(t, 0, need)] if 0.0 < t < math.inf and need < tied else []
        if not 0 < self.keep < self.numel:
            return []
        low, high = self.cuts(i)
        high_split = self.split(i, self.top) if self.top > 0 else (0, 0)
        return [_TieWindow(*w) for w in breadcrumb_windows(low, high, self.split(i, self.top + self.keep),
                                                           high_split)]

    def _plan(self, i: int) -> tuple[str, float, float]:
        """How input ``i`` is trimmed: what to keep, and the floats below its cuts (torch's hardshrink's)."""
        cuts = self.cuts(i)
        if cuts is None:
            return "nothing", 0.0, 0.0
        low, high = cuts
        if low <= 0.0 and high == math.inf:
            return "all", 0.0, 0.0
        if high == math.inf:
            return "above", _below(low), 0.0
        if low > 0.0:
            return "band", _below(low), _below(high)
        return "below", _below(high), 0.0

    def _ready(self) -> None:
        if self.windows is None:  # once a pass: the cuts and tie windows do not change from chunk to chunk
            self.windows = [self._windows(j) for j in range(self.n_inputs)]
            self.plans = [self._plan(j) for j in range(self.n_inputs)]

    def fusable(self) -> bool:
        """Whether the call runs in the helper's fused loop (:func:`_whole_call`): at most FUSED_PARTS inputs."""
        return self.n_inputs <= FUSED_PARTS

    def ties(self) -> list[list[_TieWindow]]:
        """Each input's tie windows in this pass (their counts go on from chunk to chunk)."""
        self._ready()
        return self.windows

    def forms(self) -> list[tuple[int, float, float]]:
        """Each input's trim as the fused loop's ``(form, lo, hi)`` (``tv_fused_merge_f32``)."""
        self._ready()
        return [(_FORMS[keep], lo, hi) for keep, lo, hi in self.plans]

    def trim(self, i: int, x: numpy.ndarray, out: numpy.ndarray, lib) -> None:
        self._ready()
        keep, lo, hi = self.plans[i]
        if keep == "nothing":
            out.fill(0.0)
            return
        if keep == "all":
            out[:] = x
        elif keep == "above":
            lib.tv_hardshrink_f32(x.ctypes.data, len(x), lo, out.ctypes.data)
        elif keep == "band":
            lib.tv_band_f32(x.ctypes.data, len(x), lo, hi, out.ctypes.data)
        else:  # x minus the entries at or above the upper cut, as trim subtracts them
            lib.tv_hardshrink_f32(x.ctypes.data, len(x), lo, out.ctypes.data)
            numpy.subtract(x, out, out=out)
        for window in self.windows[i]:
            window.apply(x, out)


class _L1:
    """``rescale_by="l1"`` of a DARE call over one tensor: each input's L1 norm before and after its
    drop, found in a pass before the main one as tvlang.ops.chunks' ``_Drops`` finds them, and each
    entry's keep flag from that pass (the keep bits drawn, ``keep_bits``, a chunk at a time), so the main pass
    draws no mask again: it multiplies each input by its flags and its factor in one helper loop
    (``tv_flags_scale_f32``, which the local executor calls too). The norms are the helper's block
    sums of magnitudes (tvlang.ops.sums: ``BlockSums(l1=True)``), the block values added by
    ``math.fsum``; the factor is tvlang.ops.drops' ``l1_factor``."""

    def __init__(self, rule: DropRule, masks: list, numel: int, fuses: bool = False) -> None:
        self.rule, self.masks = rule, masks
        # a dare_ties call that draws: its main pass in the helper's fused loop (_drop_call), which
        # makes the inputs whose axpy waits for it (_defers)
        self.fuses = fuses and rule.draws
        n_inputs = len(masks)
        self.norms = [(_AbsSums(numel), _AbsSums(numel)) for _ in range(n_inputs)]  # before, after
        self.flags: list[deque] = [deque() for _ in range(n_inputs)]
        self.factors: list[float | None] = [None] * n_inputs
        self.found = False

    def searching(self) -> bool:
        return not self.found

    def observe(self, pieces: list, scratch: list, lib) -> None:
        """The next entries of the inputs: each one's drop (its masks, drawn on the masks' thread),
        their magnitudes' block sums (:class:`_AbsSums`), the flags."""
        count, rule = len(pieces[0]), self.rule
        for i, (x, source, kept) in enumerate(zip(pieces, self.masks, scratch)):
            kept = kept[:count]
            if rule.draws:  # keep bits (the rule does not rescale): x * 1.0 or x * 0.0, as x * mask
                flags = _chunk_bits(source.take_bits(count))
                lib.tv_flags_scale_f32(x.ctypes.data, flags.ctypes.data, count, 0, 0.0, kept.ctypes.data)
                self.flags[i].append(flags)
            elif rule.keeps_all:
                kept[:] = x
            else:
                kept.fill(0.0)
            before, after = self.norms[i]
            before.add(x, lib)
            after.add(kept, lib)

    def end_pass(self) -> None:
        self.factors = _l1_factors(self.norms)
        self.found = True

    def apply(self, i: int, rule: DropRule, x, part, lib) -> None:
        """Input ``i``'s next ``len(part)`` entries, dropped and scaled, into ``part``."""
        count, factor = len(part), self.factors[i]
        if rule.draws:
            packed = self.flags[i].popleft()  # held here: its memory must outlive the call
            lib.tv_flags_scale_f32(x.ctypes.data, packed.ctypes.data, count, factor is not None,
                                   0.0 if factor is None else factor, part.ctypes.data)
            return
        if rule.keeps_all:
            part[:] = x
        else:
            part.fill(0.0)
        if factor is not None:
            lib.tv_scale_f32(part.ctypes.data, factor, count, part.ctypes.data)


def _chunk_bits(runs: list) -> numpy.ndarray:
    """A chunk's keep bits (:meth:`_Masks.take_bits`' runs, each from a whole byte: a chunk is a whole
    number of BLOCK entries) as one array of their own, as ``numpy.packbits`` packs them."""
    pieces = [block[first // 8:(first + n + 7) // 8] for block, first, n in runs]
    return pieces[0].copy() if len(pieces) == 1 else numpy.concatenate(pieces)


class _Sce:
    """sce over one tensor (tvlang.ops.sce.SceChunks' passes, without torch): with ``0 < select_topk
    < 1``, a pass counts the nonzero variances across the inputs (the helper's tv_variance_f32,
    sce.variance's float64 Welford update, bit for bit) and the histogram of their high 16 bits, a
    second keeps, per chunk, a bit for each variance above the bin of the k-th largest and the
    positions and bits of those inside it; then the selection is the k largest, ties by flat index,
    as SceChunks selects. A last pass before the main one sums each selected input's squares (the
    helper's block sums, as BlockSums); the weights are tvlang.ops.coefficients.sce_weights. The
    main pass selects (``x * flag``: tv_flags_scale_f32, as torch's ``mul`` by the 0/1 mask) and
    erases (tv_sce_erase_f32: sce._erase's torch calls, the same bits)."""

    def __init__(self, options: dict, n_inputs: int, numel: int) -> None:
        self.topk, self.count = float(options["select_topk"]), options["count"]
        self.n, self.numel = n_inputs, numel
        self.selecting = 0.0 < self.topk < 1.0
        self.zero = self.topk <= 0.0  # every input selected to zeros (also with k = 0)
        self.stages = ["count", "gather", "squares"] if self.selecting else [] if self.zero else ["squares"]
        self.stage = 0
        self.histogram = numpy.zeros(1 << 16, dtype=numpy.int64)
        self.nonzero = 0
        self.bin, self.need = 0, 0
        self.above: list = []  # per chunk of the gathering pass: the bits of the variances above the bin
        self.inside: list = []  # per chunk: positions and bit patterns of the variances inside it
        self.masks: list = []  # per chunk: the selection's bits
        self.squares = numpy.empty((n_inputs, -(-numel // BLOCK)), dtype=numpy.float64)
        self.at = self.offset = self.turn = 0  # blocks summed, entries seen, the next chunk's mask
        self.weights = [1.0 / n_inputs] * n_inputs if not self.stages else None

    def searching(self) -> bool:
        return self.stage < len(self.stages)

    def observe(self, pieces: list, scratch: list, lib) -> None:
        """The next entries of the inputs (a whole number of blocks, or the tensor's last)."""
        count = len(pieces[0])
        stage = self.stages[self.stage]
        if stage == "squares":
            for i, part in enumerate(self._selected(pieces, scratch, lib)):
                row = self.squares[i, self.at:]
                lib.tv_block_sums_f32(part.ctypes.data, part.ctypes.data, count, 0, row.ctypes.data)
            self.at += -(-count // BLOCK)
            return
        var = scratch[-1][:count]
        lib.tv_variance_f32(_pointers(pieces), self.n, count, var.ctypes.data)
        high = var.view(numpy.uint32) >> 16  # variances are >= 0: their bits are in their order
        if stage == "count":
            if numpy.isnan(var).any():
                raise _Fallback  # the radix ranks a NaN above everything: the local executor's
            self.nonzero += int(numpy.count_nonzero(var))
            self.histogram += numpy.bincount(high, minlength=1 << 16)
        else:
            self.above.append(numpy.packbits(high > self.bin))
            where = numpy.flatnonzero(high == self.bin)
            self.inside.append((where + self.offset, var.view(numpy.uint32)[where]))
        self.offset += count

    def end_pass(self) -> None:
        stage = self.stages[self.stage]
        self.stage += 1
        self.offset = self.turn = 0
        if stage == "count":
            k = (truncated_count if self.count == "mergekit" else keep_count)(self.topk, self.nonzero)
            if not k:
                self.zero, self.stages, self.weights = True, [], [1.0 / self.n] * self.n
                return
            from_top = numpy.cumsum(self.histogram[::-1])
            position = int(numpy.searchsorted(from_top, k))  # the first bin from the top reaching k
            self.bin = (1 << 16) - 1 - position
            self.need = k - int(from_top[position] - self.histogram[self.bin])
        elif stage == "gather":
            positions = numpy.concatenate([p for p, _ in self.inside])
            values = numpy.concatenate([v for _, v in self.inside]).astype(numpy.int64)
            chosen = numpy.sort(positions[numpy.lexsort((positions, -values))[:self.need]])
            start = 0
            for above in self.above:
                count = min(CHUNK_ELEMENTS, self.numel - start)
                bits = numpy.unpackbits(above, count=count)
                mine = chosen[(chosen >= start) & (chosen < start + count)]
                bits[mine - start] = 1
                self.masks.append(numpy.packbits(bits))
                start += count
            self.above = self.inside = []
        else:
            self.weights = sce_weights([total / self.numel for total in _exact_sums(self.squares)])

    def _selected(self, pieces: list, scratch: list, lib) -> list:
        """The inputs' next entries times the selection (the 0/1 mask of sce's ``tvs.mul_``)."""
        if not self.selecting and not self.zero:
            return pieces
        count = len(pieces[0])
        parts = [buffer[:count] for buffer in scratch[:self.n]]
        if self.zero:
            for x, part in zip(pieces, parts):
                lib.tv_scale_f32(x.ctypes.data, 0.0, count, part.ctypes.data)
            return parts
        packed = self.masks[self.turn]
        self.turn += 1
        for x, part in zip(pieces, parts):
            lib.tv_flags_scale_f32(x.ctypes.data, packed.ctypes.data, count, 0, 0.0, part.ctypes.data)
        return parts

    def apply(self, pieces: list, target, scratch: list, lib) -> None:
        parts = self._selected(pieces, scratch, lib)
        weights = numpy.array(self.weights, dtype=numpy.float32)  # torch's alpha=w: the float32 of each
        lib.tv_sce_erase_f32(_pointers(parts), self.n, len(target), weights.ctypes.data, target.ctypes.data)


def _pointers(parts: list):
    """The arrays' data addresses as a C array of pointers (the arrays held by the caller)."""
    return (ctypes.c_void_p * len(parts))(*[part.ctypes.data for part in parts])


_SQUARE = numpy.zeros(2, dtype=numpy.int32)  # the one pair (0, 0), as tv_gram_sums_f32 takes its pairs


class _Noise:
    """random_like over one tensor (tvlang.ops.chunks' ``_RandomLike``, without torch): standard
    Gaussian noise from numpy's ``Generator`` over the tensor's ``bits(seed)`` stream (float32,
    entry after entry: any pieces give the same noise; drawn by the helper, ``normal_f32``, where
    its first check passed), its squares and the input's summed in the
    pass before the main one (the helper's block sums), ``noise_scale`` of the two
    (tvlang.ops.coefficients); the main pass takes the same noise again, drawn from a fresh generator
    on ``drawing`` (the thread of DARE's masks, which no DARE call shares here: :func:`_runnable`) in
    blocks of NOISE_BLOCK entries, NOISE_AHEAD ahead of the one in use, and multiplies it by the
    scale (torch's ``mul_``: one float32 product). Drawn on this thread, the noise took a quarter of
    the main pass's time, the thread that bounds the run (docs/performance-operators.md)."""

    def __init__(self, options: dict, numel: int, context: TensorContext, drawing: ThreadPoolExecutor) -> None:
        self.seed, self.context, self.numel, self.drawing = options["seed"], context, numel, drawing
        self.bits = context.bits(self.seed)
        self.rng = numpy.random.Generator(self.bits)
        self.sums = numpy.empty((2, -(-numel // BLOCK)), dtype=numpy.float64)  # the input's squares, the noise's
        self.at = 0
        self.scale: float | None = None
        self.drawn: _NoiseBlocks | None = None  # the main pass's noise, from end_pass on
        self.taken = False  # whether ``drawn`` has been taken from (:meth:`rewind`)
        self.block: numpy.ndarray | None = None  # the helper's block of differences (observe)

    def observe(self, pieces: list, scratch: list, lib) -> None:
        x = pieces[0]
        count = len(x)
        noise = scratch[0][:count]
        _normal(self.bits, self.rng, count, noise)
        squares = self.sums[0, self.at:]
        base = _differences([x])
        if base is not None:  # x = m - b, unmade (_Axpy): the differences made a block at a time, as _Gram's
            if self.block is None:  # (one block for every chunk, held here while the helper writes it)
                self.block = numpy.empty(BLOCK, dtype=numpy.float32)
            lib.tv_gram_sums_f32(_pointers([x.value]), 1, base.ctypes.data, _SQUARE.ctypes.data, 1, count,
                                 squares.size, squares.ctypes.data, self.block.ctypes.data)
        else:
            x = _made([x], lib)[0]
            lib.tv_block_sums_f32(x.ctypes.data, x.ctypes.data, count, 0, squares.ctypes.data)
        lib.tv_block_sums_f32(noise.ctypes.data, noise.ctypes.data, count, 0, self.sums[1, self.at:].ctypes.data)
        self.at += -(-count // BLOCK)

    def searching(self) -> bool:
        return self.scale is None

    def end_pass(self) -> None:
        self.scale = noise_scale(_exact_sums(self.sums))
        self.bits = self.rng = None  # the main pass draws the same noise from a fresh stream
        self.drawn = _NoiseBlocks(self.context.bits(self.seed), self.numel, self.drawing)

    def rewind(self) -> None:
        """The noise from the tensor's first entry again, for a pass that takes this call's result
        after one that took it already (``slerp(random_like(x), y)``: slerp's sums' pass, then the
        main pass): a fresh stream of blocks, where the one there has been taken from."""
        if self.taken:
            self.drawn = _NoiseBlocks(self.context.bits(self.seed), self.numel, self.drawing)
            self.taken = False

    def apply(self, pieces: list, target, lib) -> None:
        self.taken = True
        at = 0
        for block, first, n in self.drawn.runs(len(target)):
            lib.tv_scale_f32(block.ctypes.data + 4 * first, self.scale, n, target.ctypes.data + 4 * at)
            at += n


def _normal(bits, rng, count: int, out) -> None:
    """The next ``count`` standard Gaussians (float32) of ``bits`` into ``out``: the helper's
    ``normal_f32`` where its first check passed, else ``rng`` (numpy's ``Generator`` over ``bits``)."""
    if normal_f32(bits, count, out) is None:
        rng.standard_normal(count, dtype=numpy.float32, out=out[:count])


class _NoiseBlocks(_Drawn):
    """random_like's noise for the main pass (:class:`_Noise`): the Gaussians of ``bits`` in blocks of
    NOISE_BLOCK entries, NOISE_AHEAD ahead of the one in use; the buffers those ahead and the one in
    use (:meth:`_Noise.apply` is done with each run before it asks for the next)."""

    def __init__(self, bits, numel: int, drawing: ThreadPoolExecutor) -> None:
        self.bits, self.rng = bits, numpy.random.Generator(bits)
        buffers = [numpy.empty(min(NOISE_BLOCK, numel), dtype=numpy.float32)
                   for _ in range(min(NOISE_AHEAD + 1, -(-numel // NOISE_BLOCK)))]
        super().__init__(numel, NOISE_BLOCK, NOISE_AHEAD, drawing, buffers)

    def _draw(self, size: int, buffer):
        _normal(self.bits, self.rng, size, buffer)
        return buffer


class _AbsSums:
    """The L1 norm of a tensor handed over in pieces of any length, in order, as tvlang.ops.sums'
    ``BlockSums(l1=True)`` finds it: the helper's block sums of magnitudes (``tv_block_sums_f32``) over
    blocks of BLOCK entries counted from the tensor's first, a block that a piece's end cuts completed
    from the next piece (its first entries held here), the blocks' values added exactly
    (:meth:`total`, ``math.fsum``: the exact sum, rounded once, as ``ExactSum``). So pieces of whole
    rows (della's chunks), cut anywhere in a block, give the local executor's norm bit for bit."""

    def __init__(self, numel: int) -> None:
        self.sums = numpy.empty(-(-numel // BLOCK), dtype=numpy.float64)
        self.at = 0  # blocks summed
        self.held = numpy.empty(min(numel, BLOCK), dtype=numpy.float32)  # a cut block's first entries
        self.holding = 0
        self.lib = None

    def add(self, x, lib) -> None:
        """The tensor's next ``len(x)`` entries."""
        self.lib = lib
        count, done = len(x), 0
        if self.holding:
            done = min(BLOCK - self.holding, count)
            self.held[self.holding:self.holding + done] = x[:done]
            self.holding += done
            if self.holding < BLOCK:
                return
            self._sum(self.held, BLOCK)
            self.holding = 0
        whole = (count - done) // BLOCK * BLOCK
        if whole:
            self._sum(x[done:], whole)
        rest = count - done - whole
        if rest:
            self.held[:rest] = x[done + whole:]
            self.holding = rest

    def _sum(self, values, count: int) -> None:
        self.lib.tv_block_sums_f32(values.ctypes.data, values.ctypes.data, count, 1,
                                   self.sums[self.at:].ctypes.data)
        self.at += -(-count // BLOCK)

    def total(self) -> float:
        """The norm, once every entry is added (the last block may be short: zeros past its end)."""
        if self.holding:
            self._sum(self.held, self.holding)
            self.holding = 0
        return math.fsum(self.sums[:self.at].tolist())


def _l1_factors(norms: list) -> list[float | None]:
    """Each input's L1 factor (tvlang.ops.drops' ``l1_factor``) from its norms before and after
    (:class:`_AbsSums` pairs); a norm that is not finite gives the run to the local executor (its sums
    keep an infinity apart)."""
    totals = [(before.total(), after.total()) for before, after in norms]
    if not all(math.isfinite(value) for pair in totals for value in pair):
        raise _Fallback
    return [l1_factor(before, after) for before, after in totals]


class _PassJobs:
    """One chunk of a della L1 pass (:meth:`_Della.observe`) as jobs that any thread takes in turn
    (:meth:`run`) until none is left: for each input, the block sums of its magnitudes, then its rows
    sampled in blocks of about ROW_BLOCK entries (``tvlang.ops.magprune.sample``: each block its
    words after its own start, the last one from the input's stream itself, which it leaves after the
    chunk); the thread that ends an input's last block packs its keep flags for the main pass and
    sums its sample's magnitudes. Each :class:`_AbsSums` takes one piece a chunk, and a chunk's jobs
    all end before the next chunk's start, so every norm sums its pieces in order."""

    def __init__(self, della: _Della, pieces: list, scratch: list, lib) -> None:
        count = len(pieces[0])
        self.lock = threading.Lock()
        self.jobs: list[Callable[[], None]] = []
        self.taken = 0
        self.left: list[int] = []  # each input's blocks not ended yet
        for i, (x, kept) in enumerate(zip(pieces, scratch)):
            kept = kept[:count]
            before, after = della.norms[i]
            flags = numpy.empty(count, dtype=numpy.uint8) if della.saved is not None else None
            stream = della.passing[i]
            first = stream.copy()  # every block's words are counted from here
            self.jobs.append(functools.partial(before.add, x, lib))
            bounds = row_blocks(count, della.m)
            self.left.append(len(bounds))
            for start, stop in bounds:
                self.jobs.append(functools.partial(
                    self._block, della, lib, i, stream if stop == count else first.copy(), x, kept, flags, start,
                    stop, functools.partial(self._input_done, della, lib, i, after, kept, flags)))

    def _block(self, della: _Della, lib, i: int, st, x, kept, flags, start: int, stop: int, done) -> None:
        sample(lib, st, start, x.ctypes.data + 4 * start, stop - start, della.m, della.density, della.epsilon, False,
               kept.ctypes.data + 4 * start, None if flags is None else flags[start:])
        with self.lock:
            self.left[i] -= 1
            last = self.left[i] == 0
        if last:
            done()

    @staticmethod
    def _input_done(della: _Della, lib, i: int, after: _AbsSums, kept, flags) -> None:
        if flags is not None:
            della.saved[i].append(numpy.packbits(flags))
        after.add(kept, lib)

    def run(self) -> None:
        """Jobs on this thread until none is left (another thread may be taking them too)."""
        while True:
            with self.lock:
                if self.taken == len(self.jobs):
                    return
                job = self.jobs[self.taken]
                self.taken += 1
            job()


class _Della:
    """della or della_linear over one tensor (tvlang.ops.della's chunk form, without torch): each input's
    MAGPRUNE by the helper (:func:`tvlang.ops.magprune.sample`; input ``i``'s words where input
    ``i-1``'s end in the stream of ``bits(seed)``), then
    della's sign merge (the helper's, as tvlang.ops.ties.sign_merge calls it with unit weights; with
    the step that takes it where ``lambda`` is 1: ``_merge_into``) or della_linear's sum (torch's
    ``add_`` from zeros: the helper's axpy), then ``lambda`` (torch's ``mul_``: one float32 product).
    Chunks hold whole rows (:func:`_chunk_size`) and come in order; :meth:`work` hands out a chunk's
    rows as :class:`RowBlocks`, which both threads take from. Where the density is strictly between 0
    and 1 and there are at most DELLA_PARTS inputs (:attr:`fuses`), a block runs in one helper loop
    (:meth:`_fused`), which also makes the inputs whose ``axpy`` waits for the call; else call by call
    (:meth:`_rows`). With ``rescale_by="l1"`` (:attr:`l1`) a pass before the main one samples each
    input and sums its magnitudes before and after (:meth:`observe`, tvlang.ops.della's pass); the
    main pass scales each input's sample by its factor, from the keep flags that pass kept."""

    def __init__(self, options: dict, n_inputs: int, numel: int, m: int, context: TensorContext,
                 drawing: ThreadPoolExecutor) -> None:
        self.options, self.m = options, m
        self.density, self.epsilon = float(options["density"]), float(options["epsilon"])
        self.factor = float(options["lambda"])
        self.helper = drawing if (os.cpu_count() or 1) > 1 else None
        # each input's stream at the tensor's first entry: a block's words are those after its own start
        self.starts = [stream_words(bits) for bits in input_bits(context, options["seed"], n_inputs, numel)]
        self.offset = 0  # the tensor's entries before the next chunk
        # rescale_by="l1" (where 0 < density < 1, as tvlang.ops.della's): kept entries unchanged by the
        # sampling, each input scaled by the factor its norms' pass finds (observe, end_pass)
        self.l1 = options["rescale"] is True and options["rescale_by"] == "l1" and 0.0 < self.density < 1.0
        self.rescale = options["rescale"] and not self.l1
        if self.l1:
            self.norms = [(_AbsSums(numel), _AbsSums(numel)) for _ in range(n_inputs)]  # before, after
            # the pass's keep flags (a bit an entry, a chunk at a time), where every input's take at most
            # SAVED_BITS_LIMIT bytes (as the local executor decides); else the main pass samples again
            self.saved = ([deque() for _ in range(n_inputs)]
                          if n_inputs * ((numel + 7) // 8) <= SAVED_BITS_LIMIT else None)
            self.passing = [start.copy() for start in self.starts]  # the pass's streams, chunk after chunk
            self.scales: list[float | None] = [None] * n_inputs
            self.found = False
            self.pending: tuple[_PassJobs, Future] | None = None  # a chunk's pass jobs still running (observe)
        # 0 < density < 1, no L1 rule and at most DELLA_PARTS inputs: each block of rows in one helper
        # loop (_fused), which also makes the inputs whose axpy waits for the call (_defers)
        self.fuses = 0.0 < self.density < 1.0 and not self.l1 and n_inputs <= DELLA_PARTS
        # della (an election) with the L1 rule and its flags kept: each block of the main pass in the
        # helper's fused merge loop (_l1_fused), which also makes the inputs whose axpy waits for it
        self.l1_fuses = self.l1 and self.saved is not None and "elect" in options and n_inputs <= FUSED_PARTS
        if self.fuses:
            self.states = numpy.concatenate(self.starts)  # each input's six words in turn
            self.ramp = ramp(m, self.density, self.epsilon)
            self.merge = (False, -1)  # della_linear: the sum
            if "elect" in options:
                self.merge = (options["elect"] == "frequency", MERGE_CODES[options["merge"]])

    def work(self, pieces: list, parts: list, target, taker: tuple | None, lib, waiting: dict) -> RowBlocks:
        """The next chunk's rows (``target``'s length of entries), to be run by :meth:`RowBlocks.run`.
        ``waiting``: by position, ``(b, coef)`` of the inputs whose ``axpy`` waits for the call (where
        it :attr:`fuses`): the input is ``fma(b, coef, piece)``."""
        offset, self.offset = self.offset, self.offset + len(target)
        if self.fuses:
            return RowBlocks(len(target), self.m, self.helper, lambda start, stop: self._fused(
                pieces, waiting, target, taker, lib, start, stop - start, offset))
        if self.l1_fuses:  # the pass's flags: no ranking, blocks of whole flag bytes
            packed = [flags.popleft() for flags in self.saved]
            return RowBlocks(len(target), 8, None, lambda start, stop: self._l1_fused(
                pieces, waiting, packed, target, taker, lib, start, stop))
        if self.l1 and self.saved is not None:  # (della_linear)
            packed = [flags.popleft() for flags in self.saved]
            return RowBlocks(len(target), 8, None, lambda start, stop: self._rows(
                pieces, parts, target, taker, lib, start, stop, offset, packed))
        return RowBlocks(len(target), self.m, self.helper, lambda start, stop: self._rows(
            pieces, parts, target, taker, lib, start, stop, offset))

    def searching(self) -> bool:
        """Whether the L1 norms' pass is still to run (``rescale_by="l1"``)."""
        return self.l1 and not self.found

    def observe(self, pieces: list, scratch: list, lib) -> None:
        """The L1 norms' pass, the next chunk (whole rows, in order): each input's MAGPRUNE without a
        division (``x`` times its keep flag, as tvlang.ops.della's pass), in blocks of rows, each its
        own words (:func:`tvlang.ops.magprune.sample`); the magnitudes' block sums of the input and of
        its sample (:class:`_AbsSums`); the keep flags packed for the main pass (:class:`_PassJobs`).
        With a second thread the chunk's jobs start there and this call returns: the pass reads the
        next chunk (into the other workspace: :func:`_whole_pass`) while that thread samples, and the
        next call (or :meth:`end_pass`) first takes what is left of this chunk's jobs and waits for them
        (:meth:`settle`), so the norms and the kept flags keep the chunks' order. (Each block of rows
        making and sampling every input, then the block sums shared by both threads too, took 1.08x the
        time at 0.75 GB: 4.49-4.65 s against 4.12-4.21.)"""
        self.settle()
        jobs = _PassJobs(self, pieces, scratch, lib)
        if self.helper is None:
            jobs.run()
            return
        self.pending = (jobs, self.helper.submit(jobs.run))

    def settle(self) -> None:
        """The jobs of the chunk before, those left taken on this thread, all of them waited for."""
        if self.pending is None:
            return
        jobs, task = self.pending
        self.pending = None
        try:
            jobs.run()
        finally:
            task.result()

    def end_pass(self) -> None:
        self.settle()
        self.scales = _l1_factors(self.norms)
        self.found = True

    def _l1_fused(self, pieces: list, waiting: dict, packed: list, target, taker: tuple | None, lib, start: int,
                  stop: int) -> bool | None:
        """della with the L1 rule over the chunk's entries ``start:stop`` (``start`` a whole number of
        bytes of the flags ``packed``) in one helper loop (``tv_fused_merge_f32``'s form 6): each input
        made (the ``axpy`` of ``waiting``), times its flags and then its factor (tv_flags_scale_f32's two
        products), the sign merge, the step that takes it; else ``lambda`` after (tv_scale_f32). Whether
        an entry of the result is not finite (``None`` where ``lambda`` came after the loop's check)."""
        count = stop - start
        inputs = [(piece[start:stop], waiting[i][0][start:stop] if i in waiting else None,
                   waiting[i][1] if i in waiting else 0.0) for i, piece in enumerate(pieces)]
        forms = [(_L1_BITS, 1.0 if factor is None else factor, 0.0) for factor in self.scales]
        if taker is not None:
            result, base, first, c = taker
            taker = (result[start:stop], base[start:stop], first, c)
        out = target[start:stop]
        bad = _whole_call(lib, count, inputs, forms, taker, out, options=self.options,
                          runs=[[(bits, start, count)] for bits in packed])
        if taker is None and self.factor != 1.0:
            lib.tv_scale_f32(out.ctypes.data, self.factor, count, out.ctypes.data)
            return None
        return bad

    def _rows(self, pieces: list, parts: list, target, taker: tuple | None, lib, start: int, stop: int,
              offset: int, packed: list | None = None) -> None:
        """The call over the chunk's entries ``start:stop`` (whole rows), each input's words those after
        the tensor's ``offset + start`` first; with ``rescale_by="l1"``, each input's sample scaled by its
        factor, from the pass's keep flags where it kept them (``packed``: this chunk's, by input;
        ``start`` a whole number of bytes of them), in one helper loop (tv_flags_scale_f32, the local
        executor's), else sampled again (the same flags) and scaled (one float32 product each, torch's
        ``mul_``)."""
        count = stop - start
        span = slice(start, stop)
        parts = [part[span] for part in parts]
        for i, (x, part, st) in enumerate(zip(pieces, parts, self.starts)):
            if self.density >= 1.0:
                part[:] = x[span]
            elif self.density <= 0.0:
                part[:] = 0.0
            elif packed is not None:
                factor = self.scales[i]
                lib.tv_flags_scale_f32(x[span].ctypes.data, packed[i][start // 8:].ctypes.data, count,
                                       factor is not None, 0.0 if factor is None else factor, part.ctypes.data)
            else:
                sample(lib, st.copy(), offset + start, x[span].ctypes.data, count, self.m, self.density,
                       self.epsilon, self.rescale, part.ctypes.data, None)
                if self.l1 and self.scales[i] is not None:
                    lib.tv_scale_f32(part.ctypes.data, self.scales[i], count, part.ctypes.data)
        out = target[span]
        if "elect" not in self.options:  # della_linear: the sum
            out[:] = 0.0
            for part in parts:
                lib.tv_axpy_f32(out.ctypes.data, part.ctypes.data, 1.0, count)
        elif taker is not None:
            result, base, first, c = taker
            _merge_into(self.options, parts, (result[span], base[span], first, c), lib)
            return
        else:
            _sign_merge(self.options, parts, out, lib)
        if self.factor != 1.0:
            lib.tv_scale_f32(out.ctypes.data, self.factor, count, out.ctypes.data)

    def _fused(self, pieces: list, waiting: dict, target, taker: tuple | None, lib, start: int, count: int,
               offset: int) -> bool:
        """della or della_linear over the chunk's entries ``start:start+count`` in one helper loop, row by
        row (``tv_della_rows_f32``): each input made (the ``axpy`` of ``waiting``), its MAGPRUNE, the sign
        merge or the sum, then the step that takes it or ``lambda``: the same operations as the steps
        and :meth:`_rows` one at a time. Whether an entry of the result is not finite."""
        m, k = self.m, len(pieces)
        scratch = numpy.empty(SCRATCH * m + 32 + ((k + 1) * m + 1) // 2, dtype=numpy.uint64)
        if taker is not None:
            result, base, first, coef = taker
            out, base_at = result[start:start + count], base[start:].ctypes.data
        else:
            out, base_at, first, coef = target[start:start + count], None, 1.0, 1.0
        a = (ctypes.c_void_p * k)(*[piece[start:].ctypes.data for piece in pieces])
        b = (ctypes.c_void_p * k)(*[waiting[i][0][start:].ctypes.data if i in waiting else None for i in range(k)])
        cb = (ctypes.c_float * k)(*[waiting[i][1] if i in waiting else 0.0 for i in range(k)])
        return bool(lib.tv_della_rows_f32(a, b, cb, self.states.ctypes.data, offset + start, k, count // m, m,
                                          *self.ramp, int(self.rescale), *self.merge, self.factor, base_at, first,
                                          coef, scratch.ctypes.data, out.ctypes.data))


def _pipelines(program) -> bool:
    """Whether the main pass runs as :func:`_pipelined`: a della call, and no other call, where a
    second thread can run (the one della call is then on every chunk's way to its writes)."""
    calls = [step for step in program.steps if step.op == "call"]
    return (os.cpu_count() or 1) > 1 and len(calls) == 1 and calls[0].name in DELLA_CALLS


def _pipelined(program, bound: _Bound, every: list, workspaces: list, writers: dict, models: list, lib,
               drawing: ThreadPoolExecutor, num_layers: int | None, fused: _Fusions, check: bool, bar,
               read: dict, outputs: int) -> None:
    """The main pass of a della program (:func:`_pipelines`) with a chunk's reads beside the rows of the
    one before: each chunk is read and made ready up to its della call (:func:`_steps`, in one of two
    workspaces in turn), its row blocks handed to the second thread (:class:`RowBlocks`), and only
    then does this thread join the blocks left of the chunk before, wait for them, and run that
    chunk's steps after the call (its write). So the second thread samples while this one reads,
    and the two share a chunk's rows as they come; the writes keep their order. A tensor that
    is not computed (copied, or empty) waits for the chunk before it to be written."""
    pending = None  # the chunk whose rows are out: (its steps left, its blocks, the second thread's task, info)

    def settle() -> None:
        nonlocal pending
        if pending is None:
            return
        rest, blocks, task, done = pending
        pending = None
        blocks.finish(task)
        for _ in rest:  # the steps after the call: one della call a chunk, so no second yield
            raise AssertionError("a second della call in one chunk")
        if done is not None and bar:
            bar.advance(done.name, read[done.name] * outputs)

    chunk = 0
    for position, info in enumerate(every):
        numel = _numel(info.shape)
        if info.dtype not in _FLOATS or numel == 0:
            settle()
            _write_uncomputed(bound.readers[bound.base], info, writers, models)
            if bar:
                bar.advance(info.name, read[info.name] * outputs)
            continue
        streams = _streams(program, info.name, numel, drawing, num_layers, fused.packed, info.shape)
        step = _chunk_size(program, info)
        for start in range(0, numel, step):
            buffers, halves, drops = workspaces[chunk % 2]
            chunk += 1
            rest = _steps(program, bound, info, start, min(numel - start, step), buffers, halves, drops, streams,
                          writers, lib, check=check, fused=fused)
            blocks = next(rest)  # read, up to the della call
            task = blocks.start()
            settle()
            pending = (rest, blocks, task, info if start + step >= numel else None)
    settle()


WRITES_AHEAD = 2  # chunks whose writes may wait on the writing thread (_overlapped: one workspace more)


def _idle_second_core(program) -> bool:
    """Whether the main pass runs as :func:`_overlapped` (its writes on a thread of their own) and
    reads its chunks as views of the mapped files (:meth:`_Input.view`): where a second core can
    run that thread and has nothing else to do, a program with no call but NATIVE_CALLS' (the
    calls that draw masks, find thresholds or sums ahead, or sample rows, keep it busy).

    With a call that does, either change made the run slower at 1.5 GB on the AMD machine
    (alternating runs, the sixteenth round, docs/performance-operators.md): ``ties`` 3.25 s with
    both against 2.58 s with neither, ``slerp`` 2.80 against 2.30 s, ``dare`` 2.39-2.49 against
    2.26 s; plain task arithmetic took 1.37-1.47 s with both against 1.70-1.80 s without. (On an
    Intel processor, or an AMD one of Zen 4 or later, such a program reads views all the same:
    :func:`_views_beside_calls`.)"""
    return (os.cpu_count() or 1) > 1 and all(step.name in NATIVE_CALLS for step in program.steps
                                             if step.op == "call")


def _writes_beside_masks(program) -> bool:
    """Whether the main pass runs as :func:`_overlapped` with its writes on the masks' thread (the
    ``drawing`` executor, whose one thread then takes the writes and the mask blocks in the order
    they are handed to it): where a second core can run it, a program with a DARE call and no call
    but DARE calls without ``rescale_by="l1"`` and NATIVE_CALLS' (no pass before the main one, no
    della rows, nothing else on the second core).

    The masks took about a third of that core (a fifth of the samples of a ``dare`` run at 0.75 GB
    on the Intel machine of the twenty-sixth round, docs/performance-operators.md) while the main
    thread computed and wrote each chunk; at 1.5 GB, alternating with the commit before, ``dare``
    took 0.83 of the time (lower in each of five rounds) and ``dare_ties`` 0.95. A writing thread
    of its own beside the masks' thread (three threads on two cores) had made both slower (1.06x,
    the twenty-third round)."""
    calls = [step for step in program.steps if step.op == "call"]
    return ((os.cpu_count() or 1) > 1 and any(step.name in DROP_CALLS for step in calls)
            and all(step.name in NATIVE_CALLS or step.name in DROP_CALLS and not _l1_call(step) for step in calls))


def _views_beside_calls(program) -> bool:
    """Whether a program whose calls keep the second core busy (thresholds or sums found ahead, masks
    drawn ahead) reads its chunks as views of the mapped files too, not into buffers (``pread``):
    VIEWS_BESIDE_CALLS where it is set, else as the processor says (:func:`_views_processor`), and
    never beside a della call. The pass before the main one (_Ahead) reads as the main pass does."""
    if any(step.op == "call" and step.name in DELLA_CALLS for step in program.steps):
        return False
    if VIEWS_BESIDE_CALLS is not None:
        return VIEWS_BESIDE_CALLS
    return _views_processor()


@functools.cache
def _views_processor() -> bool:
    """:func:`views_suit` of this machine's /proc/cpuinfo (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return views_suit(info)
    except OSError:
        return False


ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))  # AMD family 25's Zen 4 models


def views_suit(cpuinfo) -> bool:
    """Whether the processor that ``cpuinfo`` (the lines of /proc/cpuinfo) describes first is one
    where views beside the calls were measured faster than reads into buffers: an Intel processor
    (``vendor_id`` GenuineIntel), or an AMD one of Zen 4 or later (``cpu family`` 26 and later, or
    25 with a ``model`` of ZEN4_MODELS); not an earlier AMD one (Zen 3 is family 25's other
    models), nor any other (where it was not measured).

    Measured on four machines (docs/performance-operators.md): on a 2-vCPU Intel Xeon (twenty-second
    round), alternating at 0.75, 1.5 and 3 GB, views took 0.71-0.88 of the time for ``dare_ties`` and
    ``dare``, 0.82-0.96 for ``slerp``, 0.88-0.98 for ``model_stock``, 0.87-1.01 for ``random_like``,
    0.93-1.11 for ``ties``, 1.00-1.04 for ``breadcrumbs``, and 1.00-1.08 for ``della`` (whose rows
    both threads compute from the chunk read); on a 2-vCPU AMD EPYC of family 26 (twenty-fourth round,
    1.5 GB) 0.91 for ``dare``, 0.84 for ``dare_ties``, 0.82 for ``ties``, 0.95 for ``random_like``,
    0.97 for ``breadcrumbs``, 1.04 for ``slerp``; on a 2-vCPU AMD EPYC of family 25, model 17 (Zen 4,
    twenty-seventh round) at 1.5 GB 0.74 for ``dare_ties``, 0.83 for ``dare``, 0.84 for ``ties``, 0.91
    for ``random_like``, 0.97 for ``slerp``, and at 3 GB 0.82 for ``dare_ties``, 0.84 for ``ties``,
    0.85 for ``breadcrumbs``, 0.87 for ``model_stock``, 1.17 for ``dare`` (one rule for every call
    that keeps the second core busy, as on Zen 5); on an earlier 2-vCPU
    AMD EPYC (its family and model not recorded), in the sixteenth and twentieth rounds, they made
    ``dare``, ``ties`` and ``slerp`` slower (``dare`` 2.61 against 2.25 s at 1.5 GB)."""
    vendor = family = model = None
    for line in cpuinfo:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key == "cpu family" and family is None:
            family = value.strip()
        elif key == "model" and model is None:
            model = value.strip()
        elif not key and vendor is not None:  # the end of the first processor's lines
            break
    if vendor == "GenuineIntel":
        return True
    if vendor != "AuthenticAMD" or family is None or not family.isdigit():
        return False
    if int(family) >= 26:
        return True
    return (int(family) == 25 and model is not None and model.isdigit()
            and any(int(model) in models for models in ZEN4_MODELS))


def _writing_thread() -> ThreadPoolExecutor:
    """The writing thread of :func:`_overlapped`, its thread started (and waited for) before any
    output's temporary exists. An interrupt (Ctrl-C) that lands while an executor starts its
    thread leaves that thread running a task the executor does not know of, which its shutdown
    does not wait for: the writing thread could then write into an output's temporary while it is
    removed, and leave it behind."""
    writing = ThreadPoolExecutor(1, thread_name_prefix="tvlang-writes")
    writing.submit(int).result()
    return writing


def _overlapped(program, bound: _Bound, every: list, workspaces: list, writers: dict, models: list, lib,
                writing: ThreadPoolExecutor, drawing: ThreadPoolExecutor, num_layers: int | None, fused: _Fusions,
                check: bool, bar, read: dict, outputs: int) -> None:
    """The main pass with its writes on a second thread (``writing``: one of their own, or the masks'
    thread that draws a DARE call's blocks ahead, :func:`_writes_beside_masks`): this thread reads and computes each
    chunk in the next of WRITES_AHEAD + 1 workspaces in turn and hands the chunk's writes over
    (:func:`_emit`); before it takes a workspace again, the writes from it are done. The writing
    thread runs its work in the order handed to it, so the writes keep their order; a tensor not
    computed is copied by this thread once every write handed over is done (its reads would
    otherwise share a source's descriptor between the threads). The writing thread's errors (a
    full disk) come back here at the next chunk, or at the end; on any error, or Ctrl-C, the work
    not started is dropped and the running one waited for before the caller withdraws the outputs.

    As the main pass without it, each tensor's streams come from :class:`_Following`.

    Reading on that thread as well, a chunk or two ahead, was slower (1.50-1.55 s against
    1.29-1.46 s at 1.5 GB, docs/performance.md): the chunk read by one core is computed on the other."""
    base = bound.readers[bound.base]
    writes: deque[Future] = deque()  # the chunks' writes handed over, oldest first, not yet seen done
    following = _Following(program, every, drawing, num_layers, fused.packed)

    def settle(left: int) -> None:  # wait until at most ``left`` writes are not done; raise their errors
        while len(writes) > left or writes and writes[0].done():
            writes.popleft().result()

    try:
        turn = 0
        for position, info in enumerate(every):
            numel = _numel(info.shape)
            if info.dtype not in _FLOATS or numel == 0:
                settle(0)  # the writing thread idle: this thread copies it (the writers are not shared)
                _write_uncomputed(base, info, writers, models)
            else:
                streams = following.streams(position)
                step = _chunk_size(program, info)
                for start in range(0, numel, step):
                    following.ask_next(position, streams)
                    # the writes run in order: with fewer than len(workspaces) left, this workspace's are done
                    settle(len(workspaces) - 1)
                    buffers, halves, drops = workspaces[turn % len(workspaces)]
                    turn += 1
                    emitted: list = []
                    _chunk(program, bound, info, start, min(numel - start, step), buffers, halves, drops, streams,
                           writers, lib, check=check, fused=fused, emit=emitted.append)
                    writes.append(writing.submit(_emit, emitted))
            if bar:
                bar.advance(info.name, read[info.name] * outputs)
        settle(0)
    finally:
        writing.shutdown(wait=True, cancel_futures=True)


def _emit(writes: list) -> None:
    """A chunk's writes, ``(writer, name, piece)`` each, in order (on the writing thread of :func:`_overlapped`)."""
    for writer, name, piece in writes:
        writer.write_part(name, piece)


def _has_della(program) -> bool:
    return any(step.op == "call" and step.name in DELLA_CALLS for step in program.steps)


def _chunk_size(program, info) -> int:
    """Entries per chunk of tensor ``info``: CHUNK_ELEMENTS, or for a program with a della call the
    most whole rows that fit (:func:`_rows_fit` has checked that one does)."""
    if not _has_della(program):
        return CHUNK_ELEMENTS
    m = row_length(info.shape)
    return max(1, CHUNK_ELEMENTS // m) * m if m else CHUNK_ELEMENTS


def _rows_fit(program, every: list) -> bool:
    """Whether a chunk holds a whole row of every floating-point tensor, where the program has a della
    call (its rows are sampled whole; a longer one is the local executor's)."""
    if not _has_della(program):
        return True
    return all(row_length(info.shape) <= CHUNK_ELEMENTS for info in every if info.dtype in _FLOATS)


class _Gram:
    """A GRAM_CALLS call over one tensor: the sums of squares and products of its inputs (of
    model_stock's offsets ``m_i - base``), then its coefficients, then the weighted sum.

    The sums are tvlang.ops.sums': one float64 value per block of ``BLOCK`` entries from the
    tensor's first (the helper's tv_block_sums_f32, which the local executor calls too; a chunk
    is a whole number of blocks), the block values added exactly (``math.fsum``, correctly
    rounded, as ``ExactSum.value()`` rounds the same exact sum). The coefficients are
    tvlang.ops.coefficients', the kernels' own. The weighted sum is the kernels' torch calls:
    ``mul`` by the first coefficient, then ``add_(x, alpha=c)`` for each other input (for
    nuslerp, multislerp and karcher, tvlang.ops.gram.combine's, only where ``c != 0``)."""

    def __init__(self, name: str, options: dict, n_inputs: int, numel: int, tensor: str) -> None:
        self.name, self.options, self.tensor = name, options, tensor
        self.offsets = name == "model_stock"
        vectors = n_inputs - 1 if self.offsets else n_inputs
        self.vectors = vectors
        self.pairs = stock_pairs(vectors) if self.offsets else [(i, j) for i in range(vectors)
                                                                 for j in range(i, vectors)]
        self.blocks = numpy.empty((len(self.pairs), -(-numel // BLOCK)), dtype=numpy.float64)
        self.index = numpy.array(self.pairs, dtype=numpy.int32).reshape(-1)  # the pairs, as tv_gram_sums_f32 takes them
        # a block's offsets (model_stock's, or the unmade differences of the others: :func:`_differences`)
        self.scratch = numpy.empty(vectors * BLOCK if vectors <= GRAM_VECTORS else 0, dtype=numpy.float32)
        self.at = 0  # blocks summed
        self.coefficients: list[float] | None = None
        self.always = name in ("slerp", "model_stock")  # their kernels add every input, even times 0

    def observe(self, pieces: list, scratch: list | None, lib) -> None:
        """Sum the next entries of the inputs (a whole number of blocks, or the tensor's last): every
        pair's blocks in one sweep of the helper (tv_gram_sums_f32, model_stock's offsets made a block
        at a time there), or where there are more than GRAM_VECTORS inputs, pair by pair."""
        count = len(pieces[0])
        differences = None if self.offsets or len(pieces) > GRAM_VECTORS else _differences(pieces)
        if differences is not None:  # ``m_i - b`` unmade: made a block at a time, as model_stock's offsets
            base, inputs = differences, [piece.value for piece in pieces]
        else:
            pieces = _made(pieces, lib)
            base, inputs = (pieces[0], pieces[1:]) if self.offsets else (None, pieces)
        if len(inputs) <= GRAM_VECTORS:
            lib.tv_gram_sums_f32(_pointers(inputs), len(inputs), None if base is None else base.ctypes.data,
                                 self.index.ctypes.data, len(self.pairs), count, self.blocks.shape[1],
                                 self.blocks.ctypes.data + 8 * self.at, self.scratch.ctypes.data)
            self.at += -(-count // BLOCK)
            return
        if self.offsets:
            base = pieces[0]
            pieces = [numpy.subtract(m, base, out=buffer[:count]) for m, buffer in zip(pieces[1:], scratch)]
        for row, (i, j) in zip(self.blocks, self.pairs):
            lib.tv_block_sums_f32(pieces[i].ctypes.data, pieces[j].ctypes.data, count, 0, row[self.at:].ctypes.data)
        self.at += -(-count // BLOCK)

    def searching(self) -> bool:
        return self.coefficients is None

    def end_pass(self) -> None:
        """The coefficients, from the sums; not finite, or a merge that stops with an error (the
        local executor's to report): the run goes to the local executor."""
        sums = _exact_sums(self.blocks)
        options = self.options
        if self.offsets:
            t = stock_factor(sums, self.vectors)
            self.coefficients = [1.0 - t] + [t / self.vectors] * self.vectors
            return
        g = [[0.0] * self.vectors for _ in range(self.vectors)]
        for (i, j), value in zip(self.pairs, sums):
            g[i][j] = g[j][i] = value
        try:
            if self.name == "slerp":
                self.coefficients = list(slerp_factors([g[0][0], g[1][1], g[0][1]], float(options["t"])))
            elif self.name == "nuslerp":
                self.coefficients = nuslerp_coefficients(g, float(options["t"]))
            elif self.name == "multislerp":
                self.coefficients = multislerp_coefficients(g, options["weights"], options["normalize_weights"],
                                                            float(options["eps"]), self.tensor)
            else:
                self.coefficients = karcher_coefficients(g, options["weights"], int(options["max_iter"]),
                                                         float(options["tol"]))
        except TvlangError:
            raise _Fallback from None

    def apply(self, pieces: list, target, lib) -> None:
        count = len(target)
        first, *rest = self.coefficients
        lib.tv_scale_f32(pieces[0].ctypes.data, first, count, target.ctypes.data)
        for x, c in zip(pieces[1:], rest):
            if self.always or c != 0.0:
                lib.tv_axpy_f32(target.ctypes.data, x.ctypes.data, c, count)


def _below(value: float) -> float:
    """The largest float32 below ``value`` (a positive float32): tvlang.ops.common.below's."""
    return float(numpy.nextafter(numpy.float32(value), numpy.float32(-math.inf)))


def _floats(info) -> int:
    """The entries of tensor ``info`` that the program computes (none of an integer tensor: copied)."""
    return _numel(info.shape) if info.dtype in _FLOATS else 0


def _workspace(program) -> tuple[list, list, dict]:
    """The buffers a thread runs the program's steps in, a chunk at a time: one per step, the 16-bit
    entries of each read and write before or after conversion, and each input's drop or trim of the
    calls that merge several (model_stock: each model's offset from the base; a ``rescale_by="l1"``
    call: each input's drop in its norms' pass; sce: each input's selection, and the variances;
    random_like: its noise in the norms' pass)."""
    buffers = [numpy.empty(CHUNK_ELEMENTS + (ALIGN_SLACK // 4 if step.op == "read" else 0), dtype=numpy.float32)
               if step.op != "write" else None for step in program.steps]
    halves = [numpy.empty(CHUNK_ELEMENTS + ALIGN_SLACK // 2, dtype=numpy.uint16) if step.op in ("read", "write")
              else None for step in program.steps]
    merging = (*THRESHOLD_CALLS, *DELLA_CALLS, "model_stock", "sce", "random_like")
    drops = {index: [numpy.empty(CHUNK_ELEMENTS, dtype=numpy.float32)
                     for _ in range(len(step.srcs) + (step.name == "sce"))]
             for index, step in enumerate(program.steps)
             if step.op == "call" and (step.name in merging or step.name in DROP_CALLS and
                                       (step.name != "dare" or _l1_call(step)))}
    return buffers, halves, drops


class _Ahead:
    """The passes before the main one (the thresholds of ties and breadcrumbs: :func:`_find_thresholds`;
    the sums, L1 norms and sce selections: :func:`_find_passes`) of the next tensors, on a second thread
    while this one runs the main pass of the one before: in its own buffers, with its own descriptors
    of the inputs (a copy of each ``_Input``). Thresholds alone (no DARE call, whose masks would be
    drawn ahead too) run up to :data:`AHEAD_TENSORS` tensors ahead, so neither thread waits for the
    other where a large tensor follows small ones (what a tensor keeps from them is its cuts); the
    others one tensor ahead (what they keep grows with the tensor: flags, selections). ties at
    1.5 GB: the thresholds' passes took 2.5 s of 7.3 s on this thread."""

    def __init__(self, program, bound: _Bound, lib, every: list, drawing: ThreadPoolExecutor,
                 num_layers: int | None) -> None:
        self.program, self.lib, self.every, self.drawing = program, lib, every, drawing
        self.num_layers = num_layers
        self.bound = _Bound(bound.plan, {key: replace(source, _open=None) for key, source in bound.readers.items()},
                            bound.base)
        self.workspace = _workspace(program)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="tvlang-ahead")
        # a della L1 pass reads each chunk into the other workspace while the second thread samples the
        # chunk before (_Della.observe; one core: no second thread, one workspace)
        spare = _workspace(program) if (os.cpu_count() or 1) > 1 and any(
            step.op == "call" and step.name in DELLA_CALLS and _l1_call(step) for step in program.steps) else None
        self.stop = threading.Event()
        self.queue: deque[tuple[int, dict, Future | None]] = deque()  # the tensors started, in order
        thresholds = any(step.op == "call" and step.name in THRESHOLD_CALLS for step in program.steps)
        self.find = _find_thresholds if thresholds else functools.partial(_find_passes, spare=spare)
        drops = any(step.op == "call" and step.name in DROP_CALLS for step in program.steps)
        self.depth = AHEAD_TENSORS if thresholds and not drops else 1

    def _start(self, position: int) -> tuple[int, dict, Future | None]:
        info = self.every[position]
        streams = _streams(self.program, info.name, _floats(info), self.drawing, self.num_layers, shape=info.shape)
        future = None
        if _floats(info):
            future = self.thread.submit(self.find, self.program, self.bound, info, _numel(info.shape),
                                        *self.workspace, streams, self.lib, self.stop)
        return position, streams, future

    def streams(self, position: int) -> dict:
        """Tensor ``position``'s streams, its thresholds found; the next tensors' searches started."""
        while self.queue and self.queue[0][0] < position:
            self.queue.popleft()
        current = self.queue.popleft() if self.queue and self.queue[0][0] == position else self._start(position)
        _, streams, future = current
        following = self.queue[-1][0] + 1 if self.queue else position + 1
        while len(self.queue) < self.depth and following < len(self.every):
            self.queue.append(self._start(following))
            following += 1
        if future is not None:
            future.result()
        for state in streams.values():
            if isinstance(state, _Trims):
                state.restart()  # the tie windows' counts, from the main pass's first entry
            elif isinstance(state, _Noise):
                state.rewind()  # its noise from the first entry, where a pass before took some
        return streams

    def close(self) -> None:
        self.stop.set()
        self.thread.shutdown(wait=True, cancel_futures=True)
        for source in self.bound.readers.values():
            source.close()


def _find_thresholds(program, bound: _Bound, info, numel: int, buffers: list, halves: list, drops: dict,
                     streams: dict, lib, stop: threading.Event) -> None:
    """Before the main pass over tensor ``info``: the thresholds of its ties and breadcrumbs calls,
    from a sample of their inputs (``sample_ranges``, as tvlang.run.chunked takes it) and as many
    passes as their selects need (one, where every window holds its k-th largest). The calls whose
    inputs need no threshold still unknown go together, in the same passes (three breadcrumbs of
    three inputs: one pass reading the four models, not three reading two each), each pass running
    only the steps the calls still searching need; ``stop`` set: given up (the run is ending)."""
    pending = [index for index, step in enumerate(program.steps)
               if step.op == "call" and step.name in THRESHOLD_CALLS and streams[index].selects]
    # the steps before each call that its inputs depend on (needed_steps lists the call too)
    needs = {index: set(needed_steps(program, {index})) - {index} for index in pending}
    scratch = numpy.empty(CHUNK_ELEMENTS + 1, dtype=numpy.int32)
    second = numpy.empty(CHUNK_ELEMENTS + 1, dtype=numpy.int32)
    while pending:
        group = [index for index in pending if not needs[index] & set(pending)]
        pending = [index for index in pending if index not in group]
        feeds = [select for index in group for select in streams[index].selects.values()]

        def observer(index: int):
            # a call's inputs as its step is reached: a later step may reuse their slots
            def observe(pieces: list) -> None:
                by_input: dict[int, list[_Select]] = {}
                for (i, _), select in streams[index].selects.items():
                    if select.found is None:
                        by_input.setdefault(i, []).append(select)
                for i, selects in by_input.items():
                    pair = [select for select in selects if select.gathers()]
                    piece = pieces[i]
                    if isinstance(piece, _Axpy):
                        if piece.gathered(pair, selects, [scratch, second]):
                            continue
                        piece = piece.made(lib)
                    raw = piece.view(numpy.int32)
                    if len(pair) == 2:  # breadcrumbs' two cuts: both windows in one pass
                        for select, got in zip(pair, window_gather2(raw, [s.bounds for s in pair],
                                                                    [scratch, second])):
                            select.take(*got)
                    for select in selects:
                        if len(pair) != 2 or select not in pair:
                            select.feed(raw, scratch)
            return observe

        observers = {index: observer(index) for index in group}
        ranges = [(at, min(end, at + CHUNK_ELEMENTS)) for start, end in sample_ranges(numel, 16, 1 << 12)
                  for at in range(start, end, CHUNK_ELEMENTS)]
        while any(select.found is None for select in feeds):
            if ranges is None:
                ranges = [(start, min(numel, start + CHUNK_ELEMENTS)) for start in range(0, numel, CHUNK_ELEMENTS)]
            searching = [index for index in group if any(s.found is None for s in streams[index].selects.values())]
            needed = set().union(*(needs[index] for index in searching))
            observing = {index: observers[index] for index in searching}
            for state in streams.values():
                if isinstance(state, _Trims):
                    state.restart()  # an earlier call's tie windows, where these calls' inputs need it
            unmade = _unmade(program, needed, observing)
            for start, end in ranges:
                if stop.is_set():
                    return
                _chunk(program, bound, info, start, end - start, buffers, halves, drops, streams, {}, lib,
                       check=False, only=needed, observing=observing, unmade=unmade)
            for select in feeds:
                if select.found is not None:
                    continue
                if select.stage == "sample":
                    select.end_sample()
                else:
                    select.end_pass()
            ranges = None


def _unmade(program, needed: set[int], observing: dict) -> set[int]:
    """The ``axpy`` steps among ``needed`` whose result only the calls in ``observing`` read (before
    any other step reads or writes its slot): those a pass before the main one need not make in a
    buffer (:class:`_Axpy`; ``ties(a - pre, b - pre, c - pre)``'s three subtractions)."""
    unmade = set()
    for index in sorted(needed):
        step = program.steps[index]
        if step.op == "axpy" and _observed_only(program, index, step.dst, needed, observing):
            unmade.add(index)
    return unmade


def _unread(program) -> frozenset[int]:
    """The steps the main pass leaves out: those whose results reach the outputs only as the input
    of a ``random_like`` call. Its main pass takes nothing of its input (its noise times the
    scale, found from the input's norm in the pass before), so in ``pre + random_like(a - pre) +
    ...`` the main pass neither reads ``a`` nor subtracts ``pre`` from it. A backward walk over the
    slots from the writes (and feeds): :func:`needed_steps`, with the random_like calls opaque."""
    steps = program.steps
    sinks = {index for index, step in enumerate(steps) if STEP_OPS[step.op].effect == "sink"}
    noise = {index for index, step in enumerate(steps) if step.op == "call" and step.name == "random_like"}
    return frozenset(range(len(steps))) - set(needed_steps(program, sinks, opaque=noise))


def _observed_only(program, index: int, slot: int, needed: set[int], observing: dict) -> bool:
    """Whether, of the steps after ``index`` that run in this pass, calls in ``observing`` read
    ``slot`` (they write nothing) and no other step does before one makes it anew."""
    observed = False
    for later in range(index + 1, len(program.steps)):
        other = program.steps[later]
        reads = set(other.srcs) | ({other.dst} if other.op in ("scale", "axpy") else set())
        if later in observing:
            observed = observed or slot in reads
        elif later in needed:
            if slot in reads:
                return False
            if other.dst == slot:  # made anew (a read, set, add or call)
                return observed
    return observed


class _Axpy:
    """An ``axpy`` step's result, ``value + coef * x`` as ``tv_axpy_f32`` makes it, not made yet (a
    pass before the main one, :func:`_unmade`): a select gathering from a window takes its
    patterns with the helper's :func:`window_gather_axpy`, which makes a few thousand entries at a
    time where they stay in the L1 cache; the other stages take it made in ``target`` (where the
    step would have made it). At 3 GB, making the subtractions of ``ties`` in buffers took 26 % of
    the run's samples, on the thread that finds the thresholds."""

    __slots__ = ("value", "x", "coef", "target", "count", "_made")

    def __init__(self, value, x, coef: float, target, count: int) -> None:
        self.value, self.x, self.coef, self.target, self.count = value, x, coef, target, count
        self._made = None

    def gathered(self, gathering: list, selects: list, scratch: list) -> bool:
        """Whether the selects that take this piece (``selects``) are one or two gathering from a
        window (``gathering``) and have taken it, without making it."""
        takers = [select for select in selects if select.stage in ("sample", "high") or select.gathers()]
        if self._made is not None or not takers or takers != gathering or len(takers) > 2:
            return not takers
        got = window_gather_axpy(self.value, self.x, self.coef, [select.bounds for select in takers], scratch)
        if got is None:
            return False
        for select, (picked, above) in zip(takers, got):
            select.take(picked, above)
        return True

    def __len__(self) -> int:
        return self.count

    def made(self, lib):
        """The result, made in ``target`` (once)."""
        if self._made is None:
            _axpy(lib, self.value, self.x, self.coef, self.count, self.target)
            self._made = self.target
        return self._made


def _axpy(lib, value, x, coef: float, count: int, target) -> None:
    """An ``axpy`` step: ``value + coef * x`` into ``target`` (tv_axpy_f32, in place where ``target``
    is ``value``; else the same fused multiply-add out of place, tv_linear_run_f32)."""
    if target is value:
        lib.tv_axpy_f32(value.ctypes.data, x.ctypes.data, coef, count)
    else:
        lib.tv_linear_run_f32(value.ctypes.data, 1.0, 1, _pointers([x]), (ctypes.c_float * 1)(coef), 1, count,
                              target.ctypes.data)


def _made(pieces: list, lib) -> list:
    """``pieces`` with each :class:`_Axpy` made (for an observer that reads values)."""
    return [piece.made(lib) if isinstance(piece, _Axpy) else piece for piece in pieces]


def _differences(pieces: list):
    """The base ``b`` where every piece is an unmade ``m - b`` (:class:`_Axpy`, coefficient -1) of the
    same ``b``: what tv_gram_sums_f32 subtracts a block at a time (one float32 subtraction, the
    same bits as the axpy's ``fma(b, -1, m)``: both the exact difference, rounded once); else ``None``."""
    if not pieces or not all(isinstance(piece, _Axpy) and piece.coef == -1.0 for piece in pieces):
        return None
    base = pieces[0].x
    if any(piece.x.ctypes.data != base.ctypes.data for piece in pieces):
        return None
    return base


def _find_passes(program, bound: _Bound, info, numel: int, buffers: list, halves: list, drops: dict,
                 streams: dict, lib, stop: threading.Event, spare: tuple | None = None) -> None:
    """Before the main pass over tensor ``info``: what its GRAM_CALLS, random_like, sce and
    ``rescale_by="l1"`` DARE calls need (:class:`_Gram`, :class:`_Noise`, :class:`_Sce`, :class:`_L1`),
    each in as many whole passes as it asks for (``searching()``, then ``end_pass()``: one for the
    sums and norms, three for sce's selection). The calls whose inputs need no such call still
    searching go together, in the same passes, each pass running only the steps their inputs need; a
    call whose input is another's result waits for that one (GRAM_CALLS and random_like only:
    :func:`_runnable`). ``stop`` set: given up. ``spare``: a second workspace, which the chunks take in
    turn with the first (a della L1 pass samples a chunk on the second thread while the next is read)."""
    states = {index: _before(stream) for index, stream in streams.items()}
    states = {index: state for index, state in states.items() if state is not None}
    pending = sorted(states)
    needs = {index: set(needed_steps(program, {index})) - {index} for index in pending}
    while pending:
        group = [index for index in pending if not needs[index] & set(pending)]
        pending = [index for index in pending if index not in group]
        while searching := [index for index in group if states[index].searching()]:
            needed = set().union(*(needs[index] for index in searching))
            workspaces = [(buffers, halves, drops), *([spare] if spare is not None else [])]
            observing = [{index: _observer(states[index], space[2].get(index), lib) for index in searching}
                         for space in workspaces]
            try:
                if not _whole_pass(program, bound, info, numel, workspaces, streams, lib, stop, needed, observing):
                    return
            finally:  # a della pass's last chunk, still sampled on the second thread in these buffers
                for index in searching:
                    if isinstance(states[index], _Della):
                        states[index].settle()
            for index in searching:
                states[index].end_pass()


def _before(stream):
    """A call's state that passes before the main one fill (a DARE call's: its ``_L1``; a della call's
    with ``rescale_by="l1"``: itself), or ``None``."""
    state = stream[3] if isinstance(stream, tuple) else stream
    if isinstance(state, _Della):
        return state if state.l1 else None  # its L1 norms' pass
    return state if isinstance(state, (_Gram, _Noise, _Sce, _L1)) else None


def _observer(state, scratch: list | None, lib):
    if isinstance(state, (_Gram, _Noise)):  # they take unmade differences (:class:`_Axpy`) as they are
        return lambda pieces: state.observe(pieces, scratch, lib)
    return lambda pieces: state.observe(_made(pieces, lib), scratch, lib)


def _whole_pass(program, bound: _Bound, info, numel: int, workspaces: list, streams: dict, lib,
                stop: threading.Event, needed: set[int], observing: list) -> bool:
    """One pass over tensor ``info`` before the main one, a chunk at a time (the main pass's chunks):
    the steps in ``needed``, the calls in ``observing`` handed their inputs; the chunks take the
    ``workspaces`` (buffers, halves, drops) in turn, each with its ``observing`` (the calls' observers
    of that workspace's buffers). Each chunk is a whole
    number of the block sums' blocks (and the main pass takes what a pass kept a chunk at a time),
    or, for a della call, of its rows (:func:`_chunk_size`; :class:`_AbsSums` completes a cut block);
    ``False`` where ``stop`` was set (the run is ending)."""
    if CHUNK_ELEMENTS % BLOCK and not _has_della(program):
        raise _Fallback
    unmade = _unmade(program, needed, observing[0])
    for state in streams.values():
        if isinstance(state, _Noise):
            state.rewind()  # a random_like whose result this pass takes, taken by a pass before
    step = _chunk_size(program, info)
    for chunk, start in enumerate(range(0, numel, step)):
        if stop.is_set():
            return False
        buffers, halves, drops = workspaces[chunk % len(workspaces)]
        _chunk(program, bound, info, start, min(numel - start, step), buffers, halves, drops, streams,
               {}, lib, check=False, only=needed, observing=observing[chunk % len(workspaces)], unmade=unmade)
    return True


def _streams(program, name: str, numel: int, drawing: ThreadPoolExecutor, num_layers: int | None,
             packed: frozenset[int] = frozenset(), shape: tuple[int, ...] = ()) -> dict[int, Any]:
    """Each call's state for tensor ``name`` of ``numel`` entries, its per-tensor options resolved
    for that name (tvlang.ops.pertensor, with the base's layer count, as the local executor's
    TensorContext): a DARE call's drop rule, masks (one stream per input, input ``i``'s from where
    the whole-tensor kernel's shared stream reaches it, as tvlang.ops.chunks draws them) and
    options, a ties call's trims, a GRAM_CALLS call's sums, the options of the others."""
    streams: dict[int, Any] = {}
    context = TensorContext(name, num_layers=num_layers)
    for index, step in enumerate(program.steps):
        if step.op != "call":
            continue
        options = resolve_options(step.options, context)
        if step.name in THRESHOLD_CALLS:
            streams[index] = _Trims(step.name, options, len(step.srcs), numel)
        elif step.name in GRAM_CALLS:
            streams[index] = _Gram(step.name, options, len(step.srcs), numel, name)
        elif step.name == "random_like":
            streams[index] = _Noise(options, numel, context, drawing)
        elif step.name == "sce":
            streams[index] = _Sce(options, len(step.srcs), numel)
        elif step.name in DELLA_CALLS:
            streams[index] = _Della(options, len(step.srcs), numel, row_length(shape), context, drawing)
        elif step.name in DROP_CALLS:
            l1 = _l1_call(step)
            rule = DropRule(float(options["p"]), options["rescale"] and not l1)  # l1: masks of 0 and 1
            masks = []
            for i in range(len(step.srcs)):
                bits = context.bits(options["seed"])
                bits.advance(i * rule.words(numel))
                # keep bits for the fused calls, and for the L1 rule's pass (its flags, as drawn)
                masks.append(_Masks(rule, bits, numel if rule.draws else 0, drawing, index in packed or l1))
            fuses = step.name == "dare_ties" and len(step.srcs) <= FUSED_PARTS
            streams[index] = (rule, masks, options, _L1(rule, masks, numel, fuses) if l1 else None)
        else:
            streams[index] = options
    return streams


class _Following:
    """Each tensor's streams (:func:`_streams`) for a main pass with no pass before it, the next
    tensor's made (its first DARE mask blocks asked for) once every mask of this one is asked for:
    the masks' thread draws them while this tensor's last chunks run, and the next tensor's first
    chunk does not wait for its first blocks (not sooner: this tensor's blocks would then wait
    behind the next one's). The serial main pass and :func:`_overlapped` both ask here."""

    def __init__(self, program, every: list, drawing: ThreadPoolExecutor, num_layers: int | None,
                 packed: frozenset[int]) -> None:
        self.program, self.every, self.drawing = program, every, drawing
        self.num_layers, self.packed = num_layers, packed
        self.upcoming: tuple[int, dict] | None = None  # (position, its streams), made ahead

    def _make(self, position: int) -> dict:
        info = self.every[position]
        return _streams(self.program, info.name, _floats(info), self.drawing, self.num_layers, self.packed,
                        info.shape)

    def streams(self, position: int) -> dict:
        """Tensor ``position``'s streams: those made ahead for it, else new ones."""
        upcoming, self.upcoming = self.upcoming, None
        return upcoming[1] if upcoming and upcoming[0] == position else self._make(position)

    def ask_next(self, position: int, streams: dict) -> None:
        """Before each chunk of tensor ``position``: the next tensor's streams, once every mask of
        ``streams`` (this tensor's) is asked for, and only once."""
        if self.upcoming is None and position + 1 < len(self.every) and _masks_asked(streams):
            self.upcoming = (position + 1, self._make(position + 1))


def _masks_asked(streams: dict) -> bool:
    """Whether every DARE mask of a tensor's streams (:func:`_streams`) has its last block drawn or
    being drawn (true where there are none)."""
    return all(masks.asked >= masks.numel for state in streams.values() if isinstance(state, tuple)
               for masks in state[1])


def _chunk(program, bound: _Bound, info, start: int, count: int, buffers: list, halves: list, drops: dict,
           streams: dict, writers: dict, lib, *, check: bool, only: set[int] | None = None,
           observing: dict | None = None, fused: _Fusions | None = None, emit: Callable | None = None,
           unmade: set[int] = frozenset(), skip: frozenset[int] = frozenset()) -> None:
    """:func:`_steps` of one chunk, a della call's rows (:class:`RowBlocks`) on both threads as it comes."""
    for blocks in _steps(program, bound, info, start, count, buffers, halves, drops, streams, writers, lib,
                         check=check, only=only, observing=observing, fused=fused, emit=emit, unmade=unmade,
                         skip=skip):
        blocks.finish(blocks.start())


def _read_step(bound: _Bound, step, index: int, name: str, start: int, count: int, buffers: list,
               halves: list) -> tuple[Any, bool]:
    """Read step ``index``'s chunk (entries ``start:start+count`` of tensor ``name``) as stored, float32
    or 16-bit entries, and whether it is a view of the mapped file (read-only: :meth:`_Input.view`),
    else read into the step's float32 buffer or its 16-bit one, from where its address and the
    bytes' file offset agree modulo 64 (:func:`_aligned`)."""
    source = bound.readers[step.name]
    _, code, file, offset = source.tensors[name]
    position = offset + (4 if code == "F32" else 2) * start
    target = _aligned(buffers[index] if code == "F32" else halves[index], position, count)
    read = source.chunk(file, position, target)
    return read, read is not target


def _aligned(buffer, position: int, count: int):
    """``count`` entries of ``buffer`` (which has ALIGN_SLACK bytes to spare) from the first whose
    address is ``position`` modulo 64, where that is a whole number of entries.

    A read copies out of the page cache about four times slower (0.43-0.58 against 0.10 s a GiB
    on the development machine, docs/performance.md) where the memory it fills sits 1 to 31
    bytes further into its page than the file offset does, and a numpy buffer of 1 MiB starts 16
    bytes into its page: a tensor whose data start a multiple of 4,096 bytes into its file, or 8
    bytes before or after, would be read that slowly. At the same place modulo 64 it never is."""
    size = buffer.itemsize
    skip = (position - buffer.ctypes.data) % 64
    return buffer[skip // size:skip // size + count] if skip % size == 0 else buffer[:count]


def _steps(program, bound: _Bound, info, start: int, count: int, buffers: list, halves: list, drops: dict,
           streams: dict, writers: dict, lib, *, check: bool, only: set[int] | None = None,
           observing: dict | None = None, fused: _Fusions | None = None,
           emit: Callable | None = None, unmade: set[int] = frozenset(),
           skip: frozenset[int] = frozenset()) -> Iterator[RowBlocks]:
    """The program over entries ``start:start+count`` of tensor ``name``: each input's chunk read
    into the read step's buffer, each step into its own buffer (``make`` steps) or in place
    (``update`` steps), as tvlang.run.chunked does, with the arithmetic of tvlang.run.steps in
    the helper's float32 loops; with ``only``, those steps only, writing nothing, and the calls in
    ``observing`` not run but their inputs handed to it (a pass before the main one); ``fused``
    (:func:`_fusions`, the main pass): DARE calls run in one loop with the steps around them. (Reading the
    next chunk in a thread meanwhile was slower here: 3.9-4.4 s against 3.6-3.75 s at 1.5 GB,
    docs/performance.md.) A della call's rows are yielded (:class:`RowBlocks`) for the caller to run
    before the steps go on: :func:`_chunk` runs them at once, :func:`_pipelined` once the next chunk is read.
    ``emit``: takes each write as ``(writer, name, piece)`` instead of writing it (:func:`_overlapped`).
    ``unmade``: the ``axpy`` steps whose result is left unmade for the calls observing it (:class:`_Axpy`).
    ``skip``: steps not run at all (the main pass: :func:`_unread`)."""
    name = info.name
    slots: dict[int, Any] = {}
    done_to = -1  # the steps up to here ran fused with an earlier one
    unchecked: dict[int, bool] = {}  # a linear run's result, if the next step writes it: whether it is not finite
    homes: dict[int, Any] = {}  # the slots whose value is a view of a mapped file: the read step's own buffer

    def read_slot(index: int, step) -> None:
        code = bound.readers[step.name].tensors[name][1]
        read, mapped = _read_step(bound, step, index, name, start, count, buffers, halves)
        homes.pop(step.dst, None)
        if code == "F32":
            slots[step.dst] = read
            if mapped:
                homes[step.dst] = buffers[index]
        else:  # bfloat16 or float16: to float32, exactly
            target = buffers[index][:count]
            getattr(lib, _FLOATS[code][0])(read.ctypes.data, count, target.ctypes.data)
            slots[step.dst] = target

    def owned(slot: int):
        """Where a step that updates ``slot`` in place writes: its value's own memory, or for a view of a
        mapped file (read-only), the buffer of the step that read it (the step then writes out of place)."""
        home = homes.pop(slot, None)
        return slots[slot] if home is None else home[:count]

    for index, step in enumerate(program.steps):
        if index <= done_to or index in skip:
            continue
        known, unchecked = unchecked, {}
        if (fused is not None and index in fused.chains
                and skip.isdisjoint(range(index, fused.drops[fused.chains[index][-1]][1] + 1))
                and _drop_chain(program, fused.chains[index], fused.drops, slots, read_slot, buffers, streams,
                                count, lib, owned, unchecked)):
            done_to = fused.drops[fused.chains[index][-1]][1]
            continue
        if fused is not None and index in fused.drops and _fused_drop(program, index, fused.drops[index], slots,
                                                                       buffers, streams, count, lib, owned,
                                                                       unchecked):
            done_to = fused.drops[index][1]
            continue
        if fused is not None and index in fused.deferred and _defers(streams[fused.deferred[index][0]]):
            continue  # its call makes it, in the loop that drops it
        if observing is not None and index in observing:
            observing[index]([slots[s] for s in step.srcs])
            continue
        if only is not None and index not in only:
            continue
        if fused is not None and index in fused.runs and only is None and (
                not skip or skip.isdisjoint(range(index, fused.runs[index] + 1))):
            done_to = fused.runs[index]
            bad = _linear_run(program, index, done_to, slots, read_slot, owned, buffers, count, lib)
            unchecked = {program.steps[index].dst: bad}
            continue
        op = step.op
        if op == "read":
            read_slot(index, step)
        elif op == "set":
            target = buffers[index][:count]
            src = slots[step.srcs[0]]
            if step.coef == 1.0:
                target[:] = src
            else:
                lib.tv_scale_f32(src.ctypes.data, step.coef, count, target.ctypes.data)
            slots[step.dst] = target
        elif op == "add":
            target = buffers[index][:count]
            first, second = step.coef
            a, b = slots[step.srcs[0]], slots[step.srcs[1]]
            if first == 1.0:
                target[:] = a
            else:
                lib.tv_scale_f32(a.ctypes.data, first, count, target.ctypes.data)
            lib.tv_axpy_f32(target.ctypes.data, b.ctypes.data, second, count)
            slots[step.dst] = target
        elif op == "scale":
            value = slots[step.dst]
            target = owned(step.dst)
            lib.tv_scale_f32(value.ctypes.data, step.coef, count, target.ctypes.data)
            slots[step.dst] = target
        elif op == "axpy" and index in unmade:
            slots[step.dst] = _Axpy(slots[step.dst], slots[step.srcs[0]], step.coef, owned(step.dst), count)
        elif op == "axpy":
            target = owned(step.dst)
            _axpy(lib, slots[step.dst], slots[step.srcs[0]], step.coef, count, target)
            slots[step.dst] = target
        elif op == "call" and step.name in DROP_CALLS:
            target = buffers[index][:count]
            subs = fused.subs.get(index) if fused is not None else None
            use = fused.merges.get(index) if fused is not None else None
            taker = _taker(program.steps[use], use, slots, buffers, count, owned) if use is not None else None
            bad = _drop_call(step, [slots[s] for s in step.srcs], streams[index], drops.get(index), target, lib,
                             [slots[program.steps[j].srcs[0]] for j in subs.values()] if subs else None,
                             {i: program.steps[j].coef for i, j in subs.items()} if subs else None, taker)
            made = program.steps[use].dst if taker is not None else step.dst
            if bad is not None:
                unchecked = {made: bad}
            if taker is not None:  # the sign merge wrote the step that takes it
                slots[made] = taker[0]
                done_to = use
                continue
            slots[step.dst] = target
        elif op == "call" and step.name in THRESHOLD_CALLS:  # trims; ties then merges with the helper's loop
            target = buffers[index][:count]
            trims = streams[index]
            if step.name == "breadcrumbs":
                trims.trim(0, slots[step.srcs[0]], target, lib)
            elif fused is not None and trims.fusable():  # the whole call in the helper's fused loop
                waiting = fused.subs.get(index, {})
                inputs = [(slots[src], slots[program.steps[waiting[i]].srcs[0]], program.steps[waiting[i]].coef)
                          if i in waiting else (slots[src], None, 0.0) for i, src in enumerate(step.srcs)]
                use = fused.merges.get(index)
                taker = _taker(program.steps[use], use, slots, buffers, count, owned) if use is not None else None
                bad = _whole_call(lib, count, inputs, trims.forms(), taker, target, options=trims.options,
                                  windows=trims.ties())
                made = program.steps[use].dst if taker is not None else step.dst
                unchecked = {made: bad}
                if taker is not None:
                    slots[made] = taker[0]
                    done_to = use
                    continue
            else:
                parts = [buffer[:count] for buffer in drops[index]]
                for i, (src, part) in enumerate(zip(step.srcs, parts)):
                    trims.trim(i, slots[src], part, lib)
                if fused is not None and index in fused.merges:  # with the step that takes it
                    use = fused.merges[index]
                    taker = _taker(program.steps[use], use, slots, buffers, count, owned)
                    _merge_into(trims.options, parts, taker, lib)
                    slots[program.steps[use].dst] = taker[0]
                    done_to = use
                    continue
                _sign_merge(trims.options, parts, target, lib)
            slots[step.dst] = target
        elif op == "call" and step.name == "sce":  # selected and erased, the selection and weights found
            target = buffers[index][:count]
            streams[index].apply([slots[s] for s in step.srcs], target, drops[index], lib)
            slots[step.dst] = target
        elif op == "call" and step.name in DELLA_CALLS:  # each input sampled, merged (with the step that takes it)
            target = buffers[index][:count]
            use = fused.merges.get(index) if fused is not None else None
            taker = _taker(program.steps[use], use, slots, buffers, count, owned) if use is not None else None
            subs = fused.subs.get(index, {}) if fused is not None and _defers(streams[index]) else {}
            waiting = {i: (slots[program.steps[j].srcs[0]], program.steps[j].coef) for i, j in subs.items()}
            blocks = streams[index].work([slots[s] for s in step.srcs], [part[:count] for part in drops[index]],
                                         target, taker, lib, waiting)
            yield blocks  # the caller runs its rows, then the steps go on
            made = program.steps[use].dst if taker is not None else step.dst
            bad = blocks.nonfinite()
            if bad is not None:
                unchecked = {made: bad}
            if taker is not None:
                slots[made] = taker[0]
                done_to = use
                continue
            slots[made] = target
        elif op == "call" and step.name in SUMS_CALLS:  # the weighted sum (or noise), its coefficients found
            target = buffers[index][:count]
            # (random_like's input may not have been made: :func:`_unread`; it takes none of it)
            streams[index].apply([slots.get(s) for s in step.srcs], target, lib)
            slots[step.dst] = target
        elif op == "call":  # nearswap or ram (NATIVE_CALLS), as tvlang.ops.native calls them
            target = buffers[index][:count]
            parts = [slots[s] for s in step.srcs]
            options = streams[index]
            if step.name == "nearswap":
                lib.tv_nearswap_f32(parts[0].ctypes.data, parts[1].ctypes.data, count, options["t"],
                                    target.ctypes.data)
            else:
                lib.tv_ram_f32(_pointers(parts), len(parts), count, options["epsilon"], target.ctypes.data)
            slots[step.dst] = target
        else:  # write, converted to the output's dtype (rounded to nearest, ties to even)
            piece = slots[step.srcs[0]]
            if info.dtype == "F32":
                if check and (known[step.srcs[0]] if step.srcs[0] in known else
                              lib.tv_nonfinite_f32(piece.ctypes.data, count)):
                    raise _Fallback  # the local executor names the output, the tensor and the entry
            else:
                raw = halves[index][:count]
                if getattr(lib, _FLOATS[info.dtype][1])(piece.ctypes.data, count, raw.ctypes.data):
                    raise _Fallback  # not finite, or (allow_nonfinite is float32 only) a NaN's bits
                piece = _Coded(raw, info.dtype)
            if emit is None:
                writers[step.name].write_part(name, piece)
            else:
                emit((writers[step.name], name, piece))


@dataclass
class _Fusions:
    """The DARE calls that the main pass runs together with the steps around them (:func:`_fusions`).

    ``drops``: a plain ``dare`` call with the ``axpy`` that makes its input and the step that takes
    its result, by the ``axpy``'s index: the call's and the taker's (one helper loop). ``subs``: by
    call, the inputs (by position) made by an ``axpy`` that nothing else needs, and that ``axpy``'s
    index; ``deferred`` the other way round: those ``axpy`` steps wait for their call, which makes
    ``fma(b, c, a) * mask`` in one loop. ``packed``: the calls whose masks are keep bits (every
    input fused), where no pass before the main one takes them as floats. ``merges``: by ``ties``
    or ``dare_ties`` call, the ``axpy`` or ``add`` step just after it that takes its result and
    nothing else needs: the sign merge writes that step's result (``tv_sign_merge_add_f32``); so do
    ``della`` calls with ``lambda`` 1. ``runs``: the linear runs (:func:`_linear_runs`), by their
    first step's index: their last step's."""

    drops: dict[int, tuple[int, int]]
    subs: dict[int, dict[int, int]]
    deferred: dict[int, tuple[int, int]]
    packed: frozenset[int]
    merges: dict[int, int]
    runs: dict[int, int]
    chains: dict[int, tuple[int, ...]]


def _fusions(program) -> _Fusions:
    """The main pass's fusions of ``program``'s DARE calls (see :class:`_Fusions`)."""
    drops = _drop_fusions(program)
    steps = program.steps
    fused_calls = {call for call, _ in drops.values()}
    subs: dict[int, dict[int, int]] = {}
    for k, call in enumerate(steps):
        if (call.op != "call" or call.name not in (*DROP_CALLS, "ties", *DELLA_CALLS) or k in fused_calls
                or len(set(call.srcs)) < len(call.srcs)):
            continue
        for position, slot in enumerate(call.srcs):
            j = max((i for i in range(k) if steps[i].dst == slot), default=None)
            if j is None or steps[j].op != "axpy" or steps[j].srcs[0] == slot:
                continue
            source = steps[j].srcs[0]
            if any(slot in step.srcs or step.dst in (slot, source) for step in steps[j + 1:k]):
                continue  # the input is read or replaced before the call, or what it subtracts changes
            if call.dst != slot and _read_later(steps, k + 1, slot):
                continue
            subs.setdefault(k, {})[position] = j
    deferred = {j: (k, position) for k, inputs in subs.items() for position, j in inputs.items()}
    packed = {call for call in fused_calls if steps[call].name == "dare"} | {
        k for k, inputs in subs.items() if steps[k].name in DROP_CALLS and len(inputs) == len(steps[k].srcs)}
    merges = {k: k + 1 for k in range(len(steps) - 1)
              if steps[k].op == "call" and (steps[k].name in ("ties", "dare_ties") or steps[k].name == "della"
                                            and dict(steps[k].options)["lambda"] == 1.0)
              and len(steps[k].srcs) <= 64 and _takes(steps, k + 1, steps[k].dst)}
    taken = {*drops, *(i for pair in drops.values() for i in pair), *deferred, *merges, *merges.values()}
    return _Fusions(drops, subs, deferred, frozenset(packed), merges, _linear_runs(program, taken),
                    _drop_chains(program, drops))


CHAIN_MOST = 16  # the most calls one chain takes (the helper's FUSED_PARTS)


def _drop_chains(program, drops: dict[int, tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    """The runs of ``drops`` (plain ``dare`` and single-input ``breadcrumbs`` calls with the steps
    around them) that the main pass computes in one helper loop (``tv_drop_chain_f32``): ``pre +
    dare(a - pre) + dare(b - pre) + ...``, where the first call's taker makes a buffer and each later
    one is an ``axpy`` into it, with only reads between them (into other slots), and no call's input
    is that buffer or made from it. By the first ``axpy``'s index: each call's ``axpy`` index, at
    least two."""
    steps = program.steps
    order = sorted(drops)
    chains: dict[int, tuple[int, ...]] = {}
    at = 0
    while at < len(order):
        chain = [order[at]]
        total = steps[drops[order[at]][1]].dst
        while at + len(chain) < len(order) and len(chain) < CHAIN_MOST:
            following = order[at + len(chain)]
            sub, use = steps[following], steps[drops[following][1]]
            if not (all(step.op == "read" and step.dst != total
                        for step in steps[drops[chain[-1]][1] + 1:following])
                    and use.op == "axpy" and use.dst == total and total not in (sub.dst, sub.srcs[0])):
                break
            chain.append(following)
        if len(chain) > 1:
            chains[chain[0]] = tuple(chain)
        at += len(chain)
    return chains


LINEAR_RUN_MOST = 16  # the most axpy steps one linear run takes


def _linear_runs(program, taken: set[int]) -> dict[int, int]:
    """The runs of linear steps that the main pass computes in one helper loop
    (``tv_linear_run_f32``, :func:`_linear_run`), by their first step's index: their last step's.

    A run starts at a ``set``, ``scale`` or ``add`` step that makes or scales a buffer, goes on
    with ``axpy`` steps into that buffer from others, with reads (into other buffers) between them,
    and ends at its last ``axpy``; at least one. ``pre + 0.4*(a - b) + 0.7*(c - pre)`` is one run
    (``b0 *= 0.3``, then ``b0 += 0.4 * b1`` and so on: explain's program): each input read once
    and the result written once, where the steps one by one read and write the buffer four times.
    Steps another fusion takes (``taken``) are in no run."""
    steps = program.steps
    runs: dict[int, int] = {}
    i = 0
    while i < len(steps):
        head = steps[i]
        if i in taken or head.op not in ("set", "scale", "add") or head.dst in head.srcs[1:]:
            i += 1
            continue
        slot, last, count, j = head.dst, i, 0, i + 1
        while j < len(steps) and j not in taken and count < LINEAR_RUN_MOST:
            step = steps[j]
            if step.op == "read" and step.dst != slot:
                j += 1
            elif step.op == "axpy" and step.dst == slot and step.srcs[0] != slot:
                last, count, j = j, count + 1, j + 1
            else:
                break
        if count:
            runs[i] = last
        i = last + 1
    return runs


def _linear_run(program, first: int, last: int, slots: dict, read: Callable, owned: Callable, buffers: list,
                count: int, lib) -> bool:
    """Steps ``first`` to ``last``, a linear run (:func:`_linear_runs`), in one helper loop; ``read``
    runs a read step between them (by index), ``owned`` says where a ``scale`` writes. Whether an
    entry of the result is not finite."""
    steps = program.steps
    head = steps[first]
    if head.op == "scale":
        source, coef = slots[head.dst], head.coef
        out = owned(head.dst)
    else:
        source, coef, out = slots[head.srcs[0]], head.coef, buffers[first][:count]
    inputs, coefs = [], []
    if head.op == "add":
        coef, second = head.coef
        inputs.append(slots[head.srcs[1]])
        coefs.append(second)
    for index in range(first + 1, last + 1):
        step = steps[index]
        if step.op == "read":
            read(index, step)
        else:
            inputs.append(slots[step.srcs[0]])
            coefs.append(step.coef)
    bad = lib.tv_linear_run_f32(source.ctypes.data, coef, head.op != "scale" and coef == 1.0, _pointers(inputs),
                                (ctypes.c_float * len(coefs))(*coefs), len(inputs), count, out.ctypes.data)
    slots[head.dst] = out
    return bool(bad)


def _takes(steps, index: int, slot: int) -> bool:
    """Whether step ``index`` is an ``axpy`` or ``add`` of ``slot``'s value into another (``add``: as
    its second term) and nothing after it reads that value."""
    use = steps[index]
    if use.op == "axpy" and use.srcs == (slot,) and use.dst != slot:
        pass
    elif use.op == "add" and len(use.srcs) == 2 and use.srcs[1] == slot and use.srcs[0] != slot:
        pass
    else:
        return False
    return use.dst == slot or not _read_later(steps, index + 1, slot)


def _defers(stream) -> bool:
    """Whether a call's stream takes its inputs fused: a DARE call's when it draws masks without the L1
    rule (with it, a ``dare_ties`` call's: :attr:`_L1.fuses`), a ``ties`` or ``breadcrumbs`` call's
    when it runs in the fused loop (:meth:`_Trims.fusable`), a della or della_linear call's when its
    blocks run in the helper's row loop (:attr:`_Della.fuses`)."""
    if isinstance(stream, _Trims):
        return stream.fusable()
    if isinstance(stream, _Della):
        return stream.fuses or stream.l1_fuses
    rule, _, _, l1 = stream
    return l1.fuses if l1 is not None else rule.draws


def _drop_fusions(program) -> dict[int, tuple[int, int]]:
    """The plain ``dare`` calls that can run in one pass with the steps around them: an ``axpy``
    that makes the call's input in place (``a - pre``), the call over that slot into the same slot,
    then an ``axpy`` or an ``add`` that takes the call's result and nothing after it reads (the
    common ``pre + dare(a - pre, p) + dare(b - pre, p) + ...``). By the first step's index: the
    call's and the taker's. Whether a call draws (``p`` per tensor) is the chunk's to check."""
    steps = program.steps
    found: dict[int, tuple[int, int]] = {}
    for i in range(len(steps) - 2):
        sub, call = steps[i], steps[i + 1]
        if sub.op != "axpy" or sub.srcs[0] == sub.dst or call.op != "call" or call.name not in ("dare", "breadcrumbs"):
            continue
        slot = sub.dst
        if call.srcs != (slot,) or call.dst != slot:
            continue
        if _takes(steps, i + 2, slot):
            found[i] = (i + 1, i + 2)
    return found


def _read_later(steps, start: int, slot: int) -> bool:
    """Whether a step from ``start`` on reads ``slot``'s value before one writes it afresh."""
    for step in steps[start:]:
        if slot in step.srcs or (step.dst == slot and step.op in ("axpy", "scale")):
            return True
        if step.dst == slot:
            return False
    return False


def _fused_drop(program, index: int, pair: tuple[int, int], slots: dict, buffers: list, streams: dict, count: int,
                lib, owned: Callable, checked: dict) -> bool:
    """Steps ``index`` (``x = fma(b, c, a)`` in place), ``pair[0]`` (``dare``: ``x * mask``;
    ``breadcrumbs``: its trim) and ``pair[1]`` (an ``axpy`` or ``add`` of its result) in one helper
    loop (``tv_drop_axpy_f32`` with float masks, the fused loop, :func:`_whole_call`, with keep bits
    or a trim: the same operations, so the same bits); ``False`` (nothing done) where the call does
    not draw masks or rescales by the L1 norm, or where ``breadcrumbs`` cannot run in the fused loop
    (:meth:`_Trims.fusable`). ``checked``: takes the result's slot and whether an entry of it is not
    finite, where the fused loop said (:func:`_whole_call`)."""
    call_index, use_index = pair
    stream = streams[call_index]
    if not _defers(stream):
        return False
    sub = program.steps[index]
    a, b = slots[sub.dst], slots[sub.srcs[0]]
    taker = _taker(program.steps[use_index], use_index, slots, buffers, count, owned)
    made = program.steps[use_index].dst
    slots[made] = taker[0]
    if isinstance(stream, _Trims):  # breadcrumbs: its trim
        checked[made] = _whole_call(lib, count, [(a, b, sub.coef)], stream.forms(), taker, None, windows=stream.ties())
        return True
    rule, masks, _, _ = stream
    if masks[0].packed:  # the masks as keep bits
        checked[made] = _whole_call(lib, count, [(a, b, sub.coef)], [(_KEEP_BITS, 0.0, 0.0)], taker, None,
                                    runs=[masks[0].take_bits(count)], scale=rule.scale)
        return True
    out, base, first, c = taker
    mask = masks[0].take(count)
    lib.tv_drop_axpy_f32(a.ctypes.data, b.ctypes.data, sub.coef, mask.ctypes.data, base.ctypes.data, first, c,
                         count, out.ctypes.data)
    return True


def _drop_chain(program, chain: tuple[int, ...], drops: dict, slots: dict, read_slot: Callable, buffers: list,
                streams: dict, count: int, lib, owned: Callable, checked: dict) -> bool:
    """The DARE and breadcrumbs calls of ``chain`` (:func:`_drop_chains`), each with the ``axpy`` that
    makes its input and the step that takes its result, and the reads between them, in one helper
    loop (``tv_drop_chain_f32``: the same operations in the same order as :func:`_fused_drop` call by
    call, so the same bits); ``False`` (nothing done) unless every DARE call draws its masks as keep
    bits and every breadcrumbs call runs in the fused loop. ``checked``: takes the result's slot and
    whether an entry of it is not finite (the loop checks each block it writes)."""
    steps = program.steps
    calls = [streams[drops[i][0]] for i in chain]
    if not all(stream.fusable() if isinstance(stream, _Trims) else _defers(stream) and stream[1][0].packed
               for stream in calls):
        return False
    use = drops[chain[0]][1]
    out, base, first, c = _taker(steps[use], use, slots, buffers, count, owned)  # before the reads
    inputs = []
    for n, index in enumerate(chain):
        if n:
            for r in range(drops[chain[n - 1]][1] + 1, index):
                read_slot(r, steps[r])
        sub = steps[index]
        inputs.append((slots[sub.dst], slots[sub.srcs[0]], sub.coef))
    k = len(chain)
    scales = (ctypes.c_float * k)()
    cs = (ctypes.c_float * k)(c, *(steps[drops[i][1]].coef for i in chain[1:]))
    fields = (FusedInput * k)()
    runs, drawn, windows = [], [], []  # the keep bits' runs and inputs; each input's tie windows
    for i, (one, stream, (_, _, coef)) in enumerate(zip(fields, calls, inputs)):
        one.cb = coef
        if isinstance(stream, _Trims):  # breadcrumbs: its trim and tie windows
            (one.form, one.lo, one.hi), = stream.forms()
            ties, = stream.ties()
            _set_windows(one, ties)
        else:
            rule, masks, _, _ = stream
            one.form, scales[i], ties = _KEEP_BITS, rule.scale, []
            runs.append(masks[0].take_bits(count))
            drawn.append(one)
        windows.append(ties)
    bad = 0
    for start, stop, places in _bit_pieces(count, runs):
        for one, (a, b, _) in zip(fields, inputs):
            one.a, one.b = a.ctypes.data + 4 * start, b.ctypes.data + 4 * start
        for one, (block, offset) in zip(drawn, places):
            one.packed, one.offset = block.ctypes.data, offset
        bad |= lib.tv_drop_chain_f32(fields, scales, cs, k, stop - start, base.ctypes.data + 4 * start, first,
                                     out.ctypes.data + 4 * start)
    _carry_seen(fields, windows)
    made = steps[drops[chain[-1]][1]].dst
    slots[made] = out
    checked[made] = bool(bad)
    return True


def _bit_pieces(count: int, runs: list) -> Iterator[tuple[int, int, list]]:
    """The pieces of ``count`` entries within which no input's keep bits (``runs``: each input's
    ``(block, first bit, entries)`` runs, :meth:`_Masks.take_bits`) change block: ``(start, stop,
    [(block, bit of entry start) for each input])``."""
    cuts = sorted({0, count} | {at for bits in runs for at in itertools.accumulate(n for _, _, n in bits)})
    where = [0] * len(runs)  # each input's run at this piece, and where it starts
    starts = [0] * len(runs)
    for start, stop in itertools.pairwise(cuts):
        places = []
        for i, bits in enumerate(runs):
            while starts[i] + bits[where[i]][2] <= start:
                starts[i] += bits[where[i]][2]
                where[i] += 1
            block, bit, _ = bits[where[i]]
            places.append((block, bit + start - starts[i]))
        yield start, stop, places


def _taker(use, index: int, slots: dict, buffers: list, count: int, owned: Callable) -> tuple:
    """``(out, base, first, c)`` of step ``use`` (``_takes``): its result is ``fma(value, c, base *
    first)``, into ``base`` (an ``axpy``, where ``owned`` says) or the step's own buffer (an ``add``)."""
    if use.op == "axpy":
        base = slots[use.dst]
        return owned(use.dst), base, 1.0, use.coef
    first, c = use.coef
    return buffers[index][:count], slots[use.srcs[0]], first, c


def _merge_into(options: dict, parts: list, taker: tuple, lib) -> None:
    """The sign merge of ``parts`` (unit weights) and the step that takes it, in one helper loop."""
    out, base, first, c = taker
    lib.tv_sign_merge_add_f32(_pointers(parts), len(parts), len(out), options["elect"] == "frequency",
                              MERGE_CODES[options["merge"]], base.ctypes.data, first, c, out.ctypes.data)


def _whole_call(lib, count: int, inputs: list, forms: list, taker: tuple | None, target, *, options: dict | None = None,
           runs: list | None = None, scale: float = 0.0, windows: list | None = None) -> bool:
    """A whole ``ties``, ``dare_ties``, ``breadcrumbs`` or (the L1 rule's main pass) ``della`` call over
    ``count`` entries with the steps around it, in one helper loop (``tv_fused_merge_f32``): each input
    ``(a, b, coef)`` (``fma(b, coef, a)``, its ``axpy`` waiting for the call, or ``a`` where ``b`` is
    ``None``), trimmed or dropped by its ``(form, lo, hi)``, its tie windows (``windows``: each input's
    :class:`_TieWindow` list, their counts carried on), then (two inputs or more) the sign merge with
    ``options``, then the step that takes it (``taker``, :func:`_taker`), or into ``target``.
    ``runs``: each input's keep bits (:meth:`_Masks.take_bits`) for the keep-bits forms, ``scale`` the
    rescale (form 1; form 6, the L1 rule's, takes each input's own factor as its ``lo``); the loop
    runs piece by piece where a block of bits ends. Whether an entry of the result is not finite (the
    loop checks each block it writes, while it is in the L1 cache)."""
    k = len(inputs)
    frequency = merge = 0
    if options is not None:
        frequency, merge = options["elect"] == "frequency", MERGE_CODES[options["merge"]]
    out, base, first, c = taker if taker is not None else (target, None, 1.0, 1.0)
    fields = (FusedInput * k)()
    for one, (_, _, coef), (form, low, high), ties in zip(fields, inputs, forms, windows or [[]] * k):
        one.cb, one.form, one.lo, one.hi = coef, form, low, high
        _set_windows(one, ties)
    a = [x.ctypes.data for x, _, _ in inputs]
    b = [y.ctypes.data if y is not None else None for _, y, _ in inputs]
    base_at = base.ctypes.data if base is not None else None
    out_at = out.ctypes.data
    bad = 0
    for start, stop, places in _bit_pieces(count, runs) if runs else [(0, count, None)]:
        for i, one in enumerate(fields):
            one.a = a[i] + 4 * start
            one.b = b[i] + 4 * start if b[i] is not None else None
            if places:
                block, one.offset = places[i]
                one.packed = block.ctypes.data
        bad |= lib.tv_fused_merge_f32(fields, k, stop - start, scale, frequency, merge,
                                      base_at + 4 * start if base_at is not None else None, first, c,
                                      out_at + 4 * start)
    _carry_seen(fields, windows or [])
    return bool(bad)


def _set_windows(one, ties: list) -> None:
    """An input's tie windows (:class:`_TieWindow`, their counts so far) into its ``FusedInput``."""
    one.windows = len(ties)
    for w, tie in enumerate(ties):
        one.bits[w], one.start[w], one.stop[w], one.seen[w] = tie.bits, tie.start, tie.stop, tie.seen


def _carry_seen(fields, windows: list) -> None:
    """Each input's tie windows' counts as the helper's loop left them in ``fields``, carried on."""
    for one, ties in zip(fields, windows):
        for w, tie in enumerate(ties):
            tie.seen = int(one.seen[w])


def _sub_times_mask(a, b, coef: float, mask: _Masks, rule: DropRule, part, lib) -> None:
    """``fma(b, coef, a) * mask`` into ``part``: an input's ``axpy`` and its drop in one loop."""
    count = len(part)
    if not mask.packed:
        floats = mask.take(count)  # held while the helper reads it (it may be a fresh concatenation)
        lib.tv_sub_mask_f32(a.ctypes.data, b.ctypes.data, coef, floats.ctypes.data, count, part.ctypes.data)
        return
    at = 0
    for block, bit, n in mask.take_bits(count):
        lib.tv_sub_bits_f32(a[at:].ctypes.data, b[at:].ctypes.data, coef, block.ctypes.data, bit, rule.scale, n,
                            part[at:].ctypes.data)
        at += n


def _sign_merge(options: dict, parts: list, target, lib) -> None:
    """tvlang.ops.ties.sign_merge with unit weights: the helper's loop, as the local executor calls it."""
    lib.tv_sign_merge_f32(_pointers(parts), len(parts), len(target), options["elect"] == "frequency",
                          MERGE_CODES[options["merge"]], target.ctypes.data)


def _drop_call(step, pieces: list, stream: tuple[DropRule, list[_Masks], dict, _L1 | None], drops: list | None, target,
               lib, subtracted: list | None = None, coefs: dict[int, float] | None = None,
               taker: tuple | None = None) -> bool | None:
    """A DARE call over the next ``len(target)`` entries of its inputs ``pieces``, into ``target``:
    each input times its block's mask (``x * mask``, as tvlang.ops.dare.Dropper multiplies), then
    for ``dare_ties`` the helper's sign merge (tvlang.ops.ties.sign_merge with unit weights) and for
    ``dare_linear`` ``sign_merge``'s ``elect="none"`` steps: zeros, ``add_(part, alpha=w)`` (a fused
    multiply-add: tv_axpy_f32), and the division of ``"mean"`` or ``"weighted_mean"``. ``coefs``: the
    inputs (by position) whose ``axpy`` waited for this call (:class:`_Fusions`): ``fma(b, c, x) *
    mask`` in one loop, ``b`` from ``subtracted`` in the same order. ``taker`` (``dare_ties``): the
    step after the call that takes its result (:func:`_taker`), written by the merge. With the L1 rule,
    each input times its pass's flags and its factor (:class:`_L1`); a ``dare_ties`` call's inputs,
    merge and taker in the fused loop (:attr:`_L1.fuses`). Whether an entry of the result is not finite
    where the fused loop checked it (:func:`_whole_call`), else None."""
    rule, masks, options, l1 = stream
    count = len(target)
    parts = [target] if step.name == "dare" else [buffer[:count] for buffer in drops]
    waiting = dict(zip(coefs, subtracted)) if coefs and _defers(stream) else {}
    if l1 is not None and l1.fuses:  # each input times its flags, then its factor, and the merge: one loop
        flags = [l1.flags[i].popleft() for i in range(len(pieces))]  # held here: their memory outlives the call
        return _whole_call(lib, count, [(x, waiting.get(i), coefs[i] if i in waiting else 0.0)
                                        for i, x in enumerate(pieces)],
                           [(_L1_BITS, 1.0 if factor is None else factor, 0.0) for factor in l1.factors], taker,
                           target, options=options, runs=[[(bits, 0, count)] for bits in flags])
    if step.name == "dare_ties" and len(pieces) <= FUSED_PARTS and _defers(stream) and all(m.packed for m in masks):
        return _whole_call(lib, count, [(x, waiting.get(i), coefs[i] if i in waiting else 0.0)
                                        for i, x in enumerate(pieces)],
                           [(_KEEP_BITS, 0.0, 0.0)] * len(pieces), taker, target, options=options,
                           runs=[mask.take_bits(count) for mask in masks], scale=rule.scale)
    for i, (x, mask, part) in enumerate(zip(pieces, masks, parts)):
        if l1 is not None:
            l1.apply(i, rule, x, part, lib)
        elif i in waiting:
            _sub_times_mask(x, waiting[i], coefs[i], mask, rule, part, lib)
        elif rule.draws:
            numpy.multiply(x, mask.take(count), out=part)
        elif rule.keeps_all:
            part[:] = x
        else:
            part.fill(0.0)
    if step.name == "dare":
        return None
    merge = options["merge"]
    if step.name == "dare_ties":
        if taker is not None:
            _merge_into(options, parts, taker, lib)
        else:
            _sign_merge(options, parts, target, lib)
        return None
    weights = [float(w) for w in options["weights"]] or [1.0] * len(parts)
    target.fill(0.0)
    for weight, part in zip(weights, parts):
        lib.tv_axpy_f32(target.ctypes.data, part.ctypes.data, weight, count)
    if merge == "mean":
        numpy.divide(target, numpy.float32(len(parts)), out=target)
    elif merge == "weighted_mean" and abs(sum(weights)) > 1e-8:
        numpy.divide(target, numpy.float32(sum(weights)), out=target)
    return None


def _write_uncomputed(base: _Input, info, writers: dict, models: list) -> None:
    """Tensor ``info``, of which the program computes nothing: an integer one copied from the base into
    the Model outputs (``models``), an empty floating-point one written empty to every output."""
    if info.dtype not in _FLOATS:
        _copy(base, info, numpy.dtype(_COPIED[info.dtype]), models)
    else:
        for writer in writers.values():
            writer.write(info.name, _Coded(numpy.empty(info.shape, dtype=numpy.uint16), info.dtype))


def _copy(base: _Input, info, dtype, writers: list) -> None:
    """An integer tensor of the base, into each Model output's writer (a chunk at a time)."""
    _, _, file, offset = base.tensors[info.name]
    numel = _numel(info.shape)
    if numel == 0:
        for writer in writers:
            writer.write(info.name, numpy.empty(info.shape, dtype=dtype))
    for start in range(0, numel, CHUNK_ELEMENTS):
        count = min(numel - start, CHUNK_ELEMENTS)
        piece = base.chunk(file, offset + start * dtype.itemsize, numpy.empty(count, dtype=dtype))
        for writer in writers:
            writer.write_part(info.name, piece)


def _read_into(fd: int, offset: int, target) -> None:
    """Fill ``target`` from ``offset``; a failed or short read is the local executor's to report."""
    view = memoryview(target).cast("B")
    try:
        if read_at(fd, view, offset) < len(view):
            raise _Fallback  # shorter than its header says (changed while running)
    except OSError:
        raise _Fallback from None


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
