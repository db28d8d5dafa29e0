"""PEFT LoRA adapter directories, read as task vectors (docs/adapters.md).

A LoRA adapter stores a task vector in factored form: for each adapted module,
``delta = scale * B @ A`` (transposed for ``fan_in_fan_out`` layers and for
embeddings), with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA), ``r`` and ``lora_alpha`` per module from ``rank_pattern`` and
``alpha_pattern``. :class:`LoraAdapter` parses ``adapter_config.json`` and the
factor file's header and computes one module's delta, or some of its rows, on
request. :class:`LoraReader` presents an adapter as a reader over a base's tensor
names: adapted tensors are computed when read, ``modules_to_save`` tensors are
their difference from the base, every other tensor is zero. Nothing is computed
ahead of its read, so no step holds more than one module's delta.

The mapping follows PEFT (``peft/utils/save_and_load.py``, ``peft/tuners/lora``):
``base_model.model.<module>.lora_A.weight`` and ``.lora_B.weight`` change
``<module>.weight``; ``<module>.lora_embedding_A``/``_B`` change an embedding's
``<module>.weight``; any other key, ``base_model.model.<module>.<param>`` (a
``modules_to_save`` copy, or an embedding's ``base_layer`` saved beside its
factors), is a full weight of ``<module>.<param>``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from tvlang.io.base import TensorInfo, TensorReader, check_regular, io_error, load_json, quoted
from tvlang.io.safetensors_file import SafetensorsReader
from tvlang.io.torch_file import TorchFileReader

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "Factors", "LoraAdapter", "LoraReader", "is_adapter_dir",
           "pattern_key"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
ROW_CHUNK_ELEMENTS = 1 << 22  # entries of one matmul's result: 16 MiB in float32

# Fields of LoraConfig that change what a module's weights mean; set to anything but
# these values, the adapter is not "W + scale * B @ A" and is refused (field, default).
_VARIANTS = (
    ("use_dora", False, "DoRA rescales each column by a magnitude vector"),
    ("lora_bias", False, "the adapter trains a bias on lora_B"),
    ("use_qalora", False, "QA-LoRA pools the inputs of lora_A"),
    ("alora_invocation_tokens", None, "an activated LoRA applies only after its invocation tokens"),
    ("layer_replication", None, "the adapter replicates layers of the base"),
    ("target_parameters", None, "the adapter targets parameters, not modules"),
    ("trainable_token_indices", None, "the adapter trains single token embeddings"),
    ("use_bdlora", None, "block-diagonal LoRA"),
    ("arrow_config", None, "Arrow routes between several adapters"),
    ("monteclora_config", None, "MonteCLoRA samples its factors"),
    ("kasa_config", None, "KaSA changes the base weights"),
)
# init_lora_weights values that change the base weights themselves: the adapter is relative
# to the changed base unless PEFT converted it on saving (which sets the field to true).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_A = re.compile(r"(.+)\.lora_A\.weight")
_B = re.compile(r"(.+)\.lora_B\.weight")
_EMBEDDING_A = re.compile(r"(.+)\.lora_embedding_A")
_EMBEDDING_B = re.compile(r"(.+)\.lora_embedding_B")


def is_adapter_dir(path: object) -> bool:
    """Whether ``path`` is a directory holding an ``adapter_config.json``."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def pattern_key(patterns: list[str], module: str) -> str | None:
    """The first key of ``rank_pattern``/``alpha_pattern`` that matches ``module``, as PEFT
    matches them (``peft.utils.other.get_pattern_key``): the key, as a regular expression,
    matches a dotted suffix of the module's name.

    >>> pattern_key(["q_proj", "layers.1.*v_proj"], "model.layers.1.self_attn.v_proj")
    'layers.1.*v_proj'
    >>> pattern_key(["q_proj"], "model.layers.0.self_attn.qq_proj") is None
    True
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class Factors:
    """One adapted module: ``delta = scale * B @ A``, transposed when ``transpose``."""

    name: str  # the tensor it changes: "<module>.weight"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    transpose: bool
    shape: tuple[int, int]  # the delta's shape
    embedding: bool


class LoraAdapter:
    """A PEFT LoRA adapter directory: its config, its factors, and deltas on request.

    ``names()`` are the tensor names it changes, in its file's order: the adapted
    modules' weights (``factors``) and the full weights it carries (``full``: name ->
    key in the file).
    """

    def __init__(self, path: str | os.PathLike, *, label: str | None = None) -> None:
        self.path = os.fspath(path)
        self.label = label if label is not None else self.path
        self.hub: object | None = None  # where an hf: reference resolved to (tvlang.io.hub.HubSource)
        self.config = self._read_config()
        self.weights_file = self._find_weights()
        weights = os.path.join(self.path, self.weights_file)
        label_w = os.path.join(self.label, self.weights_file)
        self.file: TensorReader = (SafetensorsReader(weights, label=label_w) if weights.endswith(".safetensors")
                                   else TorchFileReader(weights, label=label_w))
        self.factors: dict[str, Factors] = {}
        self.full: dict[str, str] = {}
        try:
            self._parse()
        except BaseException:
            self.file.close()
            raise

    # -- the config ---------------------------------------------------------------

    def error(self, message: str, *, notes: tuple[str, ...] = ()):
        return io_error(self.label, message, notes=notes)

    def _read_config(self) -> dict:
        config_path = os.path.join(self.path, ADAPTER_CONFIG)
        label = os.path.join(self.label, ADAPTER_CONFIG)
        if not os.path.exists(self.path):
            raise io_error(self.label, "no such directory")
        if not os.path.isdir(self.path):
            raise io_error(self.label, "not a directory; an adapter is a PEFT adapter directory"
                           f" ({ADAPTER_CONFIG} and {' or '.join(ADAPTER_WEIGHTS)})")
        if not os.path.exists(config_path):
            raise io_error(self.label, f"no {ADAPTER_CONFIG}: not a PEFT adapter directory")
        check_regular(label, config_path)
        try:
            with open(config_path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise io_error(label, f"cannot read: {exc.strerror}") from None
        config = load_json(label, raw, "adapter config")
        if not isinstance(config, dict):
            raise io_error(label, "is not a JSON object")
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise io_error(label, f"field 'peft_type' is {peft_type!r}: only LoRA adapters ('LORA') are task vectors"
                           " tvlang reads", notes=("prompt tuning, prefix tuning, IA3 and other PEFT methods store"
                                                   " no weight deltas in this form",))
        for field, default, why in _VARIANTS:
            value = config.get(field, default)
            if value not in (default, None, False, [], {}):
                raise io_error(label, f"field '{field}' is {value!r}: not supported ({why})",
                               notes=("tvlang reads plain LoRA: W + scale * B @ A",))
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise io_error(label, f"field 'init_lora_weights' is {init!r}: this initialisation changes the base"
                           " weights, so the factors are relative to a changed base",
                           notes=("save it converted (save_pretrained(..., path_initial_model_for_weight_conversion"
                                  "=...)), which makes it an adapter of the original base",))
        bias = config.get("bias", "none")
        if bias != "none":
            raise io_error(label, f"field 'bias' is {bias!r}: the adapter trains the base's biases as well;"
                           " tvlang reads LoRA factors and modules_to_save only")
        self.rank = self._number(label, config, "r", integer=True)
        self.alpha = self._number(label, config, "lora_alpha")
        self.rslora = self._flag(label, config, "use_rslora")
        self.fan_in_fan_out = self._flag(label, config, "fan_in_fan_out")
        self.rank_pattern = self._pattern(label, config, "rank_pattern", integer=True)
        self.alpha_pattern = self._pattern(label, config, "alpha_pattern")
        return config

    @staticmethod
    def _number(label: str, config: dict, field: str, *, integer: bool = False) -> float:
        value = config.get(field)
        ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not ok or (integer and value <= 0):
            what = "a positive integer" if integer else "a number"
            raise io_error(label, f"field '{field}' must be {what}, got {value!r}")
        return value

    @staticmethod
    def _flag(label: str, config: dict, field: str) -> bool:
        value = config.get(field, False)
        if not isinstance(value, bool):
            raise io_error(label, f"field '{field}' must be true or false, got {value!r}")
        return value

    @classmethod
    def _pattern(cls, label: str, config: dict, field: str, *, integer: bool = False) -> dict[str, float]:
        value = config.get(field) or {}
        if not isinstance(value, dict):
            raise io_error(label, f"field '{field}' must be an object of pattern: value, got {value!r}")
        for key in value:
            cls._number(label, value, key, integer=integer)
            try:
                re.compile(key)
            except re.error as exc:
                raise io_error(label, f"field '{field}': the pattern {quoted(key)} is not a regular expression"
                               f" ({exc})") from None
        return value

    def _find_weights(self) -> str:
        for name in ADAPTER_WEIGHTS:
            if os.path.exists(os.path.join(self.path, name)):
                return name
        raise self.error(f"holds {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")

    # -- the factors ----------------------------------------------------------------

    def _parse(self) -> None:
        halves: dict[str, dict[str, str]] = {}  # module -> {"A"/"B"/"eA"/"eB": key}
        order: list[str] = []  # names in file order
        for key in self.file.names():
            if not key.startswith(PREFIX):
                raise self.error(f"tensor {quoted(key)} does not start with '{PREFIX}': not a PEFT LoRA key")
            rest = key[len(PREFIX):]
            if "lora_magnitude_vector" in rest:
                raise self.error(f"tensor {quoted(key)} is a DoRA magnitude vector: DoRA adapters are not supported")
            for pattern, half in ((_A, "A"), (_B, "B"), (_EMBEDDING_A, "eA"), (_EMBEDDING_B, "eB")):
                match = pattern.fullmatch(rest)
                if match:
                    module = match.group(1)
                    if module not in halves:
                        halves[module] = {}
                        order.append(module + ".weight")
                    halves[module][half] = key
                    break
            else:
                if ".lora_" in rest or rest.startswith("lora_"):
                    raise self.error(f"tensor {quoted(key)} is a LoRA tensor tvlang does not know",
                                     notes=("tvlang reads lora_A.weight, lora_B.weight, lora_embedding_A and"
                                            " lora_embedding_B",))
                if ".token_adapter." in rest or "trainable_tokens" in rest:
                    raise self.error(f"tensor {quoted(key)} holds trainable tokens: not supported")
                # A full weight: modules_to_save, or an embedding's base layer saved beside its factors.
                name = re.sub(r"(^|\.)base_layer\.", r"\1", rest)
                if name in self.full:
                    raise self.error(f"tensors {quoted(self.full[name])} and {quoted(key)} are both"
                                     f" full weights of {quoted(name)}")
                self.full[name] = key
                order.append(name)
        for module, found in halves.items():
            self._factor(module, found)
        self.order = list(dict.fromkeys(order))

    def _factor(self, module: str, found: dict[str, str]) -> None:
        embedding = "eA" in found or "eB" in found
        a_key, b_key = (found.get("eA"), found.get("eB")) if embedding else (found.get("A"), found.get("B"))
        if embedding and ("A" in found or "B" in found):
            raise self.error(f"module {quoted(module)} has both lora_A/B and lora_embedding_A/B tensors")
        if a_key is None or b_key is None:
            have = a_key or b_key
            lacking = "B" if b_key is None else "A"
            raise self.error(f"tensor {quoted(have)} has no lora_{'embedding_' if embedding else ''}{lacking}"
                             " partner: the adapter file is incomplete")
        a, b = self.file.info(a_key), self.file.info(b_key)
        for info in (a, b):
            if len(info.shape) != 2:
                raise self.error(f"tensor {quoted(info.name)} has shape {list(info.shape)}: only 2-D factors"
                                 " (linear layers, embeddings) are supported, not convolutions")
            if not info.dtype.is_floating_point:
                raise self.error(f"tensor {quoted(info.name)} is {info.dtype}, not a float tensor")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise self.error(f"tensors {quoted(a_key)} {list(a.shape)} and {quoted(b_key)} {list(b.shape)}"
                             " do not multiply (B @ A needs B's columns to equal A's rows)")
        r_key = pattern_key(list(self.rank_pattern), module)
        alpha_key = pattern_key(list(self.alpha_pattern), module)
        r = self.rank_pattern[r_key] if r_key is not None else self.rank
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.alpha
        if r != rank:
            where = f"rank_pattern[{r_key!r}]" if r_key is not None else "'r'"
            raise self.error(f"tensor {quoted(a_key)} has rank {rank} but the config's {where} says {r}")
        scale = alpha / math.sqrt(r) if self.rslora else alpha / r
        transpose = embedding or self.fan_in_fan_out
        shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        name = module + ".weight"
        self.factors[name] = Factors(name, a_key, b_key, rank, alpha, scale, transpose, shape, embedding)

    # -- reading ----------------------------------------------------------------------

    def names(self) -> list[str]:
        """The tensor names the adapter changes, in its file's order."""
        return list(self.order)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.factors:
            return self.factors[name].shape
        return tuple(self.file.info(self.full[name]).shape)

    def key_of(self, name: str) -> str:
        """The file's key for a name (lora_A's for an adapted module): what errors quote."""
        return self.factors[name].a_key if name in self.factors else self.full[name]

    def delta_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the delta of adapted tensor ``name``, in float32 (into ``out``
        when given: a contiguous ``(stop - start, columns)`` float32 tensor)."""
        factors = self.factors[name]
        a = self.file.read(factors.a_key).to(torch.float32)
        b = self.file.read(factors.b_key).to(torch.float32)
        columns = factors.shape[1]
        if out is None:
            out = torch.empty((stop - start, columns), dtype=torch.float32)
        step = max(1, ROW_CHUNK_ELEMENTS // max(1, columns))
        for first in range(start, stop, step):
            last = min(stop, first + step)
            piece = out[first - start:last - start]
            if factors.transpose:  # rows of (B @ A).T are columns of B @ A
                torch.matmul(a[:, first:last].T, b.T, out=piece)
            else:
                torch.matmul(b[first:last], a, out=piece)
            piece.mul_(factors.scale)
        return out

    def delta(self, name: str) -> torch.Tensor:
        """The whole delta of adapted tensor ``name`` (float32), computed in row chunks."""
        return self.delta_rows(name, 0, self.factors[name].shape[0])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "LoraAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zeros(shape: tuple[int, ...]) -> torch.Tensor:
    # calloc'd memory: pages nobody writes cost nothing, so a zero tensor as large as an
    # embedding is free until the caller changes it.
    return torch.from_numpy(np.zeros(shape, dtype=np.float32))


class LoraReader(TensorReader):
    """An adapter as a task vector over a base's names (a ``TensorReader``).

    ``mapping`` maps base names to the adapter's (``LoraAdapter.names()``) for the
    tensors it changes. Every float tensor of ``base`` is a name of this reader
    (float32): an adapted one is its delta, a full weight is its difference from the
    base, any other one is zero. With ``base=None`` the names are the adapter's own,
    which needs no full weights (they are differences from a base).
    """

    def __init__(self, adapter: LoraAdapter, base: TensorReader | None, mapping: dict[str, str] | None = None,
                 *, label: str | None = None, names: dict[str, tuple[int, ...]] | None = None) -> None:
        super().__init__(label if label is not None else adapter.label)
        self.adapter = adapter
        self.base = base
        self.kind = "delta"
        self.hub = adapter.hub
        self.paths = tuple(os.path.realpath(os.path.join(adapter.path, f))
                           for f in (ADAPTER_CONFIG, adapter.weights_file))
        if base is None:
            if adapter.full:
                name = next(iter(adapter.full))
                raise adapter.error(f"tensor {quoted(adapter.full[name])} is a full weight (modules_to_save): its"
                                    " task vector is its difference from the base, and the recipe reads no model",
                                    notes=("add the base model to the recipe (pre + lora(...))",))
            mapping = {name: name for name in adapter.names()}
            # Without a base, ``names`` (every adapter's of the recipe, with their shapes) are
            # the names: the tensors other adapters change are zero in this one.
            shapes = dict(names) if names is not None else {}
            for name in adapter.names():
                shape = adapter.shape(name)
                if shapes.setdefault(name, shape) != shape:
                    raise adapter.error(f"tensor {quoted(adapter.key_of(name))} gives {quoted(name)} the shape"
                                        f" {list(shape)}, but another adapter of the recipe gives it"
                                        f" {list(shapes[name])}",
                                        notes=("are these adapters of the same model?",))
        else:
            mapping = dict(mapping or {})
            shapes = {}
            for info in base.infos():
                if info.dtype.is_floating_point or info.dtype.is_complex:
                    shapes[info.name] = tuple(info.shape)
            for new, old in mapping.items():
                if new in shapes and adapter.shape(old) != shapes[new]:
                    notes = ()
                    factors = adapter.factors.get(old)
                    if factors is not None and not factors.embedding and tuple(reversed(factors.shape)) == shapes[new]:
                        notes = (f"its transpose fits: the config's 'fan_in_fan_out' is {adapter.fan_in_fan_out}"
                                 f" but this layer stores its weight the other way round",)
                    raise adapter.error(
                        f"tensor {quoted(adapter.key_of(old))} gives {quoted(new)} the shape"
                        f" {list(adapter.shape(old))}, but it is {list(shapes[new])} in {base.label}", notes=notes)
        self._map = mapping
        for name, shape in shapes.items():
            self._infos[name] = TensorInfo(name, shape, torch.float32, 4 * math.prod(shape), adapter.path)

    def source_of(self, name: str) -> str | None:
        """The adapter's name for base tensor ``name``, or None when the adapter leaves it alone."""
        return self._map.get(name)

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        own = self._map.get(name)
        if own is None:
            return _zeros(info.shape)
        result = self.adapter.delta(own) if own in self.adapter.factors else None
        if own in self.adapter.full:  # a saved full weight (with factors too: an embedding's base layer)
            saved = self.adapter.file.read(self.adapter.full[own]).to(torch.float32)
            if result is None:
                return saved.sub_(self.base.read(name).to(torch.float32))
            result += saved
            result -= self.base.read(name).to(torch.float32)
        return result

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.check_range(name, start, stop)
        own = self._map.get(name)
        if own is None:
            return torch.zeros(stop - start, dtype=torch.float32)
        if own not in self.adapter.factors or own in self.adapter.full or len(info.shape) != 2:
            return self.read(name).reshape(-1)[start:stop]
        columns = info.shape[1]
        first, last = start // columns, -(-stop // columns)
        rows = self.adapter.delta_rows(own, first, last).reshape(-1)
        return rows[start - first * columns: stop - first * columns]

    def close(self) -> None:
        self.adapter.close()
