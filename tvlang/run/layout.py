"""The output layout: which tensors are computed, copied or left out, checked against the base.

Names, shapes and dtypes of every input are checked against the base before the
first byte is computed, under the ``missing`` policy (docs/evaluator.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from tvlang.errors import TvlangError
from tvlang.io import TensorInfo
from tvlang.ops.select import count_layers
from tvlang.plan.records import input_report
from tvlang.run.align import few
from tvlang.run.bindings import Bound, bind
from tvlang.run.options import MISSING_POLICIES
from tvlang.run.stacked import StackedReader

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["Layout", "input_reports", "layout", "notes", "validate", "validate_report"]



@dataclass
class Layout:
    names: list[str]  # float tensors computed, in base order
    passthrough: list[str]  # integer/bool tensors copied from the base
    copied: dict[str, list[str]]  # missing="base": name -> inputs lacking it (copied from the base)
    infos: dict[str, TensorInfo]  # base's info per name
    num_layers: int | None
    # A tied output head (lm_head.weight) that one side stores and the other does not, in a
    # model whose config ties it to the input embeddings: name -> the inputs that have it
    # where the base lacks it, or that lack it where the base has it. Left out of the output.
    tied: dict[str, list[str]] = field(default_factory=dict)


def layout(bound: Bound, missing: str) -> Layout:
    if missing not in MISSING_POLICIES:
        raise TvlangError(f"unknown missing-tensor policy '{missing}'; choose error, base or skip")
    base = bound.readers[bound.base]
    others = [(k, r) for k, r in bound.readers.items() if k != bound.base]
    names: list[str] = []
    passthrough: list[str] = []
    copied: dict[str, list[str]] = {}
    infos: dict[str, TensorInfo] = {}
    other_names = {k: set(r.names()) for k, r in others}
    tied_heads = _tied_heads(base)
    tied: dict[str, list[str]] = {}
    for name in base.names():
        info = base.info(name)
        infos[name] = info
        if not (info.dtype.is_floating_point or info.dtype.is_complex):
            passthrough.append(name)
            continue
        lacking = [k for k, _ in others if name not in other_names[k]]
        if lacking and name in tied_heads:  # a copy of the embeddings some inputs do not store
            tied[name] = lacking
            continue
        if lacking:
            if missing == "error":
                reader = bound.readers[lacking[0]]
                raise TvlangError(f"tensor '{name}' is in {base.label} but missing from {reader.label}",
                                  tensor=name, notes=(*_layer_counts(base, reader),
                                                      "choose a policy with --missing base|skip"))
            if missing == "base":
                copied[name] = lacking
            continue  # skip
        for key, reader in others:
            other = reader.info(name)
            if tuple(other.shape) != tuple(info.shape):
                raise TvlangError(
                    f"tensor '{name}' has shape {_shape(info.shape)} in {base.label} "
                    f"but {_shape(other.shape)} in {reader.label}", tensor=name)
            if not other.dtype.is_floating_point:
                raise TvlangError(f"tensor '{name}' is {_dtype(other.dtype)} in {reader.label} "
                                  f"but {_dtype(info.dtype)} in {base.label}", tensor=name)
        names.append(name)
    if missing == "error":
        base_names = set(base.names())
        for key, reader in others:
            extra = [n for n in reader.names() if n not in base_names and reader.info(n).dtype.is_floating_point]
            for name in [n for n in extra if n in tied_heads]:
                tied.setdefault(name, []).append(key)
            extra = [n for n in extra if n not in tied_heads]
            if extra:
                raise TvlangError(f"tensor '{extra[0]}' is in {reader.label} but missing from {base.label}",
                                  tensor=extra[0], notes=(*_layer_counts(base, reader),
                                                          "choose a policy with --missing base|skip"))
    floats = [n for n in base.names() if n not in passthrough]
    if floats and not names:
        policy = {"base": "copied from the base", "skip": "left out"}.get(missing, "")
        raise TvlangError(
            f"no tensor is computed: every float tensor of {base.label} is {policy} (--missing {missing}),"
            " so the output would be the base or empty",
            notes=("the inputs' names do not line up with the base's: see docs/io.md, 'Names that do not line up'",),
        )
    return Layout(names, passthrough, copied, infos, _count_layers(base.names()), tied)


#: Output heads that transformers ties to the input embeddings when a config says
#: ``tie_word_embeddings``; a checkpoint may store them (a state dict) or not (save_pretrained).
TIED_HEADS = ("lm_head.weight",)


def _tied_heads(base) -> set[str]:
    """The names of ``TIED_HEADS`` when the base's ``config.json`` ties its word embeddings."""
    root = getattr(base, "root", None)
    if not root:
        return set()
    try:
        with open(os.path.join(root, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return set()
    if not isinstance(config, dict):
        return set()
    text = config.get("text_config")
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings") if isinstance(text, dict) else None)
    return set(TIED_HEADS) if tie is True else set()


def notes(bound: Bound, layout: Layout, missing: str) -> list[str]:
    """What the summary says about names: each input's renaming and gaps, and the policy's effect."""
    lines = [line for line in (a.line(leave=set(layout.tied)) for a in bound.alignment) if line]
    base = bound.readers[bound.base]
    floats = [n for n in base.names() if n not in layout.passthrough]
    if layout.copied:
        copied = list(layout.copied)
        lines.append(f"{len(copied)} tensors copied from the base (--missing base): {few(copied)}")
    for name, keys in layout.tied.items():
        lines.append(f"{name} left out ({', '.join(keys)}): the model ties it to its input embeddings "
                     "(tie_word_embeddings), so one side stores it and the other does not; "
                     "from_pretrained ties it again")
    computed = set(layout.names) | set(layout.copied) | set(layout.tied)
    skipped = [n for n in floats if n not in computed]
    if skipped:
        lines.append(f"{len(skipped)} tensors left out of the output (--missing {missing}): {few(skipped)}")
    return lines


def input_reports(bound: Bound, layout: Layout, missing: str) -> list[dict[str, Any]]:
    """Per input, base first: how its names met the base's and what the ``missing`` policy did.

    ``matched``: the base's float tensors found in it (``renamed`` of them under another
    name, by ``rules``); ``missing``: those it lacks, of which ``from_base`` were taken
    from the base (``--missing base``) and ``skipped`` left out of the output
    (``--missing skip``); ``left_out``: its float tensors the base lacks, never read;
    ``tied``: output heads tied to the embeddings (``Layout.tied``) that it stores where
    another side does not, or lacks where another side has them, left out of the output
    and counted here only (not under ``missing`` or ``left_out``).
    The ``run --json`` schema (docs/cli-json.md) prints these dicts as they are.
    """
    base = bound.readers[bound.base]
    floats = [n for n in base.names() if n not in layout.passthrough]
    computed = set(layout.names)
    tied = set(layout.tied)
    base_tied = [n for n in floats if n in tied]
    reports = [input_report(bound.base, base.label, True, [], len(floats) - len(base_tied), 0, [], [], [], [],
                       base_tied)]
    for entry in bound.alignment:
        lacking = [n for n in entry.missing if n not in tied]
        extra = [n for n in entry.extra if n not in tied]
        its_tied = [n for n in layout.tied if n in base_tied or n in entry.extra]  # it stores or lacks them
        taken = [n for n in lacking if n in layout.copied]
        skipped = [n for n in lacking if n not in computed and n not in layout.copied]
        matched = entry.matched - sum(1 for n in base_tied if n not in entry.missing)
        reports.append(input_report(entry.key, entry.label, False, entry.rules, matched, entry.renamed,
                               lacking, taken, skipped, extra, its_tied))
    return reports


def validate(plan: Plan, bindings: Mapping[str, Any], *, missing: str = "error") -> Layout:
    """Check the bound inputs as ``run`` would, computing nothing.

    Opens every source the plan reads (headers only), checks names, shapes and
    dtypes against the base under the ``missing`` policy, closes the readers and
    returns the layout (the float tensors to compute, the integer ones copied).
    Raises the same :class:`TvlangError` that ``run`` would raise before writing.

    >>> import torch, tvlang
    >>> plan = tvlang.compile("pre + 0.5*(ft - pre)")
    >>> pre = {"w": torch.zeros(2, 3), "steps": torch.zeros(1, dtype=torch.int64)}
    >>> validate(plan, {"pre": pre, "ft": {"w": torch.ones(2, 3)}}).names
    ['w']
    >>> try:
    ...     validate(plan, {"pre": pre, "ft": {"w": torch.ones(3, 2)}})
    ... except tvlang.TvlangError as exc:
    ...     print(exc.message)
    tensor 'w' has shape (2, 3) in <dict bound to 'pre'> but (3, 2) in <dict bound to 'ft'>
    """
    return validate_report(plan, bindings, missing=missing)[0]


def validate_report(plan: Plan, bindings: Mapping[str, Any], *,
                    missing: str = "error") -> tuple[Layout, list[dict[str, Any]]]:
    """:func:`validate`, and what :func:`input_reports` says of the inputs (``check --json``)."""
    bound = bind(plan, bindings)
    try:
        shape = layout(bound, missing)
        return shape, input_reports(bound, shape, missing)
    except TvlangError as exc:
        raise exc.with_context(source=bound.plan.text, filename=bound.plan.filename) from None
    finally:
        bound.close()


def _layer_counts(base, reader) -> tuple[str, ...]:
    """A note when a stack (layer surgery) and another input have different numbers of layers."""
    if not any(isinstance(r, StackedReader) for r in (base, reader)):
        return ()
    ours, theirs = count_layers(base.names()), count_layers(reader.names())
    if ours is None or theirs is None or ours == theirs:
        return ()
    return (f"{base.label} has {ours} layers and {reader.label} {theirs}: merge models (or stacks) with as many "
            "layers",)


def _count_layers(names: list[str]) -> int | None:
    return count_layers(names)


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
