"""The row types of the built-in table and the table itself.

A built-in is one :class:`Builtin` row: its signature (:class:`Arg`, each default, choice
and range written once), its kernel and chunk form as ``"module:attr"`` references, its
flags, the whole-model :class:`Reduction` s it needs and its rules. :data:`BUILTINS` holds
every registered row; :mod:`tvlang.language.builtins` fills it on import with tvlang's own
rows, and a test or a plugin adds its own with :func:`register`.

This module imports no torch and nothing from the run or ops layers (:func:`resolve`
imports a reference when a run needs it).

>>> row = Builtin("twice", params=(Arg("x", "delta"),), result="delta",
...               summary="2x", kernel="m:f")
>>> row.problems()
[]
>>> Builtin("bad", kernel="m:f").problems()
['no summary']
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tvlang.errors import TvlangError
from tvlang.language.pertensor import PerTensor, representative

__all__ = [
    "BUILTINS", "KINDS", "REQUIRED", "RESULTS", "STAGES", "VECTOR_KINDS", "Arg", "Builtin", "Reduction", "Rule",
    "register", "resolve", "unregister",
]

KINDS = ("model", "delta", "vector", "scalar", "int", "string", "bool", "list")
VECTOR_KINDS = ("model", "delta", "vector")
RESULTS = ("model", "delta", "scalar", "same")
STAGES = ("source", "tensor", "reduce")
_REFERENCE = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"  # "package.module:attr"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


# -- the row types -------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    """One parameter of a built-in.

    ``default`` is ``REQUIRED``, ``None`` (optional, absent when not given), or a value.
    ``choices`` are the allowed values of a string; ``range`` the closed interval
    ``(low, high)`` of a number. Kernels, ``check`` and the planner all read these: a
    default, a choice or a range is written here and nowhere else.
    """

    name: str
    kind: str  # see the module docstring
    default: object = REQUIRED
    choices: tuple[str, ...] | None = None
    doc: str = ""
    range: tuple[float, float] | None = None

    def problem(self, value: object) -> str | None:
        """What is wrong with the constant ``value`` by this argument's metadata, or ``None``.
        A per-tensor value (``layers(...)``, ``where(...)``) is checked leaf by leaf."""
        where = f"option '{self.name}'"
        if isinstance(value, PerTensor) and self.kind in ("scalar", "int"):
            return next((p for p in map(self.problem, value.leaves()) if p is not None), None)
        if self.kind in ("scalar", "int"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{where} must be {'an integer' if self.kind == 'int' else 'a number'}, got {value!r}"
            if self.kind == "int" and not float(value).is_integer():
                return f"{where} must be an integer, got {value!r}"
            if not math.isfinite(value):
                return f"{where} must be a finite number, got {value!r}"
            if self.range is not None and not self.range[0] <= value <= self.range[1]:
                return f"{where} must be in [{self.range[0]:g}, {self.range[1]:g}], got {value:g}"
        elif self.kind == "list":
            if not isinstance(value, (list, tuple)):
                return f"{where} must be a list of numbers, got {value!r}"
            for item in (leaf for v in value for leaf in (v.leaves() if isinstance(v, PerTensor) else (v,))):
                if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                    return f"{where} must hold finite numbers, got {item!r}"
        elif self.choices is not None and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            return f"{where} must be one of {allowed}, got {value!r}"
        return None


@dataclass(frozen=True)
class Reduction:
    """A whole-model scalar a tensor built-in's call needs before its kernel runs.

    The planner streams the call's inputs ``inputs`` (indices into the kernel's
    ``inputs``) through ``reducer(*args)``, a ``"module:attr"`` Reducer class, in
    ``reducer.passes`` streaming passes, and hands its ``result()`` to the kernel as
    ``ctx.reduced[key]``.

    The Reducer protocol (also that of a ``reduce`` built-in's kernel, which streams
    all the call's vector arguments): ``passes`` (int), ``update(pass_index, tensors,
    ctx)`` once per tensor name and pass, with ``tensors`` the streamed inputs of that
    tensor (a list, in ``inputs`` order), ``end_pass(pass_index)`` after each pass,
    ``result()`` (the scalar) after the last one.
    """

    key: str
    reducer: str
    args: tuple = ()
    inputs: tuple[int, ...] = ()


#: ``rule(options, n_inputs) -> problem or None``: a check the argument metadata cannot
#: state (between options, or against the number of vector inputs). ``options`` have
#: their defaults filled in; a required option may be missing.
Rule = Callable[[Mapping[str, object], int], str | None]


@dataclass(frozen=True)
class Builtin:
    """One built-in function: its signature and everything the pipeline needs to run it.

    Signature: ``params`` are positional-or-keyword, in order. ``variadic`` (if any) takes
    the remaining positional arguments, at least ``min_variadic`` of them; the ``options``
    of a variadic built-in are keyword-only (``ties(a, b, density=0.2)``).

    Behaviour:

    - ``kernel``: ``"module:attr"`` of the per-tensor kernel (stage ``"tensor"``:
      ``kernel(inputs, ctx, **options)``) or of the Reducer class (stage ``"reduce"``).
    - ``chunk_form``: ``"module:attr"`` of a factory
      ``(ctx, numel, n_inputs, dtype, **options) -> chunk kernel or None`` that computes
      the kernel's result piece by piece (see :mod:`tvlang.ops.registry`), or ``None``.
    - ``elementwise``: the result at an entry depends on that entry of the inputs and on
      the tensor's name only, so the kernel itself runs on each piece.
    - ``multipass``: the chunk form passes over its whole input before its first result
      (with any options; one that does with some options only says so by its ``passes``).
    - ``reductions(options, n_inputs) -> tuple[Reduction, ...]``: the whole-model scalars
      a call needs first (``options`` with defaults filled in), or ``None`` for none.
    - ``rules``: checks the argument metadata cannot state (see ``Rule``).
    - ``kind_hints``: ``(kind it got, note)``: the note the checker adds when a vector
      argument of this built-in has the wrong kind.
    """

    name: str
    params: tuple[Arg, ...] = ()
    variadic: Arg | None = None
    min_variadic: int = 0
    options: tuple[Arg, ...] = ()
    result: str = "same"
    stage: str = "tensor"
    summary: str = ""
    reference: str = ""  # which paper / library the semantics match
    kernel: str | None = None
    chunk_form: str | None = None
    elementwise: bool = False
    multipass: bool = False
    reductions: Callable[[Mapping[str, object], int], tuple[Reduction, ...]] | None = None
    rules: tuple[Rule, ...] = ()
    kind_hints: tuple[tuple[str, str], ...] = ()

    def constant_args(self) -> tuple[Arg, ...]:
        """The arguments a kernel gets as ``options``: every one that is not a vector."""
        return tuple(a for a in (*self.params, *self.options) if a.kind not in VECTOR_KINDS)

    def complete(self, options: Mapping[str, object]) -> dict[str, object]:
        """``options`` plus the defaults of the ones left out (a required one stays missing)."""
        args = self.constant_args()
        unknown = set(options) - {a.name for a in args}
        if unknown:
            raise TypeError(f"{self.name}() got unknown options {sorted(unknown)}")
        filled = dict(options)
        for arg in args:
            if arg.name not in filled and arg.default is not REQUIRED and arg.default is not None:
                filled[arg.name] = arg.default
        return filled

    def check_options(self, options: Mapping[str, object], n_inputs: int) -> dict[str, object]:
        """``options`` with their defaults filled in (:meth:`complete`), after checking them
        against the arguments' metadata and the row's rules: ``TvlangError`` (no span: the
        caller adds one) for a value the kernel would reject. A missing required option is
        not checked."""
        filled = self.complete(options)
        problems = [arg.problem(filled[arg.name]) for arg in self.constant_args() if arg.name in filled]
        plain = {name: representative(value) for name, value in filled.items()}  # per-tensor: first values
        problems += [rule(plain, n_inputs) for rule in self.rules]
        for problem in problems:
            if problem is not None:
                raise TvlangError(f"{self.name}: {problem}")
        return filled

    def kind_hint(self, got: str) -> str | None:
        """The checker's note for a vector argument of kind ``got`` where another was wanted."""
        return dict(self.kind_hints).get(got)

    def problems(self) -> list[str]:
        """What this row lacks or gets wrong as a row (empty when it is whole)."""
        found: list[str] = []
        if not self.name.isidentifier():
            found.append(f"name {self.name!r} is not an identifier")
        if self.stage not in STAGES:
            found.append(f"stage {self.stage!r} is not one of {STAGES}")
        if self.result not in RESULTS:
            found.append(f"result {self.result!r} is not one of {RESULTS}")
        if not self.summary:
            found.append("no summary")
        args = [*self.params, *self.options] + ([self.variadic] if self.variadic else [])
        names = [a.name for a in args]
        found += [f"argument {n!r} appears twice" for n in sorted({n for n in names if names.count(n) > 1})]
        for arg in args:
            found += [f"argument {arg.name!r}: {p}" for p in _arg_problems(arg)]
        if self.variadic is not None and self.variadic.kind not in VECTOR_KINDS:
            found.append("the variadic argument must be a model, delta or vector")
        has_kernel = self.stage in ("tensor", "reduce")
        if has_kernel and self.kernel is None:
            found.append(f"a {self.stage!r} built-in needs a kernel ('module:attr')")
        if not has_kernel and self.kernel is not None:
            found.append(f"a {self.stage!r} built-in has no kernel")
        for field in ("kernel", "chunk_form"):
            ref = getattr(self, field)
            if ref is not None and not re.fullmatch(_REFERENCE, ref):
                found.append(f"{field} {ref!r} is not a 'module:attr' reference")
        if self.stage != "tensor":
            for field in ("chunk_form", "elementwise", "multipass", "reductions"):
                if getattr(self, field):
                    found.append(f"{field} is only for 'tensor' built-ins")
        if self.multipass and self.chunk_form is None:
            found.append("multipass describes a chunk form, and there is none")
        if self.reductions is not None and not callable(self.reductions):
            found.append("reductions must be callable")
        found += [f"rule {rule!r} is not callable" for rule in self.rules if not callable(rule)]
        found += [f"kind hint for {kind!r}: only a model or a delta can be the wrong kind"
                  for kind, _ in self.kind_hints if kind not in ("model", "delta")]
        return found


