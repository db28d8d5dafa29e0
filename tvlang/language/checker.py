"""The checker: names, built-in calls, and the three types with the affine rule.

Every value is a Scalar, a Model (absolute weights) or a Delta (a task vector).
While checking, a vector carries its *affine weight*: the sum of the
coefficients of the models in it. A source model has weight 1 and a task vector
weight 0; ``a + b`` adds weights, ``a - b`` subtracts them, ``c*x`` multiplies
and ``x/c`` divides by a constant. Any weight is fine inside an expression, but
a value that is named (``x = ...``, ``out = ...``) or passed to a built-in must
have weight 1 (a Model) or 0 (a Delta).

>>> from tvlang.language.syntax import parse
>>> checked = check(parse("out = pre + 0.4*(ft - pre)"), source="")
>>> checked.outputs[0].kind, checked.sources
('model', {'pre': 'model', 'ft': 'model'})
>>> src = "out = pre + 0.4*ft\\n"
>>> check(parse(src), source=src, filename="r.tv")
Traceback (most recent call last):
  ...
tvlang.errors.TvlangError: r.tv:1:7: error: model coefficients sum to 1.4; a model needs 1 and a task vector 0
  out = pre + 0.4*ft
        ^^^^^^^^^^^^
  note: scale task vectors, not models: pre + 0.4*(ft - pre)
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field

from tvlang.errors import Span, TvlangError
from tvlang.language import affine, ast, constants
from tvlang.language.arguments import ArgumentChecks
from tvlang.language.builtins import BUILTINS
from tvlang.language.calls import (
    _UNKNOWN,
    BoundCall,
    _bind,
    _describe,
    _format_weight,
    _Other,
    _Scalar,
    _suggest,
    _Unknown,
    _Vector,
    _vector_kind,
    bind_call,
    load_builtins,
)
from tvlang.language.printer import to_text
from tvlang.language.trampoline import Frame, trampoline

_LOG_MAX = math.log10(sys.float_info.max)  # 308.25
_LOG_MIN = math.log10(5e-324)  # the smallest subnormal: -323.3

__all__ = ["BoundCall", "CheckedProgram", "Output", "bind_call", "check", "free_names", "load_builtins"]



@dataclass
class Output:
    name: str  # a bare ``out`` is named "out"
    expr: ast.Expr
    kind: str  # "model" or "delta"; "scalar" only when the check allows scalar outputs
    span: Span | None = None
    layers: int | None = None  # its layer count, where the recipe says (a stack of layer ranges)


@dataclass
class CheckedProgram:
    program: ast.Program
    source: str
    filename: str | None
    params: dict[str, float]  # declared params, after overrides
    sources: dict[str, str]  # free names used -> "model" | "delta"
    env: dict[str, ast.Expr]  # name = expr, in order (assignments and named outputs)
    outputs: list[Output] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # every defined name -> "scalar" | "model" | "delta"


# -- the checker ---------------------------------------------------------------------

@dataclass
class _Binding:
    type: object
    what: str  # "param", "value", "output"
    line: int | None


class _Checker(ArgumentChecks):
    def __init__(self, program: ast.Program, source: str, filename: str | None, sources, params, *,
                 require_output: bool = True, scalar_outputs: bool = False) -> None:
        self.program = program
        self.source = source
        self.filename = filename
        self.bound_sources = dict(sources) if sources is not None else None
        self.overrides = dict(params or {})
        self.require_output = require_output
        self.scalar_outputs = scalar_outputs
        self.errors: list[TvlangError] = []
        self.names: dict[str, _Binding] = {}
        self.used_sources: dict[str, str] = {}
        self.types: dict[int, object] = {}  # id(node) -> type, for the affine fix
        self.unknown: dict[str, tuple[TvlangError, int]] = {}  # unknown name -> (its error, uses)
        self.current_line: int | None = None
        # Where each name is defined, to tell "used before its definition" from "unknown".
        self.definitions: dict[str, int | None] = {}
        for stmt in program.statements:
            name = stmt.name
            if name is not None and name not in self.definitions:
                self.definitions[name] = stmt.span.line if stmt.span else None

    # -- reporting

    def error(self, message: str, node: ast.Node | None, notes=()) -> _Unknown:
        span = node.span if node is not None else None
        self.errors.append(TvlangError(message, span, source=self.source, filename=self.filename, notes=notes))
        return _UNKNOWN

    # -- statements

    def run(self) -> CheckedProgram:
        declared = {s.name for s in self.program.statements if isinstance(s, ast.Param)}
        for name, value in self.overrides.items():
            if name not in declared:
                hint = _suggest(name, declared) or (
                    "" if not declared else "; declared params: " + ", ".join(sorted(declared))
                )
                self.error(f"the recipe has no param '{name}' to set{hint}", None)
                self.errors[-1].usage = True  # a --set mistake: the command line exits 2
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self.error(f"param '{name}' must be set to a finite number, got {value!r}", None)

        params: dict[str, float] = {}
        env: dict[str, ast.Expr] = {}
        outputs: list[Output] = []
        bare_out: ast.Out | None = None
        for stmt in self.program.statements:
            self.current_line = stmt.span.line if stmt.span else None
            if isinstance(stmt, ast.Param):
                value = self.overrides.get(stmt.name, stmt.value)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    value = stmt.value
                if self.define(stmt.name, stmt, _Scalar(float(value)), "param"):
                    params[stmt.name] = float(value)
            elif isinstance(stmt, ast.Assign):
                t = self.statement_value(stmt.value)
                if self.define(stmt.name, stmt, t, "value"):
                    env[stmt.name] = stmt.value
            elif isinstance(stmt, ast.Out):
                t = self.statement_value(stmt.value)
                if stmt.name is None:
                    if bare_out is not None:
                        self.error(
                            "a recipe has at most one bare 'out'; name the outputs: out a = ..., out b = ...",
                            stmt,
                            (f"note: the first bare 'out' is on line {bare_out.span.line}",) if bare_out.span else (),
                        )
                        continue
                    bare_out = stmt
                    name = "out"
                else:
                    name = stmt.name
                    if not self.define(stmt.name, stmt, t, "output"):
                        continue
                    env[stmt.name] = stmt.value
                kind = self.result_kind(t)
                if kind == "scalar" and not self.scalar_outputs:
                    # A run writes checkpoints; a number is not one.
                    self.error(
                        "an output must be a model or a task vector, got a number",
                        stmt.value,
                        ("note: name it (x = ...) and use it to scale a task vector",),
                    )
                elif kind is not None:
                    outputs.append(Output(name, stmt.value, kind, stmt.span,
                                          t.layers if isinstance(t, _Vector) else None))
            else:  # pragma: no cover - the parser makes no other statements
                raise TypeError(f"not a statement: {stmt!r}")
        if self.require_output and not any(isinstance(s, ast.Out) for s in self.program.statements):
            self.error("the recipe has no output; add a line such as: out = pre + 0.4*(ft - pre)", None)
        for name, (error, uses) in self.unknown.items():
            if uses > 1:
                error.notes = (*error.notes, f"note: '{name}' is used {uses} times; the first use is shown")
        if self.errors:
            if len(self.errors) == 1:
                raise self.errors[0]
            first = self.errors[0]
            raise TvlangError(
                first.message, first.span, source=self.source, filename=self.filename, errors=self.errors
            )
        return CheckedProgram(
            program=self.program,
            source=self.source,
            filename=self.filename,
            params=params,
            sources=dict(self.used_sources),
            env=env,
            outputs=outputs,
            kinds={name: kind for name, binding in self.names.items()
                   if (kind := self.result_kind(binding.type)) is not None},
        )

    @staticmethod
    def result_kind(t) -> str | None:
        if isinstance(t, _Scalar):
            return "scalar"
        if isinstance(t, _Vector):
            return _vector_kind(t.weight)
        return None

    def define(self, name: str, stmt: ast.Stmt, t, what: str) -> bool:
        where = {"param": "param", "value": "value", "output": "output"}[what]
        if name in BUILTINS:
            self.error(f"'{name}' is a built-in function; choose another name for this {where}", stmt)
            return False
        if self.bound_sources is not None and name in self.bound_sources:
            self.error(f"'{name}' is bound from outside (--bind) and also defined in the recipe", stmt)
            return False
        previous = self.names.get(name)
        if previous is not None:
            on_line = f" on line {previous.line}" if previous.line else ""
            notes = ()
            if what == "value" and previous.what == "value":
                notes = (f"note: recipes are single-assignment; give the new value a new name, like {name}2",)
            self.error(f"'{name}' is already defined{on_line}", stmt, notes)
            return False
        self.names[name] = _Binding(t, what, stmt.span.line if stmt.span else None)
        return True

    def statement_value(self, expr: ast.Expr):
        t = trampoline(self.type_of(expr))
        if isinstance(t, _Vector) and _vector_kind(t.weight) is None:
            self.affine_error(expr, t, "")
            return _UNKNOWN
        if isinstance(t, _Other):
            return self.error(f"{_describe(t)} can only be an argument of a built-in function", expr)
        return t

    def affine_error(self, expr: ast.Expr, t: _Vector, prefix: str) -> None:
        message = (
            f"{prefix}model coefficients sum to {_format_weight(t.weight)}; a model needs 1 and a task vector 0"
        )
        fixed = affine.suggest_fix(expr, self.types)
        if fixed is not None:
            notes = (f"note: scale task vectors, not models: {to_text(fixed)}",)
        else:
            notes = (
                "note: a model is a weighted sum of models whose coefficients sum to 1 (0.5*a + 0.5*b); "
                "a task vector is a difference of models (ft - pre)",
            )
        self.error(message, expr, notes)

    # -- expressions

    # type_of and the methods it calls are frames (see trampoline): a sub-expression's type
    # is yielded, so an expression of any depth is checked without recursion.

    def type_of(self, node: ast.Expr) -> Frame:
        t = yield from self._type_of(node)
        self.types[id(node)] = t
        return t

    def _type_of(self, node: ast.Expr) -> Frame:
        if isinstance(node, ast.Number):
            return _Scalar(node.value)
        if isinstance(node, ast.String):
            return _Other("string")
        if isinstance(node, ast.Bool):
            return _Other("bool")
        if isinstance(node, ast.ListExpr):
            for item in node.items:
                yield self.type_of(item)
            return _Other("list")
        if isinstance(node, ast.Name):
            return self.name_type(node)
        if isinstance(node, ast.Neg):
            t = yield self.type_of(node.operand)
            if isinstance(t, _Scalar):
                return self.constant_value(node, t.value)
            if isinstance(t, _Vector):
                return _Vector(-t.weight, t.log_max, t.log_min, t.layers)
            if isinstance(t, _Other):
                return self.error(f"cannot negate {_describe(t)}", node)
            return _UNKNOWN
        if isinstance(node, ast.BinOp):
            return (yield from self.binop_type(node))
        if isinstance(node, ast.Call):
            return (yield from self.call_type(node))
        raise TypeError(f"not an expression: {node!r}")

    def name_type(self, node: ast.Name):
        name = node.id
        binding = self.names.get(name)
        if binding is not None:
            return binding.type
        if name in BUILTINS:
            return self.error(f"'{name}' is a built-in function, not a value; call it: {name}(...)", node)
        if self.bound_sources is not None and name in self.bound_sources:
            kind = self.bound_sources[name]
            if kind not in ("model", "delta"):
                raise ValueError(f"source {name!r} has kind {kind!r}; expected 'model' or 'delta'")
            self.used_sources[name] = kind
            return _Vector(1.0 if kind == "model" else 0.0)
        if name in self.definitions:
            line = self.definitions[name]
            if line is not None and line == self.current_line:
                return self.error(f"'{name}' is used in its own definition", node)
            on_line = f" on line {line}" if line else ""
            return self.error(f"'{name}' is used before it is defined{on_line}", node)
        if self.bound_sources is None:
            self.used_sources[name] = "model"
            return _Vector(1.0)
        reported = self.unknown.get(name)
        if reported is not None:  # one error per unknown name, however often it is used
            error, uses = reported
            self.unknown[name] = (error, uses + 1)
            return _UNKNOWN
        candidates = list(self.names) + list(self.bound_sources)
        hint = _suggest(name, candidates)
        notes = () if hint else (
            f"note: define it (like {name} = load(\"path\")) or bind it from outside (--bind {name}=PATH)",
        )
        self.error(f"unknown name '{name}'{hint}", node, notes)
        self.unknown[name] = (self.errors[-1], 1)
        return _UNKNOWN

    def binop_type(self, node: ast.BinOp) -> Frame:
        left = yield self.type_of(node.left)
        right = yield self.type_of(node.right)
        op = node.op
        if left is _UNKNOWN or right is _UNKNOWN:
            return _UNKNOWN
        for side in (left, right):
            if isinstance(side, _Other):
                return self.error(f"'{op}' cannot be applied to {_describe(side)}", node)
        if isinstance(left, _Scalar) and isinstance(right, _Scalar):
            return self.constant_value(node, left.value, right.value)
        if op in "+-":
            if isinstance(left, _Vector) and isinstance(right, _Vector):
                layers = self.same_layers(node, [(node.left, left), (node.right, right)])
                if layers is _UNKNOWN:
                    return _UNKNOWN
                return _Vector(left.weight + right.weight if op == "+" else left.weight - right.weight,
                               max(left.log_max, right.log_max), min(left.log_min, right.log_min), layers)
            vector, scalar = (left, node.right) if isinstance(left, _Vector) else (right, node.left)
            verb = "add" if op == "+" else "subtract"
            return self.error(
                f"cannot {verb} a number and {_describe(vector)}",
                node,
                ("note: numbers scale models and task vectors (0.4*tau); they are not added to them",),
            )
        if op == "*":
            if isinstance(left, _Vector) and isinstance(right, _Vector):
                return self.error(
                    f"'*' scales by a number; {_describe(left)} and {_describe(right)} cannot be multiplied",
                    node,
                    ("note: for the similarity of two vectors use dot(a, b) or cos(a, b)",),
                )
            scalar, vector = (left, right) if isinstance(left, _Scalar) else (right, left)
            return self.scale(node, vector, scalar, lambda w, c: w * c)
        # op == "/"
        if isinstance(right, _Vector):
            return self.error(f"cannot divide by {_describe(right)}; '/' divides by a number", node)
        if right.value == 0:
            return self.error("division by zero", node.right)
        return self.scale(node, left, right, lambda w, c: w / c)

    def scale(self, node: ast.BinOp, vector: _Vector, scalar: _Scalar, combine):
        if scalar.value is None:
            if _vector_kind(vector.weight) == "delta":
                return _Vector(0.0, vector.log_max, vector.log_min, vector.layers)
            return self.error(
                f"the coefficient of {_describe(vector)} must be known before the run, "
                "but this number is computed from weights",
                node,
                ("note: only task vectors (weight differences like ft - pre) can be scaled by norm(), dot() or cos()",),
            )
        weight = combine(vector.weight, scalar.value)
        if not math.isfinite(weight):
            return self.error("number out of range", node)
        if scalar.value == 0:
            return _Vector(weight, -math.inf, math.inf, vector.layers)
        log_c = math.log10(abs(scalar.value)) * (1 if node.op == "*" else -1)
        log_max, log_min = vector.log_max + log_c, vector.log_min + log_c
        if log_max > _LOG_MAX:
            return self.error(f"this scales {_describe(vector)} by about 1e{log_max:+.0f}, beyond the largest "
                              "number a run can hold (about 1.8e+308)", node,
                              ("note: the optimizer multiplies the factors out; every entry would be inf or NaN",))
        if log_min < _LOG_MIN:
            return self.error(f"this scales {_describe(vector)} by about 1e{log_min:+.0f}, below the smallest "
                              "number a run can hold (about 4.9e-324)", node,
                              ("note: the optimizer multiplies the factors out; the term would vanish",))
        return _Vector(weight, log_max, log_min, vector.layers)

    def constant_value(self, node: ast.Neg | ast.BinOp, *operands: float | None):
        """A number from numbers: its value when they are constants (see :mod:`constants`)."""
        try:
            return _Scalar(constants.fold(node, *operands))
        except TvlangError as exc:
            self.errors.append(exc.with_context(source=self.source, filename=self.filename))
            return _UNKNOWN

    # -- calls

    def call_type(self, call: ast.Call) -> Frame:
        row = BUILTINS.get(call.func)
        if row is None:
            for value in (*call.args, *(kw.value for kw in call.kwargs)):
                yield self.type_of(value)
            binding = self.names.get(call.func)
            if binding is not None or (self.bound_sources and call.func in self.bound_sources):
                return self.error(f"'{call.func}' is not a function", call)
            return self.error(f"unknown function '{call.func}'{_suggest(call.func, BUILTINS)}", call)
        before = len(self.errors)

        def report(message, node, notes):
            self.error(message, node, notes)

        bound = _bind(call, row, report)
        ok = len(self.errors) == before
        named = {a.name: a for a in (*row.params, *row.options)}
        vector_kinds: list[tuple[int, str]] = []
        given = {id(v) for v in call.args} | {id(kw.value) for kw in call.kwargs}
        for position, (name, value) in enumerate(bound.args.items()):
            if id(value) not in given:
                continue  # a default from the table
            kind = yield from self.check_argument(row, named[name], value, f"argument '{name}' of {row.name}()")
            if kind is None:
                ok = False
            elif kind in ("model", "delta") and named[name].kind in ("model", "delta", "vector"):
                vector_kinds.append((position, kind))
        for index, value in enumerate(bound.varargs):
            label = f"argument {len(row.params) + index + 1} of {row.name}()"
            kind = yield from self.check_argument(row, row.variadic, value, label)
            if kind is None:
                ok = False
            else:
                vector_kinds.append((index, kind))
        result = self.call_result(call, row, ok, [k for _, k in vector_kinds])
        if not isinstance(result, _Vector):
            return result
        layers = self.call_layers(call, row, bound)
        return _UNKNOWN if layers is _UNKNOWN else dataclasses.replace(result, layers=layers)

    # -- layer counts (layer surgery)

    def call_layers(self, call: ast.Call, row, bound: BoundCall):
        """The layer count of a call's result where the recipe says it: ``load(..., layers=[S, E])``
        has ``E - S``, a ``stack`` the sum of its parts' (when every part's is known), any other
        call the one its vector arguments share (an error where two known counts differ)."""
        if row.name == "load":
            span = bound.args.get("layers")
            if isinstance(span, ast.ListExpr) and len(span.items) == 2 and all(
                    isinstance(v, ast.Number) and float(v.value).is_integer() for v in span.items):
                start, end = (int(v.value) for v in span.items)
                return end - start if 0 <= start < end else None
            return None
        given = {id(v) for v in call.args} | {id(kw.value) for kw in call.kwargs}
        vectors = [(value, self.types.get(id(value))) for value in (*bound.args.values(), *bound.varargs)
                   if id(value) in given]
        vectors = [(value, t) for value, t in vectors if isinstance(t, _Vector)]
        if row.name == "stack":
            counts = [t.layers for _, t in vectors]
            return sum(counts) if counts and None not in counts else None
        return self.same_layers(call, vectors)

    def same_layers(self, node: ast.Expr, vectors: list[tuple[ast.Expr, _Vector]]):
        """The layer count that ``vectors`` (expression, type) share, ``None`` where none is known;
        an error (``_UNKNOWN``) where two known counts differ: merged entry by entry, the layers
        past the smaller count would have no counterpart."""
        known = [(value, t.layers) for value, t in vectors if t.layers is not None]
        for value, count in known[1:]:
            if count != known[0][1]:
                first = known[0][0]
                self.error(f"{_quote(first)} has {known[0][1]} layers and {_quote(value)} {count}: "
                           "merged entry by entry, the layers past the smaller count have no counterpart", node,
                           ("note: merge models (or stacks) with as many layers; a stack has the layers of its "
                            "parts' ranges together",))
                return _UNKNOWN
        return known[0][1] if known else None


def _quote(node: ast.Expr) -> str:
    """A short name for an expression in a message: its text, or its first 40 characters."""
    text = to_text(node)
    return f"'{text}'" if len(text) <= 40 else f"'{text[:37]}...'"


def check(
    program: ast.Program,
    *,
    source: str,
    filename: str | None = None,
    sources: dict[str, str] | None = None,
    params: dict[str, float] | None = None,
    require_output: bool = True,
    scalar_outputs: bool = False,
) -> CheckedProgram:
    """Check a parsed recipe; every independent error is reported in one TvlangError.

    ``sources`` maps names bound from outside to ``"model"`` or ``"delta"``;
    ``None`` makes every undefined name a free Model source. ``params``
    overrides declared ``param`` values. ``require_output=False`` accepts a
    program of definitions only (the REPL's session); ``scalar_outputs=True``
    accepts an output that is a number (``out = norm(a - pre)``, which a plan
    computes but no run writes). The result's ``kinds`` gives the kind of every
    defined name:

    >>> from tvlang.language.syntax import parse
    >>> check(parse("param lam = 0.5\\ntau = ft - pre\\ns = lam*norm(tau)\\n"), source="",
    ...       require_output=False).kinds
    {'lam': 'scalar', 'tau': 'delta', 's': 'scalar'}
    >>> check(parse("out = norm(ft - pre)\\n"), source="", scalar_outputs=True).outputs[0].kind
    'scalar'
    """
    checker = _Checker(program, source, filename, sources, params,
                       require_output=require_output, scalar_outputs=scalar_outputs)
    return checker.run()


def free_names(program: ast.Program) -> list[str]:
    r"""The names ``program`` uses but does not define (nor are built-ins), in order of first use:
    the sources bound from outside.

    >>> from tvlang.language.syntax import parse
    >>> free_names(parse("tau = ft - pre\nout = pre + 0.5*mean(tau, tau)\n"))
    ['ft', 'pre']
    """
    defined = {stmt.name for stmt in program.statements if stmt.name is not None}
    names: dict[str, None] = {}
    for node in ast.walk(program):
        if isinstance(node, ast.Name) and node.id not in defined and node.id not in BUILTINS:
            names.setdefault(node.id)
    return list(names)
