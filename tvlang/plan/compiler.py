"""``tvlang.compile``: text in, an inspectable, runnable :class:`Plan` out.

>>> import tvlang
>>> plan = tvlang.compile("pre + 0.5*(a - pre) + 0.5*(b - pre)")
>>> plan.sources_read()
['a', 'b']
>>> print(plan.optimized_text())
out = 0.5*a + 0.5*b

A recipe whose output is a number plans its whole-model reductions, and
``Plan.scalar`` computes it:

>>> import torch
>>> plan = tvlang.compile("norm(ft - pre) / 2")
>>> plan.output_kind("out"), plan.schedule.passes
('scalar', 1)
>>> plan.scalar({"pre": {"w": torch.zeros(2)}, "ft": {"w": torch.tensor([3.0, 4.0])}})
2.5
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import Any, Iterator, Mapping

from tvlang.errors import TvlangError
from tvlang.language import ast
from tvlang.plan.explain import explain, ir_text
from tvlang.plan.ir import IRProgram, build, postorder
from tvlang.plan.optimize import OptimizerFlags, optimize
from tvlang.plan.records import DeltaBinding, RunSummary, delta
from tvlang.plan.schedule import Schedule, schedule

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
        from tvlang.language.checker import free_names

        return free_names(self.program)

    def kind_dependent(self) -> bool:
        """Whether every error goes away or changes when the free names are task
        vectors instead of models (else no binding can fix the recipe: raise now)."""
        from tvlang.language.checker import check

        def keys(error: TvlangError) -> set[tuple]:
            return {(e.message, e.span.start if e.span else None) for e in error.errors}

        as_deltas = {name: "delta" for name in self.free_names()}
        try:
            checked = check(self.program, source=self.text, filename=self.filename, sources=as_deltas,
                            params=self._params, scalar_outputs=True)
            check_coefficients(optimize(build(checked)), checked)
        except TvlangError as other:
            return not (keys(self.error) & keys(other))
        return True

    def bound(self, bindings: Mapping[str, Any]) -> Plan:
        """The plan typed for ``bindings`` (the checker's error when they do not fix it)."""
        from tvlang.run.bindings import binding_kind  # reads a file's header: the run layer's job

        kinds = {name: binding_kind(bindings[name]) for name in self.free_names() if name in bindings}
        return Plan(self.text, self.filename, self.program, kinds, self._params, self.flags)

    def with_params(self, **params: float) -> "PendingPlan":
        merged = {**self._params, **{k: float(v) for k, v in params.items()}}
        return PendingPlan(self.text, self.filename, declare_params(self.program, merged), merged,
                           self.flags, self.error)

    # The options are Plan's (its methods name them); a misspelled one is Plan's TypeError.
    def run(self, bindings: Mapping[str, Any] | None = None, out: Any = None, **options: Any) -> "RunSummary":
        return self.bound(bindings or {}).run(bindings, out, **options)

    def evaluate(self, bindings: Mapping[str, Any] | None = None, **options: Any) -> dict:
        return self.bound(bindings or {}).evaluate(bindings, **options)

    def stream(self, bindings: Mapping[str, Any] | None = None, **options: Any):
        return self.bound(bindings or {}).stream(bindings, **options)

    def scalar(self, bindings: Mapping[str, Any] | None = None, **options: Any) -> float:
        return self.bound(bindings or {}).scalar(bindings, **options)

    def __getattr__(self, name: str):
        # explain(), outputs, ...: there is no plan until the bindings say what the names are.
        raise self.error


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


class Plan:
    """A checked, optimized recipe: explain it, run it, evaluate it.

    An output is a Model, a Delta (``run`` writes it, ``evaluate`` and ``stream``
    give its tensors) or a number, a *scalar output* (``scalar`` computes it).
    """

    def __init__(self, text: str, filename: str | None, program: ast.Program,
                 sources: dict[str, str] | None, params: dict[str, float], flags: OptimizerFlags) -> None:
        from tvlang.language.checker import check

        self.text = text
        self.filename = filename
        self.program = program
        self.flags = flags
        self._source_kinds = sources
        self._param_overrides = params
        self.checked = check(program, source=text, filename=filename, sources=sources, params=params,
                             scalar_outputs=True)
        self.params: dict[str, float] = dict(self.checked.params)
        self.unoptimized: IRProgram = build(self.checked)
        self.optimized: IRProgram = optimize(self.unoptimized, flags)
        check_coefficients(self.optimized, self.checked)
        self.schedule: Schedule = schedule(self.optimized)
        self._variants: dict[tuple, Plan] = {}

    # -- variants ----------------------------------------------------------------

    def with_params(self, **params: float) -> "Plan":
        """The same recipe with other param values (no re-parse): a lambda sweep."""
        merged = {**self._param_overrides, **{k: float(v) for k, v in params.items()}}
        return Plan(self.text, self.filename, self.program, self._source_kinds, merged, self.flags)

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
        """``"model"``, ``"delta"`` or ``"scalar"``."""
        return dict(self.optimized.outputs)[name].vector_kind

    def sources_read(self, output: str | None = None) -> list[str]:
        """The sources the optimized plan reads (for one output, or all)."""
        if output is None:
            return self.schedule.sources_read
        root = dict(self.optimized.outputs)[output]
        keys = {n.attr[0] for n in postorder([root]) if n.op == "source"}
        position = {key: index for index, key in enumerate(self.schedule.sources_read)}
        return sorted(keys, key=lambda k: position.get(k, len(position)))

    def program_text(self) -> str:
        from tvlang.language.printer import to_text

        return to_text(self.program).rstrip("\n")

    def optimized_text(self) -> str:
        return ir_text(self.optimized)

    def explain(self) -> str:
        """The program as written, optimized, what each output reads, and the per-tensor program."""
        return explain(self)

    def __repr__(self) -> str:
        return f"<tvlang.Plan outputs={self.outputs} reads={self.sources_read()}>"

    # -- bindings ----------------------------------------------------------------

    def unused_bindings(self, names) -> list[str]:
        """The names among ``names`` that the recipe does not read from outside."""
        return [name for name in names if name not in self.checked.sources]

    def binding_hint(self, name: str) -> str:
        """Why a bound ``name`` may be unused: the recipe defines it, or a near name it reads."""
        if name in self.checked.env:
            return f"; the recipe defines '{name}' itself"
        match = difflib.get_close_matches(name, list(self.checked.sources), n=1, cutoff=0.6)
        return f"; did you mean '{match[0]}'?" if match else ""

    def check_bindings(self, bindings: Mapping[str, Any] | None, *, allow_unused: bool = False) -> None:
        """A ``TvlangError`` naming the bindings the recipe does not read (most often a misspelled
        key), unless ``allow_unused`` (a sweep that keeps one dict for many recipes)."""
        if allow_unused or not bindings:
            return
        unused = self.unused_bindings(bindings)
        if not unused:
            return
        names = ", ".join(f"'{name}'" for name in unused)
        reads = ", ".join(self.checked.sources) or "no bound names"
        raise TvlangError(f"the recipe does not use the binding{'s' if len(unused) > 1 else ''} {names}"
                          f"{self.binding_hint(unused[0])} (it reads {reads})",
                          notes=("note: pass allow_unused=True to keep names that other recipes read (a sweep)",))

    # -- execution (torch is imported only here) ------------------------------------
    # The options are keyword parameters (the run layer's, with the same defaults:
    # tests/test_api_options.py holds them equal), so a misspelled one is Python's
    # TypeError at the call, and editors and type checkers know them.

    def run(self, bindings: Mapping[str, Any] | None = None, out: Any = None, *, device: Any = "cpu",
            dtype: Any = "float32", out_dtype: Any = None, shard_size: int | None = None, force: bool = False,
            missing: str = "error", progress: Any = False, allow_nonfinite: bool = False, executor: str = "local",
            address: str | None = None, workers: int | None = None, lock: Any = None, model_card: bool = True,
            task_timeout: float | None = None, config: Any = None, allow_unused: bool = False) -> RunSummary:
        """Stream the recipe over its inputs and write every output; see :func:`tvlang.run.driver.run`.
        A linear recipe over local safetensors files on the CPU runs without importing torch, to the
        same files (:mod:`tvlang.run.direct`, tried first); ``TVLANG_DIRECT=0`` turns that off."""
        from tvlang.run.direct import attempt  # imports no torch: a linear recipe may need none

        for name in self.outputs:
            self._refuse_scalar(name)
        self.check_bindings(bindings, allow_unused=allow_unused)
        options = dict(device=device, dtype=dtype, out_dtype=out_dtype, shard_size=shard_size, force=force,
                       missing=missing, progress=progress, allow_nonfinite=allow_nonfinite, executor=executor,
                       address=address, workers=workers, lock=lock, model_card=model_card,
                       task_timeout=task_timeout, config=config)
        from tvlang.run.outputs import owned_by_this_run

        with owned_by_this_run():  # a temporary a signal left unseen by the executor's cleanup goes too
            summary = attempt(self, bindings or {}, out, **options)
            if summary is not None:
                return summary
            from tvlang.run.evaluate import run

            return run(self, bindings or {}, out, **options)

    def evaluate(self, bindings: Mapping[str, Any] | None = None, *, output: str | None = None, device: Any = "cpu",
                 dtype: Any = "float32", out_dtype: Any = None, missing: str = "error",
                 allow_nonfinite: bool = False, allow_unused: bool = False) -> dict:
        """The tensors of one output, as a dict (in memory: for small models and tests)."""
        return dict(self.stream(bindings, output=output, device=device, dtype=dtype, out_dtype=out_dtype,
                                missing=missing, allow_nonfinite=allow_nonfinite, allow_unused=allow_unused))

    def stream(self, bindings: Mapping[str, Any] | None = None, *, output: str | None = None, device: Any = "cpu",
               dtype: Any = "float32", out_dtype: Any = None, missing: str = "error", allow_nonfinite: bool = False,
               allow_unused: bool = False) -> Iterator[tuple[str, Any]]:  # a TensorStream, which has len()
        """(tensor name, tensor) pairs of one output, computed one tensor at a time; ``len()`` of the
        returned stream is the number of pairs, from the inputs' headers (``tvlang.run.driver.TensorStream``)."""
        from tvlang.run.evaluate import stream

        if output in self.outputs or (output is None and len(self.outputs) == 1):
            self._refuse_scalar(output or self.outputs[0], "its value is Plan.scalar()")
        self.check_bindings(bindings, allow_unused=allow_unused)
        return stream(self, bindings or {}, output=output, device=device, dtype=dtype, out_dtype=out_dtype,
                      missing=missing, allow_nonfinite=allow_nonfinite)

    def scalar(self, bindings: Mapping[str, Any] | None = None, *, output: str | None = None, device: Any = "cpu",
               dtype: Any = "float32", missing: str = "error", progress: Any = False,
               allow_unused: bool = False) -> float:
        """The value of a scalar output (``out = norm(a - pre)``): its whole-model
        reductions streamed over the inputs, then arithmetic on them."""
        from tvlang.run.evaluate import scalars

        name = output if output is not None else self._only_output()
        self.check_bindings(bindings, allow_unused=allow_unused)
        return scalars(self, bindings or {}, [name], device=device, dtype=dtype, missing=missing,
                       progress=progress)[name]

    def _only_output(self) -> str:
        if len(self.outputs) != 1:
            raise TvlangError(f"this recipe has outputs {', '.join(self.outputs)}: say which one with output=")
        return self.outputs[0]

    def _refuse_scalar(self, name: str, note: str = "name it (x = ...) and use it to scale a task vector") -> None:
        """A number is not a checkpoint: running or streaming a scalar output is an error at that output."""
        if self.output_kind(name) != "scalar":
            return
        output = next(o for o in self.checked.outputs if o.name == name)
        raise TvlangError("an output must be a model or a task vector, got a number", output.expr.span,
                          source=self.text, filename=self.filename, notes=(f"note: {note}",))


def check_coefficients(program: IRProgram, checked) -> None:
    """A coefficient the optimizer folded to inf or NaN (``1e308*tau + 1e308*tau``) is a
    check-time error naming the output, not a model of NaNs (the checker catches single
    products beyond a double's range with their span; a sum of large terms lands here)."""
    spans = {output.name: output.span for output in checked.outputs}
    for name, root in program.outputs:
        for node in postorder([root]):
            if node.op == "const" and not math.isfinite(node.attr):
                raise TvlangError(f"output '{name}': its coefficients add up to {node.attr}, beyond the largest "
                                  "number a run can hold (about 1.8e+308)", spans.get(name),
                                  source=checked.source, filename=checked.filename)
    _check_adapter_calls(program, checked)


def _check_adapter_calls(program: IRProgram, checked) -> None:
    """``adapter(d, rank)`` is a form of output (``tvlang run`` writes it as a PEFT adapter):
    only the whole expression of an output, after definitions are inlined, may be one."""
    for name, root in program.outputs:
        inner = list(root.args) if root.op == "call" and root.attr[0] == "adapter" else [root]
        if not any(node.op == "call" and node.attr[0] == "adapter" for node in postorder(inner)):
            continue
        out = next(o for o in checked.outputs if o.name == name)
        call = next((n for n in ast.walk(out.expr) if isinstance(n, ast.Call) and n.func == "adapter"
                     and n is not out.expr), None)
        raise TvlangError(f"output '{name}' computes with adapter(...), which is a form of output: it can"
                          " only be the whole expression of an out", call.span if call is not None else out.span,
                          source=checked.source, filename=checked.filename,
                          notes=("write the adapter as its own output: out a = adapter(ft - pre, 16)",))

