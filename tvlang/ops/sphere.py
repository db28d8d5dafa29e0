"""Means on the sphere of several tensors: ``multislerp`` and ``karcher``, as mergekit 0.1.5's
methods of the same names compute them, per tensor (docs/operators.md).

Both work in coefficient space (:mod:`tvlang.ops.gram`): the dot products of the inputs,
then scalars, then one linear combination of the inputs.

>>> from tvlang.ops.context import TensorContext
>>> x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
>>> multislerp([x, y], TensorContext("w"))
tensor([0.7071, 0.7071])
>>> karcher([x, 2 * y], TensorContext("w"))
tensor([1.0607, 1.0607])
"""

from __future__ import annotations

import torch

from tvlang.ops.coefficients import karcher_coefficients, multislerp_coefficients
from tvlang.ops.common import chunk_form_of, kernel_of
from tvlang.ops.context import TensorContext
from tvlang.ops.gram import GramChunks, combine, gram

__all__ = ["multislerp", "multislerp_chunks", "multislerp_coefficients", "karcher", "karcher_chunks",
           "karcher_coefficients"]


# -- multislerp -------------------------------------------------------------------------------

@kernel_of("multislerp")
def multislerp(inputs: list[torch.Tensor], ctx: TensorContext, *, weights, normalize_weights: bool,
               eps: float) -> torch.Tensor:
    c = multislerp_coefficients(gram(inputs), weights, normalize_weights, float(eps), ctx.name)
    return combine(inputs, c)


@chunk_form_of("multislerp")
def multislerp_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, weights,
                      normalize_weights: bool, eps: float) -> GramChunks:
    return GramChunks(n_inputs, lambda g: multislerp_coefficients(g, weights, normalize_weights, float(eps), ctx.name))


# -- karcher ----------------------------------------------------------------------------------

@kernel_of("karcher")
def karcher(inputs: list[torch.Tensor], ctx: TensorContext, *, weights, max_iter: int, tol: float) -> torch.Tensor:
    return combine(inputs, karcher_coefficients(gram(inputs), weights, int(max_iter), float(tol)))


@chunk_form_of("karcher")
def karcher_chunks(ctx: TensorContext, numel: int, n_inputs: int, dtype: torch.dtype, *, weights, max_iter: int,
                   tol: float) -> GramChunks:
    return GramChunks(n_inputs, lambda g: karcher_coefficients(g, weights, int(max_iter), float(tol)))
