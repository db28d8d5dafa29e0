"""tvlang: task arithmetic on model checkpoints, as a small language.

>>> import tvlang
>>> plan = tvlang.compile("pre + 0.4*(ft - pre)")
>>> plan.outputs, plan.sources_read()
(['out'], ['pre', 'ft'])

Importing tvlang does not import torch; running a plan does.
"""

from tvlang.errors import Span, TvlangError
from tvlang.language.syntax import parse, parse_expression
from tvlang.plan.compiler import Plan, RunSummary, compile, delta
from tvlang.plan.optimize import OptimizerFlags
from tvlang.plan.records import lora
from tvlang.version import __version__


def apply_to(module, plan, bindings=None, *, allow_unused: bool = False, **options) -> int:
    """Write ``plan``'s result into ``module``'s parameters in place (see ``tvlang.run.driver.apply_to``).

    ``plan`` is a compiled plan or recipe text; ``options`` are those of ``Plan.evaluate``
    (a binding the recipe does not read is an error unless ``allow_unused``).
    Returns the number of tensors written.
    """
    from tvlang.run.driver import apply_to as _apply_to  # the run layer: torch, when asked for

    if isinstance(plan, str):
        plan = compile(plan)
    if not isinstance(plan, Plan):  # a PendingPlan: typed by its bindings
        plan = plan.bound(bindings or {})
    plan.check_bindings(bindings, allow_unused=allow_unused)
    return _apply_to(plan, module, bindings or {}, **options)


def extract_lora(plan, bindings, out, *, rank: int, allow_unused: bool = False, **options):
    """Write a task-vector expression as a PEFT LoRA adapter directory (see
    ``tvlang.run.extract.extract_lora`` and docs/adapters.md); returns its ``Extraction``."""
    from tvlang.run.extract import extract_lora as _extract  # the run layer: torch, when asked for
    from tvlang.run.outputs import owned_by_this_run

    if isinstance(plan, str):
        plan = compile(plan)
    if not isinstance(plan, Plan):  # a PendingPlan: typed by its bindings
        plan = plan.bound(bindings or {})
    plan.check_bindings(bindings, allow_unused=allow_unused)
    with owned_by_this_run():  # a temporary a signal left before the extraction kept it goes too
        return _extract(plan, bindings or {}, out, rank=rank, **options)


__all__ = [
    "__version__",
    "apply_to",
    "compile",
    "delta",
    "extract_lora",
    "lora",
    "parse",
    "parse_expression",
    "OptimizerFlags",
    "Plan",
    "RunSummary",
    "Span",
    "TvlangError",
]