def _arg_problems(arg: Arg) -> list[str]:
    found: list[str] = []
    if arg.kind not in KINDS:
        return [f"kind {arg.kind!r} is not one of {KINDS}"]
    if arg.choices is not None and arg.kind != "string":
        found.append("choices are for strings")
    if arg.range is not None and (arg.kind not in ("scalar", "int") or not arg.range[0] <= arg.range[1]):
        found.append(f"range {arg.range!r} is not an interval of numbers")
    if arg.default is not REQUIRED and arg.default is not None:
        if arg.kind in VECTOR_KINDS:
            found.append("a model or task vector argument has no default")
        elif not found:
            problem = arg.problem(arg.default)
            if problem is not None:
                found.append(f"the default: {problem}")
    return found


BUILTINS: dict[str, Builtin] = {}


def register(*rows: Builtin) -> None:
    """Add rows to ``BUILTINS``; a row that is not whole, or whose name is taken, is refused."""
    for row in rows:
        if row.name in BUILTINS:
            raise ValueError(f"built-in {row.name!r} registered twice")
        problems = row.problems()
        if problems:
            raise ValueError(f"built-in {row.name!r}: " + "; ".join(problems))
    for row in rows:
        BUILTINS[row.name] = row


def unregister(*names: str) -> None:
    """Remove rows added by :func:`register` (a test's or a plugin's own operators)."""
    for name in names:
        del BUILTINS[name]


@functools.lru_cache(maxsize=None)
def resolve(reference: str) -> object:
    """The object a row's ``"module:attr"`` reference names, imported on first use.

    Rows name their kernels, chunk forms and reducers this way so that the language
    and plan layers never import torch; the run layer resolves them when it runs.
    """
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)
