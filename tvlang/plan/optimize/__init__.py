"""Optimizer passes, one per module, run in the order of ``PASSES``.

Each pass is a plain function ``pass_(program, ctx) -> program`` over the
``program`` node of an :class:`tvlang.plan.ir.IRProgram`; ``OptimizerFlags`` has one
switch per pass (polars-style), so tests and ``explain`` can compare plans with
any pass turned off.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tvlang.plan.ir import Interner, IRProgram, Node
from tvlang.plan.optimize.cancel import cancel
from tvlang.plan.optimize.fold import fold
from tvlang.plan.optimize.linearize import linearize
from tvlang.plan.optimize.share import share

__all__ = ["OptimizerFlags", "PASSES", "OptimizeContext", "optimize"]


@dataclass(frozen=True)
class OptimizerFlags:
    """One switch per pass; all on by default."""

    linearize: bool = True  # + - * / of vectors -> one linear combination of leaves
    fold: bool = True  # constant arithmetic and coefficients folded, equal leaves merged
    cancel: bool = True  # zero-coefficient terms dropped: `pre + (ft - pre)` is `ft`
    share: bool = True  # a linear subexpression used by several outputs computed once

    @classmethod
    def none(cls) -> "OptimizerFlags":
        return cls(**{f.name: False for f in fields(cls)})


@dataclass
class OptimizeContext:
    flags: OptimizerFlags
    interner: Interner
    # Linear subexpressions that the program uses more than once, as
    # {leaf: coefficient} maps (recorded by linearize, used by share).
    shared_linear: list[Node] = field(default_factory=list)


# In order. Each entry: (flag name, pass function).
PASSES = (
    ("linearize", linearize),
    ("fold", fold),
    ("cancel", cancel),
    ("share", share),
)


def optimize(program: IRProgram, flags: OptimizerFlags | None = None) -> IRProgram:
    """Run every enabled pass over ``program``; returns a new IRProgram."""
    flags = flags or OptimizerFlags()
    ctx = OptimizeContext(flags, program.interner)
    node = program.as_node()
    for name, pass_ in PASSES:
        if getattr(flags, name):
            node = pass_(node, ctx)
    return program.with_root(node)
