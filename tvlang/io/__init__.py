"""Checkpoint readers and the streaming writer (see docs/io.md).

Public names: ``TensorInfo``, ``TensorReader``, ``open_reader``, ``StreamingWriter``,
``release`` (unmap the used part of a mapped tensor), and the output-path checks.
Modules: ``base`` (the reader interface), ``safetensors_format``, the readers
(``safetensors_file``, ``sharded``, ``torch_file``, ``open``), ``atomic`` (the
atomic-replace transaction), ``output_paths``, ``writer`` and ``state_dict_writer``
(``-o NAME.pt``: a ``torch.save`` state dict, built in memory).
"""

from tvlang.io.base import TensorInfo, TensorReader
from tvlang.io.open import WEIGHT_FILES, find_weights, open_reader, peek_kind
from tvlang.io.output_paths import (
    COPIED_DIRS,
    COPIED_FILES,
    check_distinct_outputs,
    check_output_path,
    output_format,
    replaceable,
)
from tvlang.io.safetensors_file import SafetensorsReader, release
from tvlang.io.safetensors_format import (
    DTYPE_FROM_SAFETENSORS,
    INDEX_NAME,
    SAFETENSORS_FROM_DTYPE,
    SINGLE_NAME,
    shard_name,
)
from tvlang.io.sharded import ShardedReader
from tvlang.io.state_dict_writer import StateDictWriter, open_writer
from tvlang.io.torch_file import StateDictReader, TorchFileReader
from tvlang.io.writer import StreamingWriter

__all__ = [
    "COPIED_DIRS",
    "COPIED_FILES",
    "INDEX_NAME",
    "SINGLE_NAME",
    "StateDictWriter",
    "StreamingWriter",
    "check_distinct_outputs",
    "check_output_path",
    "replaceable",
    "shard_name",
    "DTYPE_FROM_SAFETENSORS",
    "SAFETENSORS_FROM_DTYPE",
    "WEIGHT_FILES",
    "SafetensorsReader",
    "ShardedReader",
    "StateDictReader",
    "TensorInfo",
    "TensorReader",
    "TorchFileReader",
    "find_weights",
    "open_reader",
    "open_writer",
    "output_format",
    "peek_kind",
    "release",
]
