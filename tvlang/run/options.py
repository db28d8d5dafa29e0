"""Compute dtype, device and missing-tensor policy: names users type, and their parsing."""

from __future__ import annotations

from typing import Any

import torch

from tvlang.errors import TvlangError

__all__ = ["DTYPES", "MISSING_POLICIES", "parse_device", "parse_dtype"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64,
}
MISSING_POLICIES = ("error", "base", "skip")


def parse_dtype(value: Any, option: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = DTYPES.get(str(value).lower())
    if dtype is None:
        raise TvlangError(f"unknown {option} '{value}'; choose one of float32, float16, bfloat16, float64")
    return dtype


def parse_device(value: Any) -> torch.device:
    """A device that exists on this machine, or a clear error."""
    text = str(value)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise TvlangError(f"unknown device '{text}'; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TvlangError(f"device '{text}' is not available: this torch sees no CUDA device",
                              notes=("run with --device cpu",))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TvlangError(f"device '{text}' is not available: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise TvlangError(f"device '{text}' is not available on this machine", notes=("run with --device cpu",))
    elif device.type != "cpu":
        raise TvlangError(f"unsupported device '{text}'; use cpu, cuda, cuda:N or mps")
    return device
