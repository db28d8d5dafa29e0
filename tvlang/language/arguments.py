"""How the checker checks a call's arguments against the row of its built-in.

A mixin of the checker (:class:`tvlang.language.checker._Checker`): it uses the checker's
``type_of`` (a frame), ``error`` and ``affine_error``, and its ``types``. Strings,
booleans and lists are checked against the row's kinds and choices, numbers must be known
before the run, and vectors must be the model or task vector the row asks for, with the
row's own hint when they are not.

>>> from tvlang.language.checker import check
>>> from tvlang.language.syntax import parse
>>> src = 'out = pre + ties(a - pre, elect="mass")'
>>> try:
...     check(parse(src), source=src)
... except Exception as err:
...     print(err.message)
argument 'elect' of ties() must be one of 'total', 'frequency', got 'mass'
"""

from __future__ import annotations

from tvlang.language import ast
from tvlang.language.calls import _UNKNOWN, _describe, _kind_word, _Scalar, _suggest, _Vector, _vector_kind
from tvlang.language.pertensor import PER_TENSOR
from tvlang.language.rows import Arg, Builtin
from tvlang.language.trampoline import Frame

__all__ = ["ArgumentChecks"]


class ArgumentChecks:
    """The checker's argument checks (see the module docstring)."""

    def call_result(self, call: ast.Call, row: Builtin, ok: bool, kinds: list[str]):
        if row.result == "model":
            return _Vector(1.0)
        if row.result == "delta":
            return _Vector(0.0)
        if row.result == "scalar":
            return _Scalar(None)
        if row.result != "same":
            raise TypeError(f"built-in {row.name!r} has unknown result {row.result!r}")
        if not ok:
            return _UNKNOWN
        if "model" in kinds and "delta" in kinds:
            return self.error(
                f"the arguments of {row.name}() must be all models or all task vectors, "
                f"got a model (argument {kinds.index('model') + 1}) "
                f"and a task vector (argument {kinds.index('delta') + 1})",
                call,
            )
        return _Vector(0.0 if kinds and kinds[0] == "delta" else 1.0)

    def check_argument(self, row: Builtin, arg: Arg, value: ast.Expr, label: str) -> Frame:
        """Check one argument; its kind ("model", "delta", "scalar", ...) or None after an error."""
        kind = arg.kind
        if kind == "string":
            if not isinstance(value, ast.String):
                yield self.type_of(value)
                self.error(f"{label} must be a string in quotes", value)
                return None
            if arg.choices is not None and value.value not in arg.choices:
                options = ", ".join(f"'{c}'" for c in arg.choices)
                self.error(
                    f"{label} must be one of {options}, got '{value.value}'{_suggest(value.value, arg.choices)}",
                    value,
                )
                return None
            return "string"
        if kind == "bool":
            if not isinstance(value, ast.Bool):
                yield self.type_of(value)
                self.error(f"{label} must be true or false", value)
                return None
            return "bool"
        if kind == "list":
            if not isinstance(value, ast.ListExpr):
                yield self.type_of(value)
                self.error(f"{label} must be a list of numbers, like [0.2, 0.5, 1]", value)
                return None
            good = True
            for item in value.items:
                if not (yield from self.number_or_per_tensor(item, f"item of {label}")):
                    good = False
            return "list" if good else None
        if kind in ("scalar", "int") and _is_per_tensor(value):
            return "scalar" if (yield from self.per_tensor(value, label)) else None
        if kind in ("scalar", "int"):
            if not (yield from self.constant(value, label)):
                return None
            if kind == "int" and not float(self.types[id(value)].value).is_integer():
                self.error(f"{label} must be a whole number", value)
                return None
            return "scalar"
        if kind not in ("model", "delta", "vector"):
            raise TypeError(f"built-in {row.name!r} has an argument of unknown kind {kind!r}")
        t = yield self.type_of(value)
        if t is _UNKNOWN:
            return None
        if not isinstance(t, _Vector):
            wanted = {"model": "a model", "delta": "a task vector", "vector": "a model or a task vector"}[kind]
            self.error(f"{label} must be {wanted}, got {_describe(t)}", value)
            return None
        got = _vector_kind(t.weight)
        if got is None:
            self.affine_error(value, t, f"{label}: ")
            return None
        if kind != "vector" and got != kind:
            note = row.kind_hint(got)
            if note is None:
                note = (
                    "a task vector is a difference of models: subtract the base (ft - pre)"
                    if kind == "delta"
                    else "add the task vector to a base model: pre + tau"
                )
            self.error(f"{label} must be {_kind_word(kind)}, got {_kind_word(got)}", value, (f"note: {note}",))
            return None
        return got

    def number_or_per_tensor(self, value: ast.Expr, label: str) -> Frame:
        if _is_per_tensor(value):
            return (yield from self.per_tensor(value, label))
        return (yield from self.constant(value, label))

    def per_tensor(self, call: ast.Call, label: str) -> Frame:
        """Whether ``layers(v0, ...)`` or ``where("glob", a, b)`` is well formed (tvlang.language.pertensor)."""
        if call.kwargs:
            self.error(f"{call.func}() takes no keyword arguments", call.kwargs[0].value)
            return False
        if call.func == "layers":
            if not call.args:
                self.error(f"{label}: layers() needs at least one value", call)
                return False
            good = True
            for item in call.args:
                if not (yield from self.constant(item, f"a value of layers() in {label}")):
                    good = False
            return good
        if len(call.args) != 3 or not isinstance(call.args[0], ast.String) or not call.args[0].value.strip("| "):
            self.error(f'{label}: where() takes a glob and two values: where("*mlp*", 0.5, 1)', call)
            return False
        good = True
        for item in call.args[1:]:
            if not (yield from self.number_or_per_tensor(item, f"a value of where() in {label}")):
                good = False
        return good

    def constant(self, value: ast.Expr, label: str) -> Frame:
        """Whether ``value`` is a number known before the run (an error says why not)."""
        t = yield self.type_of(value)
        if t is _UNKNOWN:
            return False
        if isinstance(t, _Scalar) and t.value is not None:
            return True
        if isinstance(t, _Scalar):
            self.error(
                f"{label} must be a number known before the run (a literal, a param, or arithmetic on them); "
                "this one is computed from weights",
                value,
            )
        else:
            self.error(f"{label} must be a number, got {_describe(t)}", value)
        return False


def _is_per_tensor(value: ast.Expr) -> bool:
    return isinstance(value, ast.Call) and value.func in PER_TENSOR
