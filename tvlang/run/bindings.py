"""Bindings: what each free name of a plan is bound to, opened as readers.

``bind`` opens only the sources the plan reads; a binding that turns out to be a
task vector re-types its name (``binding_kind``), which can change what the plan
reads. ``protected_paths`` lists every path the recipe names, read or not: no
output may replace one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from tvlang.errors import TvlangError
from tvlang.io import TensorReader, open_reader, peek_kind
from tvlang.io.hub import is_reference, open_hub
from tvlang.io.lora import LoraAdapter
from tvlang.plan.ir import SourceSpec
from tvlang.plan.records import DeltaBinding
from tvlang.run.adapters import attach, lora_path, open_adapter
from tvlang.run.align import Alignment, align_inputs
from tvlang.run.stacked import StackedReader, part_range

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["Bound", "bind", "binding_kind", "open_input", "protected_paths", "refuse_adapter"]

ADAPTER_CONFIG = "adapter_config.json"


def open_input(value: Any, label: str | None = None) -> TensorReader:
    """A reader of what a recipe or a binding names: an ``hf:`` reference, a path, a state dict, a module."""
    if is_reference(value):
        return open_hub(value)
    refuse_adapter(value)
    return open_reader(value, label=label)


def refuse_adapter(value: Any) -> None:
    """A PEFT adapter directory is not a model: say so, and how adapters are used today."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            raise TvlangError(
                f"{path} is a PEFT adapter directory ({ADAPTER_CONFIG}), not a model: its tensors are"
                " LoRA factors, not weights",
                notes=(f'read it as a task vector: lora("{path}") in a recipe, --bind NAME=lora:{path} on the'
                       f' command line, tvlang.lora("{path}") in the API (docs/adapters.md)',),
            )


@dataclass
class Bound:
    """A plan re-typed for its bindings, with a reader per source it reads."""

    plan: Plan
    readers: dict[str, TensorReader]
    borrowed: set[str]  # sources whose tensors belong to the caller (never mutate)
    base: str
    alignment: list[Alignment] = field(default_factory=list)  # how each input's names met the base's

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def _label(name: str, value: Any) -> str | None:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return f"<{type(value).__name__} bound to '{name}'>"


def bind(plan: Plan, bindings: Mapping[str, Any]) -> Bound:
    """Open every source the plan reads; re-type free names bound to task vectors."""
    free = plan.checked.sources
    missing = [name for name in free if name not in bindings]
    if missing:
        raise TvlangError(f"no binding for {', '.join(repr(m) for m in missing)}",
                          notes=("bind each name to a checkpoint (--bind name=PATH, or the bindings dict)",))
    opened: dict[str, TensorReader] = {}
    adapters: dict[str, LoraAdapter] = {}  # LoRA sources: readers once the base is known
    borrowed: set[str] = set()
    kinds: dict[str, str] = {}

    def open_source(key: str) -> None:
        spec = plan.optimized.sources[key]
        adapter = lora_path(bindings[key]) if spec.path is None else spec.path if spec.func == "lora" else None
        if adapter is not None:
            try:
                adapters[key] = open_adapter(adapter)
            except TvlangError as exc:
                if exc.span is None and spec.path is not None:
                    exc.span = spec.span
                raise
            kinds[key] = "delta"
            return
        if spec.path is None:  # a free name: its binding says what it is
            value = bindings[key]
            marked = isinstance(value, DeltaBinding)
            if marked:
                value = value.value
            try:
                reader = open_input(value, _label(key, value))
            except TvlangError as exc:
                if isinstance(value, (str, os.PathLike)):
                    exc.notes = (*exc.notes, f"note: '{key}' is bound to this path (--bind {key}=..., or the bindings)")
                raise
            if not isinstance(value, (str, os.PathLike)):
                borrowed.add(key)
            kinds[key] = "delta" if marked or reader.kind == "delta" else "model"
        elif spec.func == "stack" or spec.layers is not None:
            reader = open_stack(spec)
        else:
            try:
                reader = open_input(spec.path, spec.path)
            except TvlangError as exc:
                if exc.span is None:  # point at the load() that names the file
                    exc.span = spec.span
                raise
            if spec.kind == "model" and reader.kind == "delta":
                reader.close()
                raise TvlangError(f"'{spec.path}' is a task vector (its metadata says so); load it with load_delta()",
                                  spec.span, source=plan.text, filename=plan.filename)
        opened[key] = reader

    try:
        # Open only what the plan reads (a source whose coefficients cancel is
        # never opened); a bound task vector re-types its name, which can
        # change what the plan reads, so repeat until nothing changes.
        original = plan
        for _ in range(len(plan.optimized.sources) + 1):
            for key in plan.schedule.sources_read:
                if key not in opened and key not in adapters:
                    open_source(key)
            retyped = original.for_kinds(kinds)
            if retyped is plan:
                break
            plan = retyped
        if not plan.schedule.sources_read:  # nothing to read: the layout comes from the first source
            first = next(iter(plan.optimized.sources))
            if first not in opened and first not in adapters:
                open_source(first)
    except TvlangError as exc:
        for reader in [*opened.values(), *adapters.values()]:
            reader.close()
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    order = plan.schedule.sources_read
    every = order + [k for k in plan.optimized.sources if k not in order]
    models = [k for k in order if plan.optimized.sources[k].kind == "model"]
    base = models[0] if models else (order[0] if order else every[0])
    needed = set(order) | {base}
    for key in list(opened):
        if key not in needed:
            opened.pop(key).close()
    for key in list(adapters):
        if key not in needed:
            adapters.pop(key).close()
    try:
        adapted = attach(adapters, opened, base)
        renames = {key: (spec.strip_prefix, spec.add_prefix) for key, spec in plan.optimized.sources.items()
                   if spec.strip_prefix or spec.add_prefix}
        alignment = align_inputs(opened[base], opened, base, renames)
    except TvlangError as exc:
        for key, reader in opened.items():
            if key not in adapters:  # an adapter's reader closes its adapter, below
                reader.close()
        for adapter in adapters.values():
            adapter.close()
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    alignment = [entry for entry in alignment if entry.key not in adapters] + adapted
    return Bound(plan, opened, borrowed, base, alignment)


