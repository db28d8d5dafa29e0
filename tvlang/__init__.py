"""tvlang: task arithmetic on model checkpoints, as a small language.

>>> import tvlang
>>> plan = tvlang.compile("pre + 0.4*(ft - pre)")
>>> plan.outputs, plan.sources_read()
(['out'], ['pre', 'ft'])

Importing tvlang does not import torch; running a plan does.
"""

from tvlang.plan.compiler import Plan, RunSummary, compile, delta
from tvlang.errors import Span, TvlangError
from tvlang.plan.optimize import OptimizerFlags
from tvlang.language.syntax import parse, parse_expression
from tvlang.version import __version__


__all__ = [
    "__version__",
    "compile",
    "delta",
    "parse",
    "parse_expression",
    "OptimizerFlags",
    "Plan",
    "RunSummary",
    "Span",
    "TvlangError",
]
