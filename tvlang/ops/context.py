"""What a kernel knows about the tensor it is computing.

The evaluator builds one :class:`TensorContext` per tensor name and kernel call.
Random kernels draw from :meth:`TensorContext.generator`, which is seeded from
the user's seed and the tensor name only, so a result never depends on the
order in which tensors are processed, on which other tensors exist, or on the
Python process (``hashlib``, not ``hash()``). The module imports no torch (the torch-free
executor, :mod:`tvlang.run.direct`, seeds ``dare``'s masks with :meth:`TensorContext.bits`).

>>> import torch
>>> ctx = TensorContext("model.layers.0.mlp.weight")
>>> a = torch.rand(3, generator=ctx.generator(7))
>>> b = torch.rand(3, generator=TensorContext("model.layers.0.mlp.weight").generator(7))
>>> bool(torch.equal(a, b))
True
>>> seed_for(7, "x") == seed_for(7.0, "x") != seed_for(8, "x")
True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["TensorContext", "seed_for"]


def seed_for(seed: int | float, name: str) -> int:
    """A 63-bit seed derived from ``(seed, tensor name)`` with SHA-256.

    A float seed with an integral value is the same seed as the integer
    (recipe numbers are always floats: ``seed=3`` arrives as ``3.0``).
    """
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    digest = hashlib.sha256(f"tvlang-seed\x00{seed!r}\x00{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TensorContext:
    """Per-tensor facts handed to every kernel.

    - ``name``: the tensor name (``"model.layers.7.mlp.up_proj.weight"``).
    - ``device``: where the inputs live and results must be made.
    - ``reduced``: whole-model scalars computed in earlier streaming passes that
      this call asked for, under the keys of its row's
      ``reductions`` (:class:`tvlang.language.rows.Reduction`).
    - ``num_layers``: number of layers of the model (largest layer index found
      in the tensor names, plus one; see
      :func:`tvlang.ops.select.count_layers`), or ``None`` when unknown. Only
      ``schedule`` needs it.
    - ``shape``: the tensor's shape, or ``None`` when the caller did not say (a kernel
      sees its inputs' shapes; a chunk form, which gets the entry count only, reads its
      rows from here: ``della``).
    """

    name: str
    device: torch.device | str = "cpu"
    reduced: dict[str, float] = field(default_factory=dict)
    num_layers: int | None = None
    shape: tuple[int, ...] | None = None

    def bits(self, seed: int | float):
        """A ``numpy.random.PCG64`` bit generator seeded from ``(seed, self.name)``.

        Its stream of 64-bit words is the same on every machine and device: ``dare``
        draws its masks from it on the CPU, so a GPU run drops the same entries.
        """
        import numpy

        return numpy.random.PCG64(seed_for(seed, self.name))

    def generator(self, seed: int | float) -> torch.Generator:
        """A generator on ``self.device`` seeded from ``(seed, self.name)``.

        The same seed and tensor name give the same stream on the same device
        type; CPU and CUDA generators produce different streams.
        """
        import torch  # here: the module is imported without torch (tvlang.run.direct)

        gen = torch.Generator(device=torch.device(self.device))
        gen.manual_seed(seed_for(seed, self.name))
        return gen
