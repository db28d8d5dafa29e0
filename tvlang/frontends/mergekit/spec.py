"""The types a mergekit method is described with: its parameters, its rules, its inputs,
and what its translation returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from tvlang.frontends.mergekit.source import _Path
from tvlang.language import ast

if TYPE_CHECKING:
    from tvlang.frontends.mergekit.config import _Merge

MERGEKIT_VERSION = "0.1.5"  # the release whose semantics the translation follows


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class _Param:
    """A parameter of a mergekit method, as mergekit 0.1.5 declares it."""

    name: str
    kind: str  # "number", "int" or "bool"
    scope: str  # "shared" (global parameters only), "input" (every input), "non_base" (all but the base)
    default: Any = REQUIRED
    varies: bool = False  # the translation takes a gradient or filter list (layers(), where()) for it


@dataclass(frozen=True)
class _Method:
    """A mergekit merge method: its parameters, its input rules and its translation."""

    name: str
    title: str  # what it computes, for the recipe's header
    params: tuple[_Param, ...]
    translate: Callable[["_Merge"], "_Out"]
    base: str = "ignored"  # "required", "optional", or "ignored" (the base is one more input)
    min_inputs: int = 1
    max_inputs: int | None = None
    # Generalized task arithmetic: elect signs, how task vectors are pruned, defaults.
    consensus: bool = False
    sparsify: str | None = None  # None, "magnitude", "random", "outliers", "della"

    def param(self, name: str) -> _Param | None:
        return next((p for p in self.params if p.name == name), None)


# Every parameter name of a mergekit 0.1.5 method: one that the chosen method does not take
# has no effect (mergekit ignores it; the recipe says so), any other name is an error.
_KNOWN_PARAMS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t",
    "filter_wise", "nuslerp_row_wise", "nuslerp_flatten", "scale", "normalize_weights", "eps",
    "max_iter", "tol", "select_topk", "r", "alpha",
})


@dataclass
class _Input:
    """One model that a merge reads, with its resolved per-model parameters."""

    name: str  # its name in the recipe
    path: str  # as written in the config
    at: _Path  # where the path is written in the config
    index: int | None  # position in models, None for a base_model that models does not list
    is_base: bool
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    # slices: the layer ranges this input stacks ((path, (start, end)), ...); None for a whole model
    parts: tuple[tuple[str, tuple[int, int]], ...] | None = None

    @property
    def label(self) -> str:
        return f"models[{self.index}]" if self.index is not None else "base_model"


@dataclass
class _Out:
    """A method's translation: the output expression, lines to put before it, notes."""

    expr: ast.Expr
    notes: list[str] = field(default_factory=list)  # comment paragraphs above ``out``
    extra: list[tuple[str, ast.Expr, str]] = field(default_factory=list)  # (name, value, comment) assignments


_ORIGIN_DEFAULT = "mergekit's default"
_ORIGIN_GLOBAL = "parameters"
