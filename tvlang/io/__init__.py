"""Checkpoint readers and the streaming writer (see docs/io.md).

Public names: ``TensorInfo``, ``TensorReader``, ``open_reader``, ``StreamingWriter``,
``release`` (unmap the used part of a mapped tensor), and the output-path checks.
Modules: ``base`` (the reader interface), ``safetensors_format``, the readers
(``safetensors_file``, ``sharded``, ``torch_file``, ``open``), ``atomic`` (the
atomic-replace transaction), ``output_paths``, ``writer`` and ``state_dict_writer``
(``-o NAME.pt``: a ``torch.save`` state dict, built in memory).

The names are imported when first used (PEP 562), so that importing one module of this
package does not import the others: the readers import torch, while the output checks, the
atomic replace, the headers and the streaming writer do not (the torch-free executor,
``tvlang.run.direct``, uses them).
"""

from __future__ import annotations

import importlib

#: each public name and the module that defines it
_HOMES = {
    "TensorInfo": "base",
    "TensorReader": "base",
    "WEIGHT_FILES": "open",
    "find_weights": "open",
    "open_reader": "open",
    "peek_kind": "open",
    "COPIED_DIRS": "output_paths",
    "COPIED_FILES": "output_paths",
    "check_distinct_outputs": "output_paths",
    "check_output_path": "output_paths",
    "output_format": "output_paths",
    "replaceable": "output_paths",
    "SafetensorsReader": "safetensors_file",
    "release": "safetensors_file",
    "DTYPE_FROM_SAFETENSORS": "safetensors_format",
    "INDEX_NAME": "safetensors_format",
    "SAFETENSORS_FROM_DTYPE": "safetensors_format",
    "SINGLE_NAME": "safetensors_format",
    "shard_name": "safetensors_format",
    "ShardedReader": "sharded",
    "StateDictWriter": "state_dict_writer",
    "open_writer": "state_dict_writer",
    "StateDictReader": "torch_file",
    "TorchFileReader": "torch_file",
    "StreamingWriter": "writer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
