"""Small synthetic checkpoints for tests, examples and benchmarks.

A *spec* maps tensor names to shapes; a float tensor is a bare shape, any other
dtype is ``(shape, dtype)``. Every tensor is drawn from its own generator,
seeded from the seed and the tensor's name, so a tensor's values do not depend
on which other tensors are made or in what order, and a big checkpoint can be
written one tensor at a time (``write_synthetic``) without ever holding it.

>>> spec = llama_spec(hidden=8, layers=1, vocab=16, intermediate=12)
>>> sd = make_state_dict(spec, seed=0)
>>> sd["model.layers.0.self_attn.q_proj.weight"].shape
torch.Size([8, 8])
>>> sd["model.position_ids"].dtype, sd["model.position_ids"][0, :4].tolist()
(torch.int64, [0, 1, 2, 3])
>>> ft = finetune_like(sd, seed=1, scale=0.01)
>>> torch.equal(ft["model.position_ids"], sd["model.position_ids"])
True
>>> bool((ft["lm_head.weight"] - sd["lm_head.weight"]).abs().max() < 0.1)
True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import torch

__all__ = [
    "finetune_like",
    "module_with",
    "llama_bytes",
    "llama_spec",
    "llama_spec_for_bytes",
    "make_state_dict",
    "make_tensor",
    "write_checkpoint",
    "write_synthetic",
]

Spec = Mapping[str, "tuple[int, ...] | tuple[tuple[int, ...], torch.dtype]"]

# Standard deviation of synthetic weights (the usual initializer range of transformers).
WEIGHT_STD = 0.02
POSITIONS = 32  # length of the integer position_ids buffer


def _split(entry) -> tuple[tuple[int, ...], torch.dtype | None]:
    if len(entry) == 2 and isinstance(entry[1], torch.dtype):
        return tuple(entry[0]), entry[1]
    return tuple(entry), None


def _generator(seed: int, name: str, salt: str = "") -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{salt}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """One synthetic tensor. Norm weights (``*norm*``) are near 1, other floats near 0
    with std 0.02, integers count up (``arange``), bools alternate."""
    shape = tuple(shape)
    if dtype == torch.bool:
        return (torch.arange(max(1, _numel(shape))) % 2 == 0)[: _numel(shape)].reshape(shape)
    if not dtype.is_floating_point:
        return torch.arange(_numel(shape), dtype=torch.int64).reshape(shape).to(dtype)
    values = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    values.mul_(WEIGHT_STD)
    if "norm" in name:
        values.add_(1.0)
    return values.to(dtype)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _perturbation(name: str, shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    noise = torch.randn(shape, generator=_generator(seed, name, "finetune"), dtype=torch.float32)
    return noise.mul_(scale)


def make_state_dict(spec: Spec, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state dict with one tensor per spec entry; floats in ``dtype``."""
    out = {}
    for name, entry in spec.items():
        shape, own = _split(entry)
        out[name] = make_tensor(name, shape, own or dtype, seed)
    return out


