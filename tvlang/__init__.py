"""tvlang: task arithmetic on model checkpoints, as a small language."""

__version__ = "0.1.0"

__all__ = ["__version__", "TvlangError"]

from tvlang.errors import TvlangError
