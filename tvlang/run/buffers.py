"""Result buffers that ``run()`` recycles once written, so memory stays near what is in flight."""

from __future__ import annotations

import torch

__all__ = ["OutputBuffers"]


class OutputBuffers:
    """CPU tensors for results: fresh ones, or (``recycle``) buffers given back once written."""

    def __init__(self) -> None:
        self.recycle = False  # run() recycles; stream() hands results to the caller, who keeps them
        self.pool: list[torch.Tensor] = []
        self.size = 3  # buffers kept idle at most
        self._leases: dict[int, torch.Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of ``numel`` entries of ``dtype`` for one result."""
        nbytes = numel * dtype.itemsize
        if not self.recycle:
            return torch.empty(numel, dtype=dtype)
        # A buffer far larger than what tensors need now (an embedding's, in the middle of
        # the layers) is dropped rather than kept idle: memory stays near what is in flight.
        self.pool = [b for b in self.pool if b.numel() <= 4 * nbytes]
        fits = [i for i, b in enumerate(self.pool) if b.numel() >= nbytes]
        if fits:  # the smallest that fits (list.remove would compare tensors elementwise)
            buffer = self.pool.pop(min(fits, key=lambda i: self.pool[i].numel()))
        else:
            self.pool.clear()  # none fits: free the idle ones before taking more memory
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        tensor = buffer[:nbytes].view(dtype)
        self._leases[tensor.data_ptr()] = buffer
        return tensor

    def give_back(self, tensor: torch.Tensor) -> None:
        """``tensor`` (from ``take``) has been written: its buffer may be reused."""
        buffer = self._leases.pop(tensor.data_ptr(), None)
        if buffer is None:
            return
        self.pool.append(buffer)
        if len(self.pool) > self.size:  # keep the largest few
            self.pool.pop(min(range(len(self.pool)), key=lambda i: self.pool[i].numel()))
