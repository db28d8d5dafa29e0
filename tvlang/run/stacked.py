"""Layer surgery as a reader: ``load(..., layers=[START, END])`` and ``stack(...)``
(tvlang.language.surgery) opened as one checkpoint whose layers are the parts' in turn.

``StackedReader`` maps each of its names to a part's reader and name: the layers of part
``k`` are renumbered after those of parts ``0..k-1``; tensors outside the layers come from
the first part when they are embeddings, else from the last part. Reads, ranged reads and
prefetches go to the part's reader, so a stack streams as any checkpoint does.

>>> import torch
>>> from tvlang.io import open_reader
>>> a = open_reader({"model.embed.weight": torch.zeros(2), "model.layers.0.w": torch.zeros(1),
...                  "model.layers.1.w": torch.ones(1), "model.norm.weight": torch.zeros(2)})
>>> b = open_reader({"model.embed.weight": torch.ones(2), "model.layers.0.w": torch.full((1,), 2.0),
...                  "model.norm.weight": torch.ones(2)})
>>> s = StackedReader([(a, (1, 2)), (b, None)])
>>> s.names(), s.num_layers
(['model.embed.weight', 'model.layers.0.w', 'model.layers.1.w', 'model.norm.weight'], 2)
>>> [s.read(n).tolist() for n in s.names()]
[[0.0, 0.0], [1.0], [2.0], [1.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from tvlang.errors import TvlangError
from tvlang.io import TensorReader
from tvlang.ops.select import LAYER_WORDS, count_layers, layer_index

__all__ = ["LAYER_COUNT_KEYS", "StackedReader", "is_embedding", "part_range", "renumbered"]

#: config.json keys of the layer count, as mergekit's architectures name them.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def is_embedding(name: str) -> bool:
    """Whether a tensor outside the layers comes before them (from a stack's first part)."""
    parts = name.split(".")
    return any("embed" in part for part in parts) or bool({"wte", "wpe"} & set(parts))


def renumbered(name: str, index: int) -> str:
    """``name`` with its layer index replaced by ``index``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in LAYER_WORDS and parts[i + 1].isdigit():
            parts[i + 1] = str(index)
            return ".".join(parts)
    raise ValueError(f"{name} has no layer index")


class StackedReader(TensorReader):
    """The parts' layers in turn: ``parts`` is ``[(reader, (start, end) or None), ...]``."""

    def __init__(self, parts: list[tuple[TensorReader, tuple[int, int] | None]], label: str | None = None) -> None:
        first = parts[0][0]
        super().__init__(label or " + ".join(_part_label(r, span) for r, span in parts))
        self.parts = parts
        self.root, self.kind = first.root, None
        self.paths = tuple(dict.fromkeys(p for reader, _ in parts for p in reader.paths))
        self._map: dict[str, tuple[TensorReader, str]] = {}
        before, layers, after = [], [], []
        offset = 0
        for number, (reader, span) in enumerate(parts):
            start, end = part_range(reader, span)
            for name in reader.names():
                index = layer_index(name)
                if index is None:
                    if is_embedding(name) and number == 0:
                        before.append((name, reader, name))
                    elif not is_embedding(name) and number == len(parts) - 1:
                        after.append((name, reader, name))
                elif start <= index < end:
                    layers.append((offset + index - start, name, reader))
            offset += end - start
        layers.sort(key=lambda item: item[0])  # stable: a layer's tensors keep their file order
        entries = before + [(renumbered(name, new), reader, name) for new, name, reader in layers] + after
        for new, reader, old in entries:
            self._map[new] = (reader, old)
            self._infos[new] = dataclasses.replace(reader.info(old), name=new)
        self.num_layers = offset

    def read(self, name: str) -> torch.Tensor:
        reader, old = self._where(name)
        return reader.read(old)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        reader, old = self._where(name)
        return reader.read_range(old, start, stop)

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        reader, old = self._where(name)
        reader.read_into(old, start, stop, out)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        reader, old = self._where(name)
        reader.prefetch(old, start, stop)

    def _where(self, name: str) -> tuple[TensorReader, str]:
        if name not in self._map:
            self.info(name)  # the reader's own error
        return self._map[name]

    def park(self) -> None:
        for reader, _ in self.parts:
            reader.park()

    def close(self) -> None:
        for reader, _ in self.parts:
            reader.close()

    def config_files(self) -> dict[str, bytes]:
        """The first part's ``config.json`` with its layer count set to the stack's (empty if it has none)."""
        if not self.root:
            return {}
        try:
            with open(os.path.join(self.root, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(config, dict):
            return {}
        for key in LAYER_COUNT_KEYS:
            if isinstance(config.get(key), int):
                config[key] = self.num_layers
        return {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def part_range(reader: TensorReader, span: tuple[int, int] | None) -> tuple[int, int]:
    """The layers ``[start, end)`` a part takes: ``span``, or every layer; an error if beyond the model's."""
    count = count_layers(reader.names())
    if count is None:
        raise TvlangError(f"{reader.label} has no layers (no tensor name has a layer index), so it cannot "
                          "be a part of a stack")
    start, end = span if span is not None else (0, count)
    if end > count:
        raise TvlangError(f"layers=[{start}, {end}] is beyond the {count} layers of {reader.label}",
                          notes=(f"its layers are [0, {count}]",))
    return start, end


def _part_label(reader: TensorReader, span: tuple[int, int] | None) -> str:
    return reader.label if span is None else f"{reader.label}[{span[0]}:{span[1]}]"
