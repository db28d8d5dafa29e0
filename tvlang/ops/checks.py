"""Option checks shared by the kernels and by ``registry.validate_options`` (no torch).

>>> validate("ties", {"density": 1.5}, 2)
Traceback (most recent call last):
...
tvlang.errors.TvlangError: error: ties: option 'density' must be in [0, 1], got 1.5
"""

from __future__ import annotations

import math

from tvlang.errors import TvlangError

__all__ = ["validate", "fraction", "seed", "weights"]


def _error(op: str, message: str) -> TvlangError:
    return TvlangError(f"{op}: {message}")


def fraction(op: str, option: str, value: object) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(op, f"option '{option}' must be a number, got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise _error(op, f"option '{option}' must be in [0, 1], got {value:g}")
    return value


def seed(op: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise _error(op, f"option 'seed' must be an integer, got {value!r}")
    return int(value)


def weights(op: str, value: object, n_inputs: int) -> list[float] | None:
    """``None`` for no weights (the empty list), else one float per input."""
    if value is None:
        return None
    items = list(value)  # type: ignore[call-overload]
    if not items:
        return None
    if len(items) != n_inputs:
        raise _error(op, f"option 'weights' has {len(items)} values for {n_inputs} inputs")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise _error(op, f"option 'weights' must hold finite numbers, got {item!r}")
        out.append(float(item))
    return out


def _choice(op: str, option: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise _error(op, f"option '{option}' must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def della_range(op: str, density: float, epsilon: float) -> None:
    if not 0.0 <= epsilon <= 0.5:
        raise _error(op, f"option 'epsilon' must be in [0, 0.5], got {epsilon:g}")
    if 0.0 < density < 1.0 and (density - epsilon <= 0.0 or density + epsilon > 1.0):
        raise _error(
            op,
            f"density - epsilon must be > 0 and density + epsilon <= 1 "
            f"(got density={density:g}, epsilon={epsilon:g})",
        )


def validate(name: str, options: dict, n_inputs: int) -> None:
    """Check the constant options of a call of ``name``; missing options are not checked."""
    o = options
    if "density" in o:
        fraction(name, "density", o["density"])
    if "p" in o:
        fraction(name, "p", o["p"])
    if "gamma" in o:
        fraction(name, "gamma", o["gamma"])
    if "seed" in o:
        seed(name, o["seed"])
    if "weights" in o:
        weights(name, o["weights"], n_inputs)
    if "elect" in o:
        _choice(name, "elect", o["elect"], ("total", "frequency", "none") if name == "della" else ("total", "frequency"))
    if "merge" in o:
        _choice(name, "merge", o["merge"], ("mean", "sum", "weighted_mean"))
    if "elect_on" in o:
        _choice(name, "elect_on", o["elect_on"], ("weighted", "unweighted"))
    if "scope" in o:
        _choice(name, "scope", o["scope"], ("tensor", "model"))
    if name == "della" and "density" in o:
        della_range(name, float(o["density"]), float(o.get("epsilon", 0.15)))
    if name == "slerp" and "t" in o:
        t = o["t"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise _error(name, f"'t' must be a finite number, got {t!r}")
    if name == "schedule" and "values" in o:
        values = list(o["values"])
        if not values:
            raise _error(name, "the list of values is empty")
    if name in ("select", "pick") and "pattern" in o:
        if not isinstance(o["pattern"], str) or not o["pattern"].strip("| "):
            raise _error(name, f"the pattern must be a non-empty glob string, got {o['pattern']!r}")