def finetune_like(base_sd: Mapping[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A "fine-tuned" copy: every float tensor plus ``scale * N(0, 1)`` noise (computed
    in float32, stored in the tensor's dtype); integer and bool tensors copied as they are."""
    out = {}
    for name, tensor in base_sd.items():
        if tensor.dtype.is_floating_point:
            moved = tensor.to(torch.float32) + _perturbation(name, tuple(tensor.shape), seed, scale)
            out[name] = moved.to(tensor.dtype)
        else:
            out[name] = tensor.clone()
    return out


def llama_spec(hidden: int, layers: int, vocab: int, intermediate: int) -> dict[str, object]:
    """The tensor names and shapes of a Llama-style decoder (no grouped-query attention),
    plus an int64 ``model.position_ids`` buffer so integer pass-through can be tested."""
    spec: dict[str, object] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            spec[f"{p}self_attn.{proj}.weight"] = (hidden, hidden)
        spec[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        spec[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        spec[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        spec[f"{p}input_layernorm.weight"] = (hidden,)
        spec[f"{p}post_attention_layernorm.weight"] = (hidden,)
    spec["model.norm.weight"] = (hidden,)
    spec["model.position_ids"] = ((1, POSITIONS), torch.int64)
    spec["lm_head.weight"] = (vocab, hidden)
    return spec


def llama_bytes(hidden: int, layers: int, vocab: int, intermediate: int, itemsize: int = 4) -> int:
    """Bytes of ``llama_spec(...)`` with floats of ``itemsize`` bytes."""
    floats = 2 * vocab * hidden + hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
    return floats * itemsize + POSITIONS * 8


def llama_spec_for_bytes(total_bytes: int, *, layers: int = 8, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """A Llama-shaped spec whose tensors total about ``total_bytes`` (within a few percent
    for sizes above a megabyte): ``intermediate = 8/3 hidden``, ``vocab`` about ``8 hidden``.

    >>> spec = llama_spec_for_bytes(1_500_000_000)
    >>> total = sum(_numel(_split(e)[0]) * (8 if _split(e)[1] else 4) for e in spec.values())
    >>> abs(total - 1_500_000_000) / 1_500_000_000 < 0.02
    True
    """
    itemsize = torch.empty((), dtype=dtype).element_size()

    def dims(hidden: int) -> tuple[int, int, int, int]:
        return hidden, layers, 8 * hidden, max(8, (8 * hidden // 3) // 8 * 8)

    # The largest hidden size (a multiple of 8) that fits, then the vocabulary grown
    # to make up the rest: each extra token adds one row to the embedding and the head.
    hidden = 8
    while llama_bytes(*dims(hidden + 8), itemsize=itemsize) <= total_bytes:
        hidden += 8
    hidden, layers, vocab, intermediate = dims(hidden)
    short = total_bytes - llama_bytes(hidden, layers, vocab, intermediate, itemsize=itemsize)
    vocab += max(0, short) // (2 * hidden * itemsize)
    return llama_spec(hidden, layers, vocab, intermediate)


def _config_for(names: list[str], shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype | None) -> dict:
    config: dict[str, object] = {"model_type": "tvlang-synthetic"}
    if "model.embed_tokens.weight" in shapes and "model.layers.0.mlp.up_proj.weight" in shapes:
        vocab, hidden = shapes["model.embed_tokens.weight"]
        layers = len({n.split(".")[2] for n in names if n.startswith("model.layers.")})
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0],
            "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 64) if hidden % 64 == 0 else 1,
            "vocab_size": vocab,
            "tie_word_embeddings": False,
        }
    if dtype is not None:
        config["torch_dtype"] = str(dtype).replace("torch.", "")
    return config


def _write_config(directory: str, config: bool | Mapping, names, shapes, dtype) -> None:
    if config is False:
        return
    body = dict(config) if isinstance(config, Mapping) else _config_for(names, shapes, dtype)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(body, f, indent=2)
        f.write("\n")


def write_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    shard_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
    config: bool | Mapping = True,
    force: bool = False,
) -> str:
    """Write a state dict as a ``.safetensors`` file (``path`` ends so) or an HF-style
    directory: ``config.json`` (``config=True`` derives one, a mapping is written
    as given, False writes none) and ``model.safetensors`` or shards plus index.
    Returns the path."""
    from tvlang.io import StreamingWriter, TensorInfo

    path = os.fspath(path)
    layout = [TensorInfo.of(name, t, "") for name, t in state_dict.items()]
    with StreamingWriter(path, layout, shard_size=shard_size, metadata=metadata, force=force) as writer:
        for name, tensor in state_dict.items():
            writer.write(name, tensor)
    if not path.endswith(".safetensors"):
        floats = [t.dtype for t in state_dict.values() if t.dtype.is_floating_point]
        shapes = {n: tuple(t.shape) for n, t in state_dict.items()}
        _write_config(path, config, list(state_dict), shapes, floats[0] if floats else None)
    return path


def write_synthetic(
    path: str | os.PathLike,
    spec: Spec,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    finetune_of: int | None = None,
    scale: float = 0.01,
    shard_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
    config: bool | Mapping = True,
    force: bool = False,
) -> str:
    """Like ``write_checkpoint(path, make_state_dict(spec, seed, dtype))`` but made and
    written one tensor at a time, so a 1.5 GB model needs only one tensor of memory.
    With ``finetune_of=b`` it writes ``finetune_like(make_state_dict(spec, b, dtype), seed, scale)``.
    """
    from tvlang.io import StreamingWriter, TensorInfo

    path = os.fspath(path)
    entries = {name: _split(entry) for name, entry in spec.items()}
    layout = []
    for name, (shape, own) in entries.items():
        d = own or dtype
        layout.append(TensorInfo(name, shape, d, _numel(shape) * torch.empty((), dtype=d).element_size(), ""))
    with StreamingWriter(path, layout, shard_size=shard_size, metadata=metadata, force=force) as writer:
        for info in layout:
            if finetune_of is None:
                tensor = make_tensor(info.name, info.shape, info.dtype, seed)
            else:
                tensor = make_tensor(info.name, info.shape, info.dtype, finetune_of)
                if info.dtype.is_floating_point:
                    moved = tensor.to(torch.float32) + _perturbation(info.name, info.shape, seed, scale)
                    tensor = moved.to(info.dtype)
            writer.write(info.name, tensor)
    if not path.endswith(".safetensors"):
        _write_config(path, config, list(entries), {n: s for n, (s, _) in entries.items()}, dtype)
    return path


def module_with(state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose buffers are the tensors of ``state`` themselves (not copies), under the
    same dotted names (submodules made on the way), so that ``module.state_dict()`` has the
    same names: what ``tvlang.apply_to`` writes into, in tests and benchmarks.

    >>> m = module_with({"layers.0.w": torch.zeros(2), "norm": torch.ones(1)})
    >>> sorted(m.state_dict()), m.get_submodule("layers.0").w.tolist()
    (['layers.0.w', 'norm'], [0.0, 0.0])
    """
    root = torch.nn.Module()
    for name, tensor in state.items():
        parent = root
        *path, last = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_buffer(last, tensor)
    return root
