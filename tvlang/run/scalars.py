"""Scalar outputs: the numbers a recipe computes from whole-model reductions.

A scalar output (``out = norm(a - pre)``, ``out = cos(a - pre, b - pre) * 2``) has no
tensors. Its reductions are scheduled like those a vector output's coefficients need
and run in the same streaming passes (``Session.reduce``: a reducer that needs two
passes, or a reduction over a model-scope threshold, takes its passes there), and its
value is arithmetic on them (``tvlang.plan.schedule.scalar_value``). An output that
needs no reduction (``2*lam``) reads nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from tvlang.errors import TvlangError
from tvlang.plan.ir import postorder
from tvlang.plan.schedule import scalar_value
from tvlang.run.bindings import bind
from tvlang.run.progress import progress_for
from tvlang.run.session import Session

if TYPE_CHECKING:
    from tvlang.plan.compiler import Plan

__all__ = ["scalars"]


def scalars(plan: Plan, bindings: Mapping[str, Any], outputs: list[str] | None = None, *, device: Any = "cpu",
            dtype: Any = "float32", missing: str = "error", progress: Any = False) -> dict[str, float]:
    """The values of the scalar outputs ``outputs`` (default: every scalar output), by name.

    ``progress`` is ``run``'s (:mod:`tvlang.run.progress`): a tqdm bar per reduction pass
    on a terminal, or a callable given a ``ProgressEvent`` per tensor.

    >>> import torch, tvlang
    >>> plan = tvlang.compile("out n = norm(a - pre)\\nout c = cos(a - pre, b - pre) * 2\\n")
    >>> pre, a, b = ({"w": torch.tensor(v)} for v in ([0.0, 0.0], [3.0, 4.0], [4.0, 3.0]))
    >>> scalars(plan, {"pre": pre, "a": a, "b": b})
    {'n': 5.0, 'c': 1.92}
    """
    roots = dict(plan.schedule.scalars)
    names = list(roots) if outputs is None else list(outputs)
    for name in names:
        if name not in plan.outputs:
            raise TvlangError(f"no output named '{name}'; the outputs are {', '.join(plan.outputs)}")
        if name not in roots:
            kind = "model" if plan.output_kind(name) == "model" else "task vector"
            raise TvlangError(f"output '{name}' is a {kind}, not a number: Plan.evaluate() gives its tensors")
    if not any(node.op == "reduce" for node in postorder([roots[name] for name in names])):
        return {name: scalar_value(roots[name], {}) for name in names}  # constants: nothing to read
    bound = bind(plan, bindings)
    bar = None
    try:
        plan = bound.plan  # re-typed for the bindings, if a binding is a task vector
        roots = dict(plan.schedule.scalars)
        session = Session(bound, device=device, dtype=dtype, missing=missing)
        bar = progress_for(progress)
        session.reduce(bar)
        return {name: scalar_value(roots[name], session.reduced) for name in names}
    except TvlangError as exc:
        raise exc.with_context(source=plan.text, filename=plan.filename) from None
    finally:
        if bar is not None:
            bar.close()  # the bar's line is cleared on success, error and Ctrl-C alike
        bound.close()
