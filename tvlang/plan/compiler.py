"""``tvlang.compile``: text in, an inspectable, runnable :class:`Plan` out.

>>> import tvlang
>>> plan = tvlang.compile("pre + 0.5*(a - pre) + 0.5*(b - pre)")
>>> plan.sources_read()
['a', 'b']
>>> print(plan.optimized_text())
out = 0.5*a + 0.5*b
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from tvlang.language import ast
from tvlang.errors import TvlangError
from tvlang.plan.ir import IRProgram, Node, build, const_value, postorder
from tvlang.plan.optimize import OptimizerFlags, optimize
from tvlang.plan.schedule import Schedule, Step, format_coef, schedule

__all__ = ["compile", "parse_recipe", "Plan", "PendingPlan", "RunSummary", "delta", "DeltaBinding"]


@functools.lru_cache(maxsize=256)
def parse_recipe(text: str, filename: str | None = None) -> ast.Program:
    """Parse a recipe, or a bare expression as ``out = EXPR`` (cached per text)."""
    from tvlang.language.syntax import parse, parse_expression

    try:
        return parse(text, filename)
    except TvlangError as program_error:
        try:
            expr = parse_expression(text, filename)
        except TvlangError:
            raise program_error from None
        return ast.Program((ast.Out(None, expr, span=expr.span),), span=expr.span)


def compile(text: str, *, filename: str | None = None, sources: Mapping[str, str] | None = None,
            flags: OptimizerFlags | None = None, **params: float) -> "Plan":
    """Parse, check and optimize ``text``; ``params`` override its ``param`` values.

    ``sources`` gives the kind (``"model"``/``"delta"``) of names bound from
    outside. Without it every undefined name is taken for a Model; when the
    recipe only type-checks with some of them task vectors (``pre + 0.7*tau``),
    the plan is typed when it meets its bindings (``tvlang.delta(x)``, or a
    Delta file), and inspecting it before then raises the checker's error.
    """
    program = declare_params(parse_recipe(text, filename), params)
    floats = {k: float(v) for k, v in params.items()}
    try:
        return Plan(text, filename, program, dict(sources) if sources is not None else None,
                    floats, flags or OptimizerFlags())
    except TvlangError as error:
        if sources is not None:
            raise
        pending = PendingPlan(text, filename, program, floats, flags or OptimizerFlags(), error)
        if not pending.kind_dependent():
            raise
        return pending


class PendingPlan:
    """A recipe whose free names are typed by the bindings it runs with.

    >>> import torch, tvlang
    >>> plan = tvlang.compile("pre + 0.5*tau")      # tau must be a task vector
    >>> result = plan.evaluate({"pre": {"w": torch.ones(2)}, "tau": tvlang.delta({"w": torch.ones(2)})})
    >>> result["w"].tolist()
    [1.5, 1.5]
    """

    def __init__(self, text: str, filename: str | None, program: ast.Program, params: dict[str, float],
                 flags: OptimizerFlags, error: TvlangError) -> None:
        self.text, self.filename, self.program = text, filename, program
        self._params, self.flags, self.error = params, flags, error

    def free_names(self) -> list[str]:
        from tvlang.language.checker import load_builtins

        defined = {s.name for s in self.program.statements if isinstance(s, (ast.Assign, ast.Param, ast.Out))}
        builtins = load_builtins()
        names = []
        for node in ast.walk(self.program):
            if isinstance(node, ast.Name) and node.id not in defined and node.id not in builtins:
                if node.id not in names:
                    names.append(node.id)
        return names

    def kind_dependent(self) -> bool:
        """Whether every error goes away or changes when the free names are task
        vectors instead of models (else no binding can fix the recipe: raise now)."""
        from tvlang.language.checker import check

        def keys(error: TvlangError) -> set[tuple]:
            return {(e.message, e.span.start if e.span else None) for e in error.errors}

        as_deltas = {name: "delta" for name in self.free_names()}
        try:
            check(self.program, source=self.text, filename=self.filename, sources=as_deltas, params=self._params)
        except TvlangError as other:
            return not (keys(self.error) & keys(other))
        return True

    def bound(self, bindings: Mapping[str, Any]) -> Plan:
        """The plan typed for ``bindings`` (the checker's error when they do not fix it)."""
        kinds = {name: _binding_kind(bindings[name]) for name in self.free_names() if name in bindings}
        return Plan(self.text, self.filename, self.program, kinds, self._params, self.flags)

    def with_params(self, **params: float) -> "PendingPlan":
        merged = {**self._params, **{k: float(v) for k, v in params.items()}}
        return PendingPlan(self.text, self.filename, declare_params(self.program, merged), merged,
                           self.flags, self.error)

    def run(self, bindings: Mapping[str, Any] | None = None, out: Any = None, **options: Any) -> "RunSummary":
        return self.bound(bindings or {}).run(bindings, out, **options)

    def evaluate(self, bindings: Mapping[str, Any] | None = None, **options: Any) -> dict:
        return self.bound(bindings or {}).evaluate(bindings, **options)

    def stream(self, bindings: Mapping[str, Any] | None = None, **options: Any):
        return self.bound(bindings or {}).stream(bindings, **options)

    def __getattr__(self, name: str):
        # explain(), outputs, ...: there is no plan until the bindings say what the names are.
        raise self.error


def _binding_kind(value: Any) -> str:
    if isinstance(value, DeltaBinding):
        return "delta"
    if isinstance(value, (str, os.PathLike)):
        from tvlang.io import peek_kind

        return peek_kind(os.fspath(value))
    return "model"


def declare_params(program: ast.Program, params: Mapping[str, float]) -> ast.Program:
    """Declare as params the names a recipe uses without defining them, when a
    value is given for them (``-e "pre + lam*(ft - pre)" --set lam=0.3``).

    A value for a name the recipe never mentions stays an error (the checker
    names it); a declared param is simply overridden.
    """
    declared = {s.name for s in program.statements if isinstance(s, (ast.Param, ast.Assign))}
    used = {n.id for n in ast.walk(program) if isinstance(n, ast.Name)}
    extra = [name for name in params if name in used and name not in declared]
    if not extra:
        return program
    head = tuple(ast.Param(name, float(params[name])) for name in extra)
    return ast.Program(head + program.statements, span=program.span)


@dataclass(frozen=True)
class DeltaBinding:
    """A binding marked as a task vector (see :func:`delta`)."""

    value: Any


def delta(value: Any) -> DeltaBinding:
    """Mark a state dict, module or path bound to a name as a task vector (a Delta)."""
    return DeltaBinding(value)


@dataclass
class RunSummary:
    outputs: dict[str, str]  # output name -> path written
    tensors: int
    bytes_written: int
    seconds: float
    passes: int

    def line(self) -> str:
        size = self.bytes_written / 2**20
        rate = size / self.seconds if self.seconds > 0 else 0.0
        where = ", ".join(self.outputs.values())
        return (f"wrote {self.tensors} tensors ({size:.1f} MiB) to {where} in {self.seconds:.2f} s "
                f"({rate:.0f} MiB/s, {self.passes} pass{'es' if self.passes != 1 else ''})")


class Plan:
    """A checked, optimized recipe: explain it, run it, evaluate it."""

    def __init__(self, text: str, filename: str | None, program: ast.Program,
                 sources: dict[str, str] | None, params: dict[str, float], flags: OptimizerFlags) -> None:
        from tvlang.language.checker import check

        self.text = text
        self.filename = filename
        self.program = program
        self.flags = flags
        self._source_kinds = sources
        self._param_overrides = params
        self.checked = check(program, source=text, filename=filename, sources=sources, params=params)
        self.params: dict[str, float] = dict(self.checked.params)
        self.unoptimized: IRProgram = build(self.checked)
        self.optimized: IRProgram = optimize(self.unoptimized, flags)
        self.schedule: Schedule = schedule(self.optimized)
        self._variants: dict[tuple, Plan] = {}

    # -- variants ----------------------------------------------------------------

    def with_params(self, **params: float) -> "Plan":
        """The same recipe with other param values (no re-parse): a lambda sweep."""
        merged = {**self._param_overrides, **{k: float(v) for k, v in params.items()}}
        return Plan(self.text, self.filename, self.program, self._source_kinds, merged, self.flags)

    def with_flags(self, flags: OptimizerFlags) -> "Plan":
        return Plan(self.text, self.filename, self.program, self._source_kinds, self._param_overrides, flags)

    def for_kinds(self, kinds: Mapping[str, str]) -> "Plan":
        """This plan with free names re-typed (a bound file turned out to be a Delta)."""
        current = {name: kind for name, kind in self.checked.sources.items()}
        wanted = {**current, **{k: v for k, v in kinds.items() if k in current}}
        if wanted == current:
            return self
        key = tuple(sorted(wanted.items()))
        if key not in self._variants:
            self._variants[key] = Plan(self.text, self.filename, self.program, dict(wanted),
                                       self._param_overrides, self.flags)
        return self._variants[key]

    # -- inspection --------------------------------------------------------------

    @property
    def outputs(self) -> list[str]:
        return [name for name, _ in self.optimized.outputs]

    def output_kind(self, name: str) -> str:
        return dict(self.optimized.outputs)[name].vector_kind

    def sources_read(self, output: str | None = None) -> list[str]:
        """The sources the optimized plan reads (for one output, or all)."""
        if output is None:
            return self.schedule.sources_read
        root = dict(self.optimized.outputs)[output]
        keys = [n.attr[0] for n in postorder([root]) if n.op == "source"]
        order = self.schedule.sources_read
        return sorted(set(keys), key=lambda k: order.index(k) if k in order else len(order))

    def program_text(self) -> str:
        from tvlang.language.printer import to_text

        return to_text(self.program).rstrip("\n")

    def optimized_text(self) -> str:
        return _ir_text(self.optimized)

    def explain(self) -> str:
        """The program as written, optimized, what each output reads, and the per-tensor program."""
        sched = self.schedule
        lines = ["# as written", self.program_text(), "", "# optimized", self.optimized_text(), "", "# sources read"]
        for name in self.outputs:
            reads = ", ".join(self.sources_read(name)) or "(none)"
            lines.append(f"{name} ({self.output_kind(name)}): {reads}")
        names = _ScalarNames(sched)
        lines += ["", f"# plan: {sched.passes} streaming pass{'es' if sched.passes != 1 else ''} over the inputs"]
        pass_no = 1
        for tasks, program in sched.levels:
            lines.append(f"# pass {pass_no}: whole-model scalars")
            for task in tasks:
                lines.append(f"{task.name} = {_scalar_text(task.node, None)}")
            lines.extend("  " + _step_text(step, names) for step in program.steps)
            pass_no += 1
        lines.append(f"# pass {pass_no}: per tensor ({sched.main.n_buffers} buffers)")
        lines.extend("  " + _step_text(step, names) for step in sched.main.steps)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<tvlang.Plan outputs={self.outputs} reads={self.sources_read()}>"

    # -- execution (torch is imported only here) ------------------------------------

    def run(self, bindings: Mapping[str, Any] | None = None, out: Any = None, **options: Any) -> RunSummary:
        """Stream the recipe over its inputs and write every output; see :mod:`tvlang.run.evaluate`."""
        from tvlang.run.evaluate import run

        return run(self, bindings or {}, out, **options)

    def evaluate(self, bindings: Mapping[str, Any] | None = None, *, output: str | None = None, **options: Any) -> dict:
        """The tensors of one output, as a dict (in memory: for small models and tests)."""
        return dict(self.stream(bindings, output=output, **options))

    def stream(self, bindings: Mapping[str, Any] | None = None, *, output: str | None = None,
               **options: Any) -> Iterator[tuple[str, Any]]:
        """(tensor name, tensor) pairs of one output, computed one tensor at a time."""
        from tvlang.run.evaluate import stream

        return stream(self, bindings or {}, output=output, **options)


# -- text of IR, for explain ---------------------------------------------------------------


class _ScalarNames:
    def __init__(self, sched: Schedule) -> None:
        self.sched = sched

    def __call__(self, node: Node) -> str:
        task = self.sched.tasks.get(id(node))
        if task is not None:
            return task.name
        return _scalar_text(node, self)


def _scalar_text(node: Node, names) -> str:
    from tvlang.language.printer import to_text

    return to_text(_scalar_ast(node, names))


def shown(value: float) -> float:
    """A coefficient as explain shows it: 12 significant digits, so folding
    residues print as written (0.1 + 0.2 shows as 0.3); the plan keeps the exact value."""
    return float(f"{value:.12g}")


def _scalar_ast(node: Node, names) -> ast.Expr:
    if node.op == "const":
        value = shown(const_value(node))
        return ast.Neg(ast.Number(-value)) if value < 0 else ast.Number(value)
    if node.op == "reduce":
        task = names.sched.tasks.get(id(node)) if isinstance(names, _ScalarNames) else None
        if task is not None:
            return ast.Name(task.name)
        return ast.Call(node.attr[0].lstrip("@"), tuple(_vector_ast(a, {}) for a in node.args))
    if node.op == "neg":
        return ast.Neg(_scalar_ast(node.args[0], names))
    ops = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
    return ast.BinOp(ops[node.op], _scalar_ast(node.args[0], names), _scalar_ast(node.args[1], names))


def _vector_ast(node: Node, temps: dict[int, str]) -> ast.Expr:
    if id(node) in temps:
        return ast.Name(temps[id(node)])
    op = node.op
    if op == "source":
        return ast.Name(node.attr[0])
    if op == "zero":
        return ast.Call("zero")
    if op == "call":
        name, options = node.attr
        kwargs = tuple(ast.Keyword(k, _literal(v)) for k, v in options if not _is_default(name, k, v))
        return ast.Call(name, tuple(_vector_ast(a, temps) for a in node.args), kwargs)
    if op == "neg":
        return ast.Neg(_vector_ast(node.args[0], temps))
    if op in ("add", "sub", "mul", "div"):
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
        left, right = node.args
        left_ast = _scalar_ast(left, None) if left.kind == "scalar" else _vector_ast(left, temps)
        right_ast = _scalar_ast(right, None) if right.kind == "scalar" else _vector_ast(right, temps)
        return ast.BinOp(sym, left_ast, right_ast)
    # lin: c1*x1 + c2*x2 - ..., starting with a positive term where there is one
    pairs = list(zip(node.attr, node.args))
    positive = [i for i, (c, _) in enumerate(pairs) if not (c.op == "const" and const_value(c) < 0)]
    if positive:
        pairs.insert(0, pairs.pop(positive[0]))
    result: ast.Expr | None = None
    for coef, vec in pairs:
        term = _vector_ast(vec, temps)
        negative = coef.op == "const" and const_value(coef) < 0
        magnitude = abs(shown(const_value(coef))) if coef.op == "const" else None
        if magnitude == 1.0:
            scaled = term
        elif magnitude is not None:
            scaled = ast.BinOp("*", ast.Number(magnitude), term)
        else:
            scaled = ast.BinOp("*", _scalar_ast(coef, None), term)
        if result is None:
            result = ast.Neg(scaled) if negative else scaled
        else:
            result = ast.BinOp("-" if negative else "+", result, scaled)
    return result if result is not None else ast.Call("zero")


def _is_default(builtin: str, option: str, value: object) -> bool:
    """Whether ``value`` is what the built-in's row gives ``option`` anyway (explain leaves it out)."""
    from tvlang.language.checker import load_builtins

    row = load_builtins().get(builtin)
    if row is None:
        return False
    for arg in (*row.params, *row.options):
        if arg.name == option:
            default = arg.default
            if isinstance(default, ast.Node):
                return _literal(value) == default
            if isinstance(default, (list, tuple)):
                return tuple(default) == value
            return default == value
    return False


def _literal(value: object) -> ast.Expr:
    if isinstance(value, bool):
        return ast.Bool(value)
    if isinstance(value, str):
        return ast.String(value)
    if isinstance(value, tuple):
        return ast.ListExpr(tuple(_literal(v) for v in value))
    number = float(value)  # type: ignore[arg-type]
    return ast.Neg(ast.Number(-number)) if number < 0 else ast.Number(number)


def _ir_text(program: IRProgram) -> str:
    """The optimized program in tvlang syntax; nodes used twice become named temporaries."""
    from tvlang.language.printer import to_text

    roots = list(program.roots())
    uses: dict[int, int] = {}
    for node in postorder(roots):
        for child in node.args:
            uses[id(child)] = uses.get(id(child), 0) + 1
    for node in roots:
        uses[id(node)] = uses.get(id(node), 0) + 1
    temps: dict[int, str] = {}
    statements: list[ast.Stmt] = []
    for node in postorder(roots):
        if node.kind == "vector" and node.op in ("lin", "call") and uses.get(id(node), 0) >= 2:
            name = f"t{len(temps)}"
            statements.append(ast.Assign(name, _vector_ast(node, temps)))
            temps[id(node)] = name
    for name, node in program.outputs:
        statements.append(ast.Out(None if name == "out" else name, _vector_ast(node, temps)))
    return to_text(ast.Program(tuple(statements))).rstrip("\n")


def _step_text(step: Step, names) -> str:
    def c(coef):
        text = format_coef(coef, names)
        simple = text.lstrip("-").replace(".", "").replace("e", "").isalnum() or text.startswith("1/")
        return text if simple else f"({text})"

    b = lambda i: f"b{i}"  # noqa: E731
    if step.op == "read":
        return f"{b(step.dst)} = read({step.name})"
    if step.op == "zero":
        return f"{b(step.dst)} = zeros"
    if step.op == "set":
        coef = c(step.coef)
        return f"{b(step.dst)} = {b(step.srcs[0])}" + ("" if coef == "1" else f" * {coef}")
    if step.op == "add":
        first, second = (c(x) for x in step.coef)
        left = b(step.srcs[0]) if first == "1" else f"{first} * {b(step.srcs[0])}"
        if second.startswith("-"):
            right = f" - {b(step.srcs[1])}" if second == "-1" else f" - {second[1:]} * {b(step.srcs[1])}"
        else:
            right = f" + {b(step.srcs[1])}" if second == "1" else f" + {second} * {b(step.srcs[1])}"
        return f"{b(step.dst)} = {left}{right}"
    if step.op == "scale":
        return f"{b(step.dst)} *= {c(step.coef)}"
    if step.op == "axpy":
        coef = c(step.coef)
        if coef == "1":
            return f"{b(step.dst)} += {b(step.srcs[0])}"
        if coef == "-1":
            return f"{b(step.dst)} -= {b(step.srcs[0])}"
        return f"{b(step.dst)} += {coef} * {b(step.srcs[0])}"
    if step.op == "call":
        args = [b(s) for s in step.srcs] + [f"{k}={_option_text(v)}" for k, v in step.options]
        return f"{b(step.dst)} = {step.name}({', '.join(args)})"
    if step.op == "write":
        return f"write({step.name}, {b(step.srcs[0])})"
    if step.op == "feed":
        return f"{step.name} <- {', '.join(b(s) for s in step.srcs)}"
    raise AssertionError(step.op)


def _option_text(value: object) -> str:
    from tvlang.language.printer import to_text

    return to_text(_literal(value))


def resolve_path(path: str, filename: str | None) -> str:
    """A path from a recipe, relative to the recipe's directory."""
    if filename is None or Path(path).is_absolute():
        return path
    return str(Path(filename).parent / path)
