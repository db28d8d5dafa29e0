"""Per-tensor values: a built-in's number that varies over the model, ``layers(...)`` and
``where(...)``.

Wherever a tensor built-in takes a number (``ties``' ``density``, ``slerp``'s ``t``, an item
of ``weights=[...]``), a recipe may give a value that depends on the tensor:

- ``layers(v0, v1, ..., vn)``: a gradient over the layers, as mergekit's lists. A tensor of
  layer ``i`` in a model of ``L`` layers sits at ``t = i/(L-1)`` (``t = 1`` when ``L = 1``),
  a tensor without a layer index (embeddings, final norm) at ``t = 0``; the value is the
  linear interpolation of the list at position ``t*n``.
- ``where("glob", a, b)``: ``a`` for tensors whose name matches the glob (as ``pick``'s:
  ``|`` separates alternatives), else ``b``; ``a`` and ``b`` are numbers or per-tensor values.

The checker accepts them where a number is expected; the IR carries them as constant options
(:class:`Layers`, :class:`Where`: frozen, hashable); the run layer gives each kernel call the
values of the tensor it computes (``tvlang.ops.pertensor``), so a tensor runs each call once,
with its own values. This module imports no torch.

>>> value = Where("*mlp*", 0.5, Layers((0.0, 1.0)))
>>> from tvlang.language.printer import to_text
>>> to_text(value.to_ast())
'where("*mlp*", 0.5, layers(0, 1))'
>>> value.leaves(), representative((1.0, value))
((0.5, 0.0, 1.0), (1.0, 0.5))
"""

from __future__ import annotations

from dataclasses import dataclass

from tvlang.language import ast

__all__ = ["PER_TENSOR", "Layers", "Where", "PerTensor", "gradient_value", "representative"]

PER_TENSOR = ("layers", "where")  # the constructors' names in recipes


def _number(value: float) -> ast.Expr:
    return ast.Neg(ast.Number(-value)) if value < 0 else ast.Number(float(value))


def _ast(value: object) -> ast.Expr:
    return value.to_ast() if isinstance(value, (Layers, Where)) else _number(float(value))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Layers:
    """``layers(v0, ..., vn)``: a value interpolated over the layer index."""

    values: tuple[float, ...]

    def leaves(self) -> tuple[float, ...]:
        return self.values

    def to_ast(self) -> ast.Expr:
        return ast.Call("layers", tuple(_number(v) for v in self.values))


@dataclass(frozen=True)
class Where:
    """``where(pattern, then, otherwise)``: ``then`` where the tensor name matches ``pattern``."""

    pattern: str
    then: object  # a float, Layers or Where
    otherwise: object

    def leaves(self) -> tuple[float, ...]:
        return _leaves(self.then) + _leaves(self.otherwise)

    def to_ast(self) -> ast.Expr:
        return ast.Call("where", (ast.String(self.pattern), _ast(self.then), _ast(self.otherwise)))


PerTensor = (Layers, Where)


def _leaves(value: object) -> tuple[float, ...]:
    return value.leaves() if isinstance(value, PerTensor) else (value,)  # type: ignore[return-value]


def representative(value: object) -> object:
    """``value`` with every per-tensor value replaced by its first leaf (inside lists too): what
    checks that compare options with each other look at before the run."""
    if isinstance(value, PerTensor):
        return value.leaves()[0]
    if isinstance(value, tuple):
        return tuple(representative(v) for v in value)
    return value


def gradient_value(values: tuple[float, ...], index: int | None, num_layers: int | None) -> float:
    """mergekit 0.1.5's gradient: the list at ``t = index/(num_layers - 1)`` (1 for one layer,
    0 for a tensor without a layer index), interpolated linearly.

    >>> gradient_value((0.0, 0.5, 1.0), 1, 5), gradient_value((0.0, 1.0), None, 5)
    (0.25, 0.0)
    """
    if index is None:
        t = 0.0
    elif num_layers is None or num_layers <= 1:
        t = 1.0
    else:
        t = index / (num_layers - 1)
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]