def open_stack(spec: SourceSpec) -> StackedReader:
    """A ``stack(...)`` or a ``load(..., layers=[START, END])`` opened as one reader."""
    opened: list[tuple[TensorReader, tuple[int, int] | None]] = []
    try:
        for part in spec.parts or (spec,):
            try:
                opened.append((open_input(part.path, part.path), part.layers))
                part_range(*opened[-1])
            except TvlangError as exc:
                if exc.span is None:
                    exc.span = part.span
                raise
            if opened[-1][0].kind == "delta":
                raise TvlangError(f"'{part.path}' is a task vector (its metadata says so): a stack's parts are "
                                  "models", part.span)
        try:
            return StackedReader(opened, label=spec.key)
        except TvlangError as exc:
            if exc.span is None:
                exc.span = spec.span
            raise
    except TvlangError:
        for reader, _ in opened:
            reader.close()
        raise


def binding_kind(value: Any) -> str:
    """``"delta"`` or ``"model"``: what a binding is, before it is opened.

    A value marked with ``tvlang.delta``, or a file whose metadata says it is a task
    vector, is a Delta; anything else (an unmarked state dict or module) a Model.
    """
    if isinstance(value, DeltaBinding) or lora_path(value) is not None:
        return "delta"
    if is_reference(value):
        try:
            reader = open_hub(value)
        except TvlangError:  # reported, with its reason, when the plan opens it
            return "model"
        try:
            return "delta" if reader.kind == "delta" else "model"
        finally:
            reader.close()
    if isinstance(value, (str, os.PathLike)):
        return peek_kind(os.fspath(value))
    return "model"


def protected_paths(plan: Plan, bindings: Mapping[str, Any]) -> list[str]:
    """Every path the recipe names or is bound to, read or not: no output may replace one.

    A source that the optimizer cancels (``pre + (ft - pre)`` never reads ``pre``)
    is still an input of the recipe as written.
    """
    specs = [part for spec in plan.unoptimized.sources.values() for part in (*spec.parts, spec)]
    paths = [spec.path for spec in specs if spec.path is not None]
    for name in plan.checked.sources:
        value = bindings.get(name)
        if isinstance(value, DeltaBinding):
            value = value.value
        value = lora_path(value) or value
        if isinstance(value, (str, os.PathLike)) and not is_reference(value):
            paths.append(os.fspath(value))
    return [path for path in paths if not is_reference(path)]  # a Hub reference's files are its reader's
