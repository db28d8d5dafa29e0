"""PyTorch state dicts: ``.bin``/``.pt`` files and in-memory ones.

Files are loaded only through ``torch.load(path, weights_only=True)``: a
pickle that needs any class outside plain tensors and containers is refused,
never run. Zip checkpoints (what ``torch.save`` writes since torch 1.6) are
mapped with ``mmap=True``, so loading costs no memory and a tensor's bytes
are paged in when it is read; older (legacy) files cannot be mapped and are
loaded into memory whole.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import torch

from tvlang.io.base import TensorInfo, TensorReader, io_error

__all__ = ["StateDictReader", "TorchFileReader", "load_state_dict_file"]

# Keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def _owned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares nothing with ``tensor``."""
    out = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
    out.copy_(tensor.detach())
    return out


def _find_state_dict(label: str, obj: object) -> Mapping[str, torch.Tensor]:
    """The mapping of names to tensors inside what ``torch.load`` returned."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if not obj:
            return obj
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:3]
        raise io_error(
            label,
            "is not a state dict: entries " + ", ".join(repr(k) for k in bad) + " are not tensors",
            notes=("a state dict maps tensor names to tensors (model.state_dict());"
                   f" nested dicts are looked for under {', '.join(_WRAPPER_KEYS)}",),
        )
    raise io_error(label, f"is not a state dict: it holds a {type(obj).__name__}")


def load_state_dict_file(path: str, label: str) -> Mapping[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` (and ``mmap`` where the file allows it)."""
    if not os.path.exists(path):
        raise io_error(label, "no such file")
    if os.path.isdir(path):
        raise io_error(label, "is a directory, not a PyTorch checkpoint")
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; all mean "cannot load safely"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or type(exc).__name__ == "UnpicklingError":
            raise io_error(
                label,
                "refusing to load: the pickle needs more than plain tensors"
                " (torch.load(weights_only=True) failed; tvlang never runs code from a checkpoint)",
                notes=(first[:300], "convert it to safetensors in a trusted environment"),
            ) from None
        raise io_error(label, f"cannot load as a PyTorch checkpoint: {first[:300]}") from None
    state = _find_state_dict(label, obj)
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise io_error(label, f"is not a state dict: key {bad[0]!r} is not a string")
    return state


class StateDictReader(TensorReader):
    """Tensors already in memory: a ``Mapping[str, Tensor]``.

    ``read`` returns a copy on the CPU, so callers can modify it freely.

    >>> import torch
    >>> r = StateDictReader({"b": torch.zeros(2), "a": torch.ones(1, dtype=torch.int64)}, label="<sd>")
    >>> r.names(), r.info("a").dtype
    (['b', 'a'], torch.int64)
    """

    def __init__(self, state: Mapping[str, torch.Tensor], *, label: str = "<state dict>", file: str | None = None) -> None:
        super().__init__(label)
        for name, tensor in state.items():
            if not isinstance(name, str):
                raise io_error(label, f"key {name!r} is not a string")
            if not isinstance(tensor, torch.Tensor):
                raise io_error(label, f"entry '{name}' is a {type(tensor).__name__}, not a tensor", tensor=name)
            self._infos[name] = TensorInfo.of(name, tensor, file if file is not None else label)
        self._state = state

    def read(self, name: str) -> torch.Tensor:
        self.info(name)
        return _owned_copy(self._state[name])

    def close(self) -> None:
        self._state = {}


class TorchFileReader(StateDictReader):
    """A ``.bin``/``.pt`` file written by ``torch.save(state_dict, path)``."""

    def __init__(self, path: str | os.PathLike, *, label: str | None = None) -> None:
        path = os.fspath(path)
        label = label if label is not None else path
        super().__init__(load_state_dict_file(path, label), label=label)
        resolved = os.path.realpath(path)
        self.paths = (resolved,)
        parent = os.path.dirname(resolved)
        self.root = parent if os.path.isfile(os.path.join(parent, "config.json")) else None
