"""The values of per-tensor options (``layers(...)``, ``where(...)``: tvlang.language.pertensor)
for one tensor: what the run layer hands a kernel (and the torch-free executor, tvlang.run.direct:
this module imports no torch).

>>> from tvlang.language.pertensor import Layers, Where
>>> from tvlang.ops.context import TensorContext
>>> options = (("density", Where("*mlp*", 0.5, Layers((0.0, 1.0)))), ("weights", (1.0, Layers((0.0, 1.0)))))
>>> resolve_options(options, TensorContext("model.layers.1.mlp.up.weight", num_layers=3))
{'density': 0.5, 'weights': (1.0, 0.5)}
>>> resolve_options(options, TensorContext("model.layers.1.attn.q.weight", num_layers=3))
{'density': 0.5, 'weights': (1.0, 0.5)}
>>> resolve_options(options, TensorContext("model.norm.weight", num_layers=3))
{'density': 0.0, 'weights': (1.0, 0.0)}
"""

from __future__ import annotations

from tvlang.language.pertensor import Layers, PerTensor, Where, gradient_value
from tvlang.ops.context import TensorContext
from tvlang.ops.names import layer_index, matches

__all__ = ["resolve_options", "value_for"]


def value_for(value: object, ctx: TensorContext) -> object:
    """``value`` for the tensor ``ctx.name`` (lists item by item; other values as they are)."""
    if isinstance(value, Layers):
        return gradient_value(value.values, layer_index(ctx.name), ctx.num_layers)
    if isinstance(value, Where):
        return value_for(value.then if matches(ctx.name, value.pattern) else value.otherwise, ctx)
    if isinstance(value, tuple) and any(isinstance(v, PerTensor) for v in value):
        return tuple(value_for(v, ctx) for v in value)
    return value


def resolve_options(options: tuple[tuple[str, object], ...], ctx: TensorContext) -> dict[str, object]:
    """A kernel call's options, with their per-tensor values resolved for ``ctx.name``."""
    return {name: value_for(value, ctx) for name, value in options}
