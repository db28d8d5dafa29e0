"""Name-based kernels: ``select``, ``pick`` and the per-layer ``schedule``.

Patterns, layer indices and the layer count are :mod:`tvlang.ops.names`' (torch-free; its names
are re-exported here).

>>> layer_index("model.layers.7.mlp.up_proj.weight"), layer_index("model.embed_tokens.weight")
(7, None)
>>> matches("model.layers.0.self_attn.q_proj.weight", "*.k_proj.* | *.q_proj.*")
True
>>> schedule_value([0.0, 1.0], 3, 7)  # layer 3 of 7: halfway along the list
0.5
"""

from __future__ import annotations

import torch

from tvlang.errors import TvlangError
from tvlang.ops.common import kernel_of
from tvlang.ops.context import TensorContext
from tvlang.ops.names import LAYER_WORDS, count_layers, layer_index, matches, schedule_value

__all__ = ["select", "pick", "schedule", "matches", "layer_index", "count_layers", "schedule_value", "LAYER_WORDS"]

@kernel_of("select")
def select(inputs: list[torch.Tensor], ctx: TensorContext, *, pattern: str) -> torch.Tensor:
    """The tensor itself where its name matches ``pattern``, zeros elsewhere."""
    (x,) = inputs
    return x.clone() if matches(ctx.name, pattern) else torch.zeros(x.shape, dtype=x.dtype, device=x.device)


@kernel_of("pick")
def pick(inputs: list[torch.Tensor], ctx: TensorContext, *, pattern: str) -> torch.Tensor:
    """``a`` where the tensor name matches ``pattern``, else ``b``."""
    a, b = inputs
    return (a if matches(ctx.name, pattern) else b).clone()


@kernel_of("schedule")
def schedule(inputs: list[torch.Tensor], ctx: TensorContext, *, values, default: float) -> torch.Tensor:
    """Scale by ``values`` interpolated at the tensor's layer; ``default`` when it has no layer."""
    (x,) = inputs
    index = layer_index(ctx.name)
    if index is None:
        factor = float(default)
    else:
        if not ctx.num_layers:
            raise TvlangError(
                "schedule: the number of layers is unknown (no tensor name has a layer index)",
                tensor=ctx.name,
            )
        factor = schedule_value(list(values), index, int(ctx.num_layers))
    return torch.mul(x, factor)
