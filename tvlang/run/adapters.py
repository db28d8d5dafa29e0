"""LoRA adapters bound to a plan: ``lora("dir")`` in a recipe, ``lora:DIR`` on the command
line, ``tvlang.lora(path)`` (or the string ``"lora:DIR"``) in the API's bindings.

An adapter is opened (config and factor header) with the other sources; once the
base is known, :func:`attach` turns it into a :class:`~tvlang.io.lora.LoraReader`
over the base's names, its module names aligned to the base's as any input's are
(``tvlang.run.align``).
"""

from __future__ import annotations

import os
from typing import Any

from tvlang.errors import TvlangError
from tvlang.io import TensorReader
from tvlang.io.base import quoted
from tvlang.io.hub import is_reference, resolve
from tvlang.io.lora import LoraAdapter, LoraReader
from tvlang.plan.records import DeltaBinding, LoraBinding
from tvlang.run.align import Alignment, align

__all__ = ["LORA_PREFIX", "adapter_reader", "attach", "lora_path", "open_adapter"]

#: ``--bind NAME=lora:DIR`` (and the same string in the API's bindings) binds an adapter.
LORA_PREFIX = "lora:"


def lora_path(value: Any) -> str | None:
    """The adapter directory a binding names (``LoraBinding`` or ``"lora:DIR"``, perhaps
    marked with ``tvlang.delta``), else None."""
    if isinstance(value, DeltaBinding):
        value = value.value
    if isinstance(value, LoraBinding):
        return os.fspath(value.path)
    if isinstance(value, str) and value.startswith(LORA_PREFIX):
        return value[len(LORA_PREFIX):]
    return None


def open_adapter(path: str) -> LoraAdapter:
    """The adapter at ``path``: a local directory, or an ``hf:org/name[@rev][/folder]`` reference
    resolved through huggingface_hub's cache like any Hub input (``tvlang.io.hub``)."""
    if not is_reference(path):
        return LoraAdapter(path)
    source = resolve(path, kind="adapter")
    folder = source.reference.path
    adapter = LoraAdapter(source.local(folder) if folder else source.snapshot, label=path)
    adapter.hub = source
    return adapter


def attach(adapters: dict[str, LoraAdapter], readers: dict[str, TensorReader], base_key: str) -> list[Alignment]:
    """Put a ``LoraReader`` for each adapter into ``readers``, over the base's names.

    When the base is itself an adapter (a recipe that reads no model), every adapter's
    reader has the names all of them change (their union, in the order of the adapters),
    each zero where its adapter leaves a tensor alone: ``mean(lora(a), lora(b))`` of
    adapters of different modules is defined on both.
    """
    report: list[Alignment] = []
    if base_key in adapters:
        union: dict[str, tuple[int, ...]] = {}
        for adapter in adapters.values():
            union.update((name, adapter.shape(name)) for name in adapter.names() if name not in union)
        for key, adapter in adapters.items():
            readers[key] = LoraReader(adapter, None, names=union)
        return report
    base = readers[base_key]
    base_float = [info.name for info in base.infos() if info.dtype.is_floating_point]
    for key, adapter in adapters.items():
        if key == base_key:
            continue
        names = adapter.names()
        mapping, rules = align(base_float, names)  # adapter name after the rules -> adapter name
        present = set(base.names())
        unknown = [old for new, old in mapping.items() if new not in present]
        if unknown:
            raise TvlangError(
                f"{adapter.label}: tensor {quoted(adapter.key_of(unknown[0]))} changes {quoted(unknown[0])}, which"
                f" the base {base.label} does not have ({len(unknown)} of the adapter's {len(names)} tensors do not"
                " match)",
                tensor=unknown[0],
                notes=(f"the base's names look like '{base_float[0] if base_float else '(none)'}'",
                       "is this the adapter of another model? (its config names"
                       f" {adapter.config.get('base_model_name_or_path')!r})"),
            )
        readers[key] = LoraReader(adapter, base, mapping)
        entry = Alignment(key, adapter.label, rules, matched=len(base_float), renamed=0)
        if rules:
            entry.renamed = sum(1 for new, old in mapping.items() if new != old)
        report.append(entry)
    return report



def adapter_reader(value: Any, base: TensorReader | None) -> TensorReader | None:
    """A ``LoraReader`` when ``value`` names an adapter (over ``base``'s names, or its own
    without a base), else None: for the commands that open inputs themselves (similarity, bases)."""
    path = lora_path(value)
    if path is None:
        return None
    adapter = open_adapter(path)
    try:
        if base is None:
            return LoraReader(adapter, None)
        readers: dict[str, TensorReader] = {"": base}
        attach({"adapter": adapter}, readers, "")
        return readers["adapter"]
    except BaseException:
        adapter.close()
        raise
