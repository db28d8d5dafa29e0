"""Adapters out: a task-vector expression written as a PEFT LoRA adapter directory.

``extract_lora`` streams one Delta output of a plan tensor by tensor (as ``run``
does) and, per tensor, keeps the rank-r factors of its truncated SVD
(``tvlang.ops.lowrank``): one tensor's SVD at a time. What is written
(docs/adapters.md, "Adapters out"):

- every 2-D ``<module>.weight`` whose delta is not all zero: ``lora_A`` (r x in) and
  ``lora_B`` (out x r), ``B = U sqrt(S)``, ``A = sqrt(S) Vh`` (zero-padded to r when the
  matrix is smaller), ``lora_alpha = r`` so PEFT's scale is 1; embeddings (``embeddings``
  names) as ``lora_embedding_A``/``_B``, whose product PEFT transposes;
- other float tensors (1-D norms and biases, ...), with ``other="save"``: their modules
  as ``modules_to_save``, full weights ``base + delta``; with ``other="skip"`` left out.
  A tensor of a module that is also a LoRA target (a linear layer's bias) cannot be
  both and is left out either way. Every tensor left out is reported, with its share of
  the squared norm.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, groupby
from typing import TYPE_CHECKING, Any, Mapping

import torch

from tvlang.errors import TvlangError
from tvlang.io import TensorInfo, check_output_path, output_format
from tvlang.io.atomic import AtomicReplace
from tvlang.io.lora import ADAPTER_CONFIG, PREFIX, LoraReader
from tvlang.io.spooled import SpooledSafetensors
from tvlang.ops import lowrank
from tvlang.ops.lowrank import RowGram, truncated
from tvlang.plan.ir import const_value, postorder
from tvlang.run import chunked
from tvlang.run.bindings import bind, protected_paths
from tvlang.run.session import Session

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["ADAPTER_FILES", "EMBEDDING_NAMES", "Extraction", "adapter_forms", "check_adapter_paths",
           "extract_lora", "prepare_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = frozenset((ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"))
SCRATCH = ".factors.tvtmp"  # the factors as they are made, inside the temporary directory
# Modules whose 2-D weight is an embedding (num_embeddings x dim): PEFT stores their
# factors transposed, as lora_embedding_A/B. Matched on the module's last component.
EMBEDDING_NAMES = re.compile(r"(embed_tokens|wte|wpe|shared|.*_embeddings|embeddings|embed_in|tok_embeddings)")


@dataclass
class Extraction:
    """What ``extract_lora`` wrote, and how much of the task vector the rank keeps."""

    out: str
    rank: int
    kept: dict[str, float] = field(default_factory=dict)  # adapted tensor -> share of its squared norm kept
    saved: list[str] = field(default_factory=list)  # tensors written whole (modules_to_save)
    left_out: dict[str, float] = field(default_factory=dict)  # tensor -> its squared norm, not written
    zero: list[str] = field(default_factory=list)  # all-zero tensors, nothing to write
    total: float = 0.0  # squared norm of the task vector
    kept_total: float = 0.0  # squared norm the adapter keeps (kept singular values, saved tensors)
    svd_total: float = 0.0  # squared norm of the adapted tensors
    svd_kept: float = 0.0  # of that, what their rank-r factors keep
    layout: list[TensorInfo] = field(default_factory=list)  # the tensors of adapter_model.safetensors

    @property
    def share(self) -> float:
        """The share of the task vector's squared norm the adapter keeps (1.0 for a zero one)."""
        return self.kept_total / self.total if self.total > 0 else 1.0

    def lines(self, per_tensor: bool = False) -> list[str]:
        out = []
        if per_tensor:
            out += [f"  {name}: {share:.4f} of its squared norm kept at rank {self.rank}"
                    for name, share in self.kept.items()]
            out += [f"  {name}: left out ({value / self.total if self.total else 0:.4f} of the total)"
                    for name, value in self.left_out.items()]
        svd = self.svd_kept / self.svd_total if self.svd_total > 0 else 1.0
        out.append(f"wrote a rank-{self.rank} adapter of {len(self.kept)} tensors"
                   f" ({len(self.saved)} saved whole, {len(self.left_out)} left out, {len(self.zero)} zero)"
                   f" to {self.out}: it keeps {self.share:.4f} of the task vector's squared norm"
                   f" ({svd:.4f} of the adapted tensors')")
        return out


