"""Tensor names without torch: glob patterns, layer indices and the layer count.

Patterns are shell globs (``fnmatch``, case-sensitive) matched against the
full tensor name; several alternatives are separated by ``|``
(``"*.q_proj.*|*.k_proj.*"``); spaces around ``|`` are ignored.

A tensor's layer index is the integer path component right after the first
component named ``layers``, ``layer``, ``h``, ``blocks`` or ``block``
(``model.layers.7.mlp.up_proj.weight`` -> 7, ``transformer.h.3.attn.c_attn.weight``
-> 3, ``encoder.block.2.layer.0.SelfAttention.q.weight`` -> 2); tensors with
none (embeddings, final norm) have no layer. The name kernels (:mod:`tvlang.ops.select`), the
per-tensor options (:mod:`tvlang.ops.pertensor`) and the torch-free executor use these.

>>> layer_index("model.layers.7.mlp.up_proj.weight"), layer_index("model.embed_tokens.weight")
(7, None)
>>> matches("model.layers.0.self_attn.q_proj.weight", "*.k_proj.* | *.q_proj.*")
True
>>> count_layers(["model.layers.0.mlp.weight", "model.layers.11.mlp.weight", "lm_head.weight"])
12
>>> schedule_value([0.0, 1.0], 3, 7)  # layer 3 of 7: halfway along the list
0.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fnmatch import fnmatchcase

__all__ = ["matches", "layer_index", "count_layers", "schedule_value", "LAYER_WORDS"]

LAYER_WORDS = frozenset({"layers", "layer", "h", "blocks", "block"})


def matches(name: str, pattern: str) -> bool:
    """Whether ``name`` matches one of the ``|``-separated globs of ``pattern``."""
    return any(fnmatchcase(name, part.strip()) for part in pattern.split("|") if part.strip())


def layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in LAYER_WORDS and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def count_layers(names: Iterable[str]) -> int | None:
    """``1 + the largest layer index`` among ``names``, or ``None`` if no name has one.

    The evaluator stores it in ``TensorContext.num_layers``.
    """
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else None


def schedule_value(values: list[float], index: int, num_layers: int) -> float:
    """The list spread evenly from layer 0 to layer ``num_layers - 1``, interpolated linearly."""
    values = [float(v) for v in values]
    if len(values) == 1 or num_layers <= 1:
        return values[0]
    pos = min(max(index, 0), num_layers - 1) / (num_layers - 1) * (len(values) - 1)
    low = min(int(math.floor(pos)), len(values) - 2)
    frac = pos - low
    return values[low] * (1.0 - frac) + values[low + 1] * frac
