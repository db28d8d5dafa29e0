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
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from tvlang.errors import TvlangError
from tvlang.io import StreamingWriter, TensorInfo, check_output_path
from tvlang.io.atomic import AtomicReplace, sync_tree
from tvlang.io.lora import ADAPTER_CONFIG, PREFIX, LoraReader
from tvlang.ops.lowrank import truncated
from tvlang.plan.ir import const_value, postorder
from tvlang.run.bindings import bind, protected_paths
from tvlang.run.session import Session

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["ADAPTER_FILES", "EMBEDDING_NAMES", "Extraction", "extract_lora"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = frozenset((ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"))
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
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise TvlangError(f"the rank must be a positive integer, not {rank!r}")
    if other not in ("save", "skip"):
        raise TvlangError(f"other= must be 'save' or 'skip', not {other!r}")
    out = os.fspath(out)
    bound = bind(plan, bindings)
    replace = None
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
        session = Session(bound, dtype=dtype, missing=missing)
        inputs = [*protected_paths(plan, bindings)] + [p for r in bound.readers.values() for p in r.paths]
        if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
            force = True  # an empty directory holds nothing to lose
        check_output_path(out, force=force, inputs=inputs, owns=lambda entry: entry in ADAPTER_FILES, dirs=())
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            replace = AtomicReplace(os.path.abspath(out), directory=True)
        except OSError as exc:
            raise TvlangError(f"{out}: cannot create the output: {exc.strerror or exc}") from None
        base_key = _adapter_base(plan, name, bound)
        base = bound.readers[base_key] if base_key is not None else None
        base_is_model = base is not None
        result = Extraction(out, rank)
        tensors: dict[str, torch.Tensor] = {}
        targets: dict[str, None] = {}
        saved_modules: dict[str, None] = {}
        # Modules with a matrix weight are LoRA targets: their other tensors (a bias) cannot be saved
        # whole as well (modules_to_save and a LoRA layer are exclusive).
        matrix_modules = {_module(n)[0] for n in session.layout.names
                          if len(session.layout.infos[n].shape) == 2 and _module(n)[1] == "weight"}
        session.reduce()
        for _, tensor_name, delta, _ in session.results([name]):
            release_freed_memory()  # the previous tensor's SVD temporaries
            if not delta.dtype.is_floating_point:
                continue
            delta = delta.to(torch.float32)
            if not bool(delta.any()):
                result.zero.append(tensor_name)
                continue
            module, param = _module(tensor_name)
            if delta.dim() == 2 and param == "weight" and module:
                embedding = bool(EMBEDDING_NAMES.fullmatch(module.rpartition(".")[2]))
                matrix = delta.T if embedding or fan_in_fan_out else delta
                top = truncated(matrix, rank)
                root = top.s.sqrt()
                b, a = _padded(top.u * root, root[:, None] * top.vh, rank)
                kept = float(top.s.square().sum())
                total = top.total
                result.total += total
                key = f"{PREFIX}{module}"
                if embedding:
                    tensors[f"{key}.lora_embedding_A"] = a.to(torch.float32).contiguous()
                    tensors[f"{key}.lora_embedding_B"] = b.to(torch.float32).contiguous()
                else:
                    tensors[f"{key}.lora_A.weight"] = a.to(torch.float32).contiguous()
                    tensors[f"{key}.lora_B.weight"] = b.to(torch.float32).contiguous()
                targets[module] = None
                result.kept[tensor_name] = kept / total if total > 0 else 1.0
                result.kept_total += kept
                result.svd_total += total
                result.svd_kept += kept
            else:
                squared = squared_norm(delta)
                result.total += squared
                if other == "skip" or not module or module in matrix_modules or not base_is_model:
                    result.left_out[tensor_name] = squared
                    continue
                tensors[f"{PREFIX}{tensor_name}"] = (base.read(tensor_name).to(torch.float32) + delta).contiguous()
                saved_modules[module] = None
                result.saved.append(tensor_name)
                result.kept_total += squared
        if not targets and not saved_modules:
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
            "target_modules": list(targets),
            "modules_to_save": list(saved_modules) or None,
            "bias": "none",
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "inference_mode": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        _write(replace.tmp, tensors, config, plan)
        sync_tree(replace.tmp)
        replace.commit()
        return result
    except BaseException as exc:
        if replace is not None:
            replace.abort()
        if isinstance(exc, TvlangError):
            raise exc.with_context(source=plan.text, filename=plan.filename) from None
        raise
    finally:
        bound.close()


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


def _write(directory: str, tensors: dict[str, torch.Tensor], config: dict, plan: Plan) -> None:
    layout = [TensorInfo.of(key, tensor, "") for key, tensor in tensors.items()]
    metadata = {"format": "pt", "tvlang.recipe": plan.text}
    with StreamingWriter(os.path.join(directory, ADAPTER_WEIGHTS), layout, shard_size=None, metadata=metadata,
                         force=True) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

