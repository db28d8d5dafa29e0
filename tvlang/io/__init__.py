"""Checkpoint readers and the streaming writer (see docs/io.md).

Public names: ``TensorInfo``, ``TensorReader``, ``open_reader``, ``StreamingWriter``,
``release`` (unmap the used part of a mapped tensor).
"""

from tvlang.io.base import DTYPE_FROM_SAFETENSORS, SAFETENSORS_FROM_DTYPE, TensorInfo, TensorReader
from tvlang.io.open import WEIGHT_FILES, find_weights, open_reader, peek_kind
from tvlang.io.safetensors_file import SafetensorsReader, release
from tvlang.io.sharded import ShardedReader
from tvlang.io.torch_file import StateDictReader, TorchFileReader
from tvlang.io.writer import (
    COPIED_DIRS,
    COPIED_FILES,
    INDEX_NAME,
    SINGLE_NAME,
    StreamingWriter,
    check_distinct_outputs,
    check_output_path,
    replaceable,
    shard_name,
)

__all__ = [
    "COPIED_DIRS",
    "COPIED_FILES",
    "INDEX_NAME",
    "SINGLE_NAME",
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
    "peek_kind",
    "release",
]
