"""The streaming executor's public names, in one place (``tvlang.evaluate`` in 0.2).

The executor lives in the modules of ``tvlang.run``: ``options`` (dtype, device,
missing policy), ``bindings`` (``bind``), ``layout`` (``layout``, ``validate``),
``session`` (``Session``: reductions, then the main pass), ``whole`` and
``chunked`` (the two interpreters over one step table), ``buffers``, ``driver``
(``run``, ``stream``), ``scalars`` (the values of scalar outputs) and ``progress``.

Choices, documented in docs/evaluator.md:

- The *base* is the first model the plan reads (in reading order), else the
  first source. Its tensor names and order are the output's; integer and bool
  tensors are copied from it unchanged into Model outputs and left out of Delta
  outputs.
- ``missing="error"`` (default): every input must have every float tensor of the
  base and no other. ``"base"``: a tensor missing from some input is copied from
  the base (cast to the output dtype) into Model outputs and left out of Delta
  outputs. ``"skip"``: such a tensor is left out of the outputs.
- ``validate`` runs the checks of ``run`` (bind, then the layout) without computing.
- Output metadata ``tvlang.inputs`` lists the sources that output reads (plus the
  base, for a Model output).
"""

from tvlang.run.bindings import Bound, bind, binding_kind, protected_paths
from tvlang.run.driver import IN_FLIGHT, run, stream
from tvlang.run.layout import Layout, layout, validate
from tvlang.run.options import DTYPES, MISSING_POLICIES, parse_device, parse_dtype
from tvlang.run.scalars import scalars
from tvlang.run.session import Session

__all__ = [
    "DTYPES",
    "IN_FLIGHT",
    "MISSING_POLICIES",
    "Bound",
    "Layout",
    "Session",
    "bind",
    "binding_kind",
    "layout",
    "parse_device",
    "parse_dtype",
    "protected_paths",
    "run",
    "scalars",
    "stream",
    "validate",
]