def _module(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def extract_lora(plan: Plan, bindings: Mapping[str, Any], out: str | os.PathLike, *, rank: int,
                 output: str | None = None, other: str = "save", base_name: str | None = None,
                 fan_in_fan_out: bool = False, force: bool = False, dtype: Any = "float32",
                 missing: str = "error") -> Extraction:
    """Write the Delta output ``output`` of ``plan`` as a PEFT LoRA adapter directory at ``out``."""
    result, replace = prepare_adapter(plan, bindings, out, rank=rank, output=output, other=other,
                                      base_name=base_name, fan_in_fan_out=fan_in_fan_out, force=force, dtype=dtype,
                                      missing=missing)
    try:
        replace.commit()
    except BaseException:
        replace.abort()
        raise
    return result


def prepare_adapter(plan: Plan, bindings: Mapping[str, Any], out: str | os.PathLike, *, rank: int,
                    output: str | None = None, other: str = "save", base_name: str | None = None,
                    fan_in_fan_out: bool = False, force: bool = False, dtype: Any = "float32",
                    missing: str = "error") -> tuple[Extraction, AtomicReplace]:
    """``extract_lora`` up to the commit: the adapter written at its temporary, and the transaction
    (open) that syncs and puts it in place (``tvlang run`` commits it with its other outputs)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise TvlangError(f"the rank must be a positive integer, not {rank!r}")
    if other not in ("save", "skip"):
        raise TvlangError(f"other= must be 'save' or 'skip', not {other!r}")
    out = os.fspath(out)
    bound = bind(plan, bindings)
    replace = spool = None
    try:
        plan = bound.plan
        name = output if output is not None else plan.outputs[0] if len(plan.outputs) == 1 else None
        if name is None or name not in plan.outputs:
            raise TvlangError(f"the recipe has outputs {', '.join(plan.outputs)}: name the one to extract"
                              if name is None else f"no output named '{name}'; the outputs are"
                              f" {', '.join(plan.outputs)}")
        kind = plan.output_kind(name)
        if kind != "delta":
            raise TvlangError(f"output '{name}' is a {kind}, and an adapter holds a task vector",
                              notes=("extract the task vector: e.g. -e 'ft - pre' rather than 'ft'",))
        # Results in the compute dtype: a bfloat16 model's delta is not rounded to bfloat16 before its SVD.
        session = Session(bound, dtype=dtype, out_dtype=dtype, missing=missing)
        inputs = [*protected_paths(plan, bindings)] + [p for r in bound.readers.values() for p in r.paths]
        if _empty_directory(out):
            force = True  # an empty directory holds nothing to lose
        check_output_path(out, force=force, inputs=inputs, owns=lambda entry: entry in ADAPTER_FILES, dirs=())
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            replace = AtomicReplace(os.path.abspath(out), directory=True)
        except OSError as exc:
            raise TvlangError(f"{out}: cannot create the output: {exc.strerror or exc}") from None
        base_key = _adapter_base(plan, name, bound)
        base = bound.readers[base_key] if base_key is not None else None
        # Modules with a matrix weight are LoRA targets: their other tensors (a bias) cannot be saved
        # whole as well (modules_to_save and a LoRA layer are exclusive).
        matrix_modules = {_module(n)[0] for n in session.layout.names
                          if len(session.layout.infos[n].shape) == 2 and _module(n)[1] == "weight"}
        session.reduce()
        spool = SpooledSafetensors(os.path.join(replace.tmp, SCRATCH))
        adapter = _Adapter(session, name, rank, other, base, fan_in_fan_out, matrix_modules, spool)
        for tensor_name, results in groupby(session.results([name], pieces=True), key=lambda r: r[1]):
            release_freed_memory()  # the previous tensor's SVD temporaries
            adapter.add(tensor_name, results)
        result = adapter.result
        result.out = out
        if not adapter.targets and not adapter.saved_modules:
            raise TvlangError(f"output '{name}' is zero everywhere (or has nothing an adapter holds): no adapter"
                              " to write")
        config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_name if base_name is not None else _base_name(base, bound),
            "r": rank,
            "lora_alpha": rank,
            "use_rslora": False,
            "fan_in_fan_out": fan_in_fan_out,
            "target_modules": list(adapter.targets),
            "modules_to_save": list(adapter.saved_modules) or None,
            "bias": "none",
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "inference_mode": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        spool.finish(os.path.join(replace.tmp, ADAPTER_WEIGHTS), {"format": "pt", "tvlang.recipe": plan.text})
        with open(os.path.join(replace.tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        result.layout = [info for info, _ in spool.entries]
        return result, replace
    except BaseException as exc:
        if spool is not None:
            spool.close()
        if replace is not None:
            replace.abort()
        if isinstance(exc, TvlangError):
            raise exc.with_context(source=plan.text, filename=plan.filename) from None
        raise
    finally:
        bound.close()


def adapter_forms(plan: Plan) -> dict[str, dict[str, Any]]:
    """Output name -> the options (``rank``, ``other``, ``fan_in_fan_out``) of each output that is an
    ``adapter(d, rank)`` call: ``tvlang run`` writes those as PEFT adapter directories. (An ``adapter``
    call anywhere else, inside an expression, is refused when the recipe is compiled.)"""
    forms: dict[str, dict[str, Any]] = {}
    for name, root in plan.optimized.outputs:
        if root.op == "call" and root.attr[0] == "adapter":
            options = dict(root.attr[1])
            forms[name] = {"rank": int(options["rank"]), "other": options["other"],
                           "fan_in_fan_out": bool(options["fan_in_fan_out"])}
    return forms


def check_adapter_paths(targets: Mapping[str, Any], forms: Mapping[str, Any], *, force: bool = False) -> None:
    """Refuse, before anything is computed, an adapter output's path that is not a directory's or
    that exists without ``force`` (the inputs are checked again when the adapter is written)."""
    for name in forms:
        path = os.fspath(targets[name])
        if output_format(path) != "directory":
            raise TvlangError(f"{path}: output '{name}' is an adapter, which is a directory",
                              notes=(f"give a directory path: -o {name}=adapters/{name}",))
        check_output_path(path, force=force or _empty_directory(path), owns=lambda entry: entry in ADAPTER_FILES,
                          dirs=())


def _empty_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


class _Adapter:
    """The adapter being built: each tensor of the task vector, as it comes, turned into factors
    (or a saved module, or left out) and spooled to the adapter file; ``result`` says what was kept."""

    def __init__(self, session: Session, output: str, rank: int, other: str, base, fan_in_fan_out: bool,
                 matrix_modules: set[str], spool: SpooledSafetensors) -> None:
        self.session, self.output, self.rank, self.other = session, output, rank, other
        self.base, self.fan_in_fan_out, self.matrix_modules = base, fan_in_fan_out, matrix_modules
        self.spool = spool
        self.result = Extraction("", rank)
        self.targets: dict[str, None] = {}
        self.saved_modules: dict[str, None] = {}

    def add(self, name: str, results: Iterator[tuple[str, str, torch.Tensor, bool]]) -> None:
        """Tensor ``name`` of the task vector: its result whole, or its pieces in order."""
        info = self.session.layout.infos[name]
        first = next(results)
        if not info.dtype.is_floating_point or not first[2].dtype.is_floating_point:
            for _ in results:
                pass
            return
        module, param = _module(name)
        shape = tuple(info.shape)
        if len(shape) == 2 and param == "weight" and module:
            # A large tall matrix in pieces: its Gram matrix from its rows, then U from them again,
            # so the delta is never whole in memory (tvlang.ops.lowrank, RowGram). Others whole.
            if not first[3] and math.prod(shape) > lowrank.GRAM_ELEMENTS and shape[0] >= shape[1]:
                self._streamed(name, module, shape, (r[2] for r in chain([first], results)))
            else:
                self._matrix(name, module, _whole(chain([first], results), shape))
        else:
            self._other(name, module, _whole(chain([first], results), shape))

    def _transposed(self, module: str) -> bool:
        """Whether the module's factors are of the weight's transpose: an embedding (PEFT's
        lora_embedding_A/B) or a Conv1D layer's (in, out) weight (fan_in_fan_out)."""
        return bool(EMBEDDING_NAMES.fullmatch(module.rpartition(".")[2])) or self.fan_in_fan_out

    def _matrix(self, name: str, module: str, delta: torch.Tensor) -> None:
        if not bool(delta.any()):
            self.result.zero.append(name)
            return
        top = truncated(delta.T if self._transposed(module) else delta, self.rank)
        self._factors(name, module, top.u, top.s, top.vh, top.total)

    def _streamed(self, name: str, module: str, shape: tuple[int, ...], pieces) -> None:
        m, n = shape
        gram = RowGram(n)
        nonzero = False
        for _, rows in _rows(pieces, n, self.session.buffers.give_back):
            nonzero = nonzero or bool(rows.any())
            gram.add(rows)
        if not nonzero:
            self.result.zero.append(name)
            return
        v, s = gram.decompose(self.rank)
        u = torch.empty((m, s.numel()), dtype=torch.float64)
        for start, rows in _rows(self.session.recompute(self.output, name), n, self.session.buffers.give_back):
            u[start:start + rows.shape[0]] = gram.left(rows)
        if self._transposed(module):  # the factors of Xᵀ = V S Uᵀ
            self._factors(name, module, v, s, u.T, gram.total)
        else:
            self._factors(name, module, u, s, v.T, gram.total)

    def _factors(self, name: str, module: str, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                 total: float) -> None:
        """Spool ``B = U sqrt(S)`` and ``A = sqrt(S) Vh`` of a matrix (of its transpose for an embedding)."""
        root = s.sqrt()
        b, a = _padded(u * root, root[:, None] * vh, self.rank)
        key = f"{PREFIX}{module}"
        if EMBEDDING_NAMES.fullmatch(module.rpartition(".")[2]):
            self.spool.add(f"{key}.lora_embedding_A", a.to(torch.float32))
            self.spool.add(f"{key}.lora_embedding_B", b.to(torch.float32))
        else:
            self.spool.add(f"{key}.lora_A.weight", a.to(torch.float32))
            self.spool.add(f"{key}.lora_B.weight", b.to(torch.float32))
        kept = float(s.square().sum())
        self.targets[module] = None
        result = self.result
        result.kept[name] = kept / total if total > 0 else 1.0
        result.total += total
        result.kept_total += kept
        result.svd_total += total
        result.svd_kept += kept

    def _other(self, name: str, module: str, delta: torch.Tensor) -> None:
        """A tensor that is not a matrix weight: saved whole (base + delta) as a module to save, or left out."""
        if not bool(delta.any()):
            self.result.zero.append(name)
            return
        squared = squared_norm(delta)
        self.result.total += squared
        if self.other == "skip" or not module or module in self.matrix_modules or self.base is None:
            self.result.left_out[name] = squared
            return
        self.spool.add(f"{PREFIX}{name}", self.base.read(name).to(torch.float32) + delta)
        self.saved_modules[module] = None
        self.result.saved.append(name)
        self.result.kept_total += squared


def _whole(results, shape: tuple[int, ...]) -> torch.Tensor:
    """A result given whole, or its pieces put together (float32)."""
    items = list(results)
    if len(items) == 1 and items[0][3]:
        return items[0][2].to(torch.float32).reshape(shape)
    return torch.cat([item[2].reshape(-1).to(torch.float32) for item in items]).reshape(shape)


def _rows(pieces: Iterable[torch.Tensor], n: int, give_back) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) blocks of a matrix of ``n`` columns from its flat pieces in order: about
    a chunk's entries each, in one reused float32 buffer (each valid until the next is asked for)."""
    buffer = torch.empty(max(1, chunked.CHUNK_ELEMENTS // n) * n, dtype=torch.float32)
    filled = row = 0
    for piece in pieces:
        flat = piece.reshape(-1)
        at = 0
        while at < flat.numel():
            take = min(flat.numel() - at, buffer.numel() - filled)
            buffer[filled:filled + take].copy_(flat[at:at + take])
            filled += take
            at += take
            if filled == buffer.numel():
                yield row, buffer.view(-1, n)
                row += buffer.numel() // n
                filled = 0
        give_back(piece)
    if filled:
        yield row, buffer[:filled].view(-1, n)


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``; elsewhere nothing).

    An SVD leaves tens of MB of freed temporaries per tensor in malloc's heaps, below its
    mmap threshold; without this the process kept twice the memory it used (measured at
    0.3 GB: 550 MiB anonymous memory against 287 MiB with the heap trimmed).
    """
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def squared_norm(tensor: torch.Tensor, block: int = 1 << 22) -> float:
    """The sum of squares of ``tensor``'s entries, accumulated in float64 a block at a time
    (a float64 copy of a whole embedding would double the run's memory)."""
    flat = tensor.reshape(-1)
    return sum(float(piece.to(torch.float64).square().sum()) for piece in flat.split(block))


def _padded(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` (out x k) and ``A`` (k x in) with zero columns/rows added up to ``rank``: one ``r`` for
    every module, and the product unchanged."""
    k = b.shape[1]
    if k == rank:
        return b, a
    b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return b, a


def _adapter_base(plan: Plan, output: str, bound) -> str | None:
    """The model the task vector is relative to, which the adapter is for: a model source named
    ``pre`` or ``base``, else the first model subtracted in the output's expression (``ft - pre``),
    else the run's base if it is a model; None when the recipe reads no model."""
    models = [key for key in bound.readers if plan.optimized.sources[key].kind == "model"]
    for key in ("pre", "base"):
        if key in models:
            return key
    root = dict(plan.optimized.outputs)[output]
    for node in postorder([root]):
        if node.op == "lin":
            for vector, coef in zip(node.args, node.attr):
                if vector.op == "source" and vector.attr[0] in models and coef.op == "const" \
                        and const_value(coef) < 0:
                    return vector.attr[0]
    return bound.base if bound.base in models else None


def _base_name(reader, bound) -> str | None:
    """The base model's directory; without one, what the first adapter read says its base is."""
    if reader is not None:
        return reader.root if reader.root is not None else reader.label
    for other in bound.readers.values():
        if isinstance(other, LoraReader):
            return other.adapter.config.get("base_model_name_or_path")
    return None
