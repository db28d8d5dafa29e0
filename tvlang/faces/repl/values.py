"""What an expression shows in the REPL: a summary of a model or task vector, or a number.

Both come from the plan of ``out = EXPR`` (``Workspace.compile``). A Model or a
Delta is summarised from the file headers (kind, tensors, parameters, dtype, the
sources it reads; no tensor is read). A scalar output is computed by the run
layer (``Plan.scalar``): its whole-model reductions stream over the inputs in as
many passes as they need, then the arithmetic on them. A constant reads nothing.
"""

from __future__ import annotations

import math
import os
from typing import Any

from tvlang.faces.repl.session import VALUE, Compiled, Workspace
from tvlang.plan.compiler import Plan

__all__ = ["adapter_summary", "describe", "number", "reads", "scalar_lines", "summary"]

_TITLES = {"model": "Model", "delta": "Delta (task vector)"}


def describe(space: Workspace, compiled: Compiled, *, device: str, dtype: str, progress: bool = False) -> list[str]:
    """The lines the REPL prints for the value of ``out`` (``progress``: a bar per pass while a
    scalar's reductions stream, on a terminal)."""
    if compiled.plan.output_kind(VALUE) == "scalar":
        return scalar_lines(space, compiled, device=device, dtype=dtype, progress=progress)
    return summary(space, compiled)


def scalar_lines(space: Workspace, compiled: Compiled, *, device: str, dtype: str,
                 progress: bool = False) -> list[str]:
    """``Scalar: VALUE`` and, when tensors were read, which."""
    plan = compiled.plan
    with compiled.spans():
        value = plan.scalar(space.bindings, device=device, dtype=dtype, progress=progress, allow_unused=True)
    lines = [f"Scalar: {number(value)}"]
    sources = reads(space, plan, plan.sources_read(VALUE))
    if sources:
        lines.append(f"  reads: {sources}")
    return lines


def summary(space: Workspace, compiled: Compiled) -> list[str]:
    """Kind, tensors, parameters and dtypes of a Model or Delta, from the headers of its inputs."""
    from tvlang.run.evaluate import bind, layout  # imports torch

    with compiled.spans():
        bound = bind(compiled.plan, space.bindings)
        try:
            lay = layout(bound, "error")
            kind = bound.plan.output_kind(VALUE)
            sources = reads(space, bound.plan, bound.plan.sources_read(VALUE))
        finally:
            bound.close()
    names = list(lay.names) + (list(lay.passthrough) if kind == "model" else [])
    params = sum(math.prod(int(d) for d in lay.infos[n].shape) for n in lay.names)
    dtypes = sorted({str(lay.infos[n].dtype).replace("torch.", "") for n in lay.names})
    extra = f" (+{len(lay.passthrough)} integer buffers from the base)" if kind == "model" and lay.passthrough else ""
    return [f"{_TITLES.get(kind, kind)}: {len(names)} tensors{extra}, {params:,} parameters, "
            f"{', '.join(dtypes) or 'no float tensors'}",
            f"  reads: {sources or '(nothing)'}"]


def reads(space: Workspace, plan: Plan, keys: list[str]) -> str:
    """Sources by name, with the file each is bound to or loaded from."""
    parts = []
    for key in keys:
        spec = plan.optimized.sources.get(key)
        path = spec.path if spec is not None and spec.path is not None else None
        if path is None and key in space.bindings:
            value: Any = space.bindings[key]
            value = getattr(value, "value", value)
            path = value if isinstance(value, str) else None
        if path and not key.isidentifier():  # an inline load("...") is shown by its file
            parts.append(path)
        elif path and os.path.normpath(path) != os.path.normpath(key):
            parts.append(f"{key} ({path})")
        else:
            parts.append(key)
    return ", ".join(parts)


def adapter_summary(adapter: Any) -> str:
    """A PEFT LoRA adapter (``tvlang.io.lora.LoraAdapter``) as ``:sources`` shows it: the modules it
    adapts, by their last name, its rank(s) and scale, and the full weights it carries."""
    factors = list(adapter.factors.values())
    kinds = dict.fromkeys(f.name.rsplit(".", 2)[-2] if f.name.count(".") else f.name for f in factors)
    ranks = sorted({f.rank for f in factors})
    scales = sorted({f.scale for f in factors})
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    scale = f"scale {number(scales[0])}" if len(scales) == 1 else f"scales {number(scales[0])}-{number(scales[-1])}"
    rslora = "rsLoRA " if adapter.config.get("use_rslora") else ""
    text = f"LoRA adapter: {len(factors)} modules ({', '.join(kinds)}), {rank}, {rslora}{scale}"
    if adapter.full:
        text += f", {len(adapter.full)} full weights (modules_to_save)"
    return text


def number(value: float) -> str:
    """A value as the REPL prints it: a whole number without a point, others to 8 digits.

    >>> number(2.0), number(-0.25), number(1/3)
    ('2', '-0.25', '0.33333333')
    """
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.8g}"
