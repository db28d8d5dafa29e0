"""The reader interface shared by every checkpoint format, and the dtype table.

A reader knows every tensor's name, shape and dtype up front (from a header or
an index) and reads a tensor's bytes only when asked, so a whole model never
sits in memory.

>>> import torch
>>> from tvlang.io import open_reader
>>> r = open_reader({"w": torch.ones(2, 3)}, label="<state dict 'pre'>")
>>> r.names()
['w']
>>> r.info("w")
TensorInfo(name='w', shape=(2, 3), dtype=torch.float32, nbytes=24, file="<state dict 'pre'>")
>>> r.read("w").sum().item()
6.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvlang.errors import TvlangError

__all__ = [
    "DTYPE_FROM_SAFETENSORS",
    "SAFETENSORS_FROM_DTYPE",
    "TensorInfo",
    "TensorReader",
    "io_error",
    "kind_from_metadata",
]


def _safetensors_dtypes() -> dict[str, torch.dtype]:
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
    }
    # Types that only newer torch builds have: take those this build knows.
    optional = {
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
    }
    for code, attr in optional.items():
        dtype = getattr(torch, attr, None)
        if isinstance(dtype, torch.dtype):
            table[code] = dtype
    return table


# The dtype strings of the safetensors format and the torch dtypes they hold.
DTYPE_FROM_SAFETENSORS: dict[str, torch.dtype] = _safetensors_dtypes()
SAFETENSORS_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_SAFETENSORS.items()}


def io_error(label: str, message: str, *, tensor: str | None = None, notes: tuple[str, ...] = ()) -> TvlangError:
    """A data error about a checkpoint: the message starts with the file's label.

    ``filename`` is left for the recipe (the evaluator fills it in with
    ``with_context``), so the checkpoint is named in the message itself.
    """
    return TvlangError(f"{label}: {message}", tensor=tensor, notes=notes)


def kind_from_metadata(metadata: dict[str, str]) -> str | None:
    """``"delta"`` (or ``"model"``) when tvlang wrote the file and said so; else None."""
    value = metadata.get("tvlang.kind")
    return value if value in ("delta", "model") else None


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor; ``file`` is the file that holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    file: str

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, file: str) -> "TensorInfo":
        """The info of an in-memory tensor."""
        shape = tuple(int(d) for d in tensor.shape)
        return cls(name, shape, tensor.dtype, tensor.numel() * tensor.element_size(), file)


class TensorReader:
    """One checkpoint, read tensor by tensor. Subclasses fill in the tables.

    ``read(name)`` returns a CPU tensor that the caller owns: fresh memory (or a
    copy-on-write map of the file), never a view of a tensor the reader keeps or
    of a state dict the user passed in, so the caller may change it in place.
    """

    label: str
    metadata: dict[str, str]
    kind: str | None
    root: str | None
    # Resolved paths of the files this reader reads (empty for in-memory state).
    paths: tuple[str, ...]

    def __init__(self, label: str) -> None:
        self.label = label
        self.metadata = {}
        self.kind = None
        self.root = None
        self.paths = ()
        self._infos: dict[str, TensorInfo] = {}

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise io_error(self.label, f"has no tensor named '{name}'", tensor=name) from None

    def infos(self) -> list[TensorInfo]:
        """Every tensor's info, in file order."""
        return list(self._infos.values())

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label!r}: {len(self._infos)} tensors>"
