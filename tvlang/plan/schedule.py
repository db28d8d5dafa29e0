"""The plan: reduction passes, then a per-tensor program over numbered buffers.

A per-tensor program is a list of small in-place steps, the same for every
tensor name::

    b0 = read(pre)
    b1 = read(a)
    b0 += 0.4 * b1
    write(out, b0)

Buffers are reused once dead, and a combination accumulates into a buffer its
first term no longer needs, so a linear recipe over any number of sources holds
two or three tensors at a time. Whole-model scalars (``norm``, ``dot``, ``cos``,
global thresholds) are computed first, in streaming passes of their own, and are
plain numbers by the time the main pass runs.

An output that is itself a number (``out = norm(a - pre)/norm(b - pre)``) is a
*scalar output*: its reductions are scheduled like any other, it has no step in
the per-tensor program, and ``scalar_value`` computes it from the reductions once
they are known. A recipe of scalar outputs only has no main pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

from tvlang.errors import TvlangError
from tvlang.language.builtins import BUILTINS, resolve
from tvlang.language.constants import ARITHMETIC
from tvlang.language.trampoline import Frame, trampoline
from tvlang.plan.ir import IRProgram, Node, const_value, postorder

__all__ = ["STEP_OPS", "Step", "StepOp", "TensorProgram", "ReductionTask", "Schedule", "schedule", "format_coef",
           "resolve_coef", "scalar_value", "needed_steps"]


@dataclass(frozen=True)
class Step:
    """One per-tensor instruction; what each ``op`` means is its row in ``STEP_OPS``."""

    op: str
    dst: int | None = None
    srcs: tuple[int, ...] = ()
    coef: object = None  # float, or a scalar Node resolved before the pass
    name: str | None = None  # source key, kernel name, output name or task name
    options: tuple = ()
    node: Node | None = None


@dataclass(frozen=True)
class StepOp:
    """What a step op means, for every interpreter (whole tensors, chunks), the
    chunkability analysis and explain.

    ``effect``: ``"make"`` puts a new value in ``dst``; ``"update"`` changes the
    value in ``dst`` in place (``dst`` is also an input); ``"sink"`` hands
    ``srcs`` out of the program (to a writer or a reducer) and makes nothing.
    ``linear``: plain arithmetic or I/O that runs on any slice of a tensor (a chunk)
    with no kernel. ``arithmetic``: computed by the run layer's arithmetic table
    (``tvlang.run.steps.ARITHMETIC``), the one place its numbers are defined.
    ``text`` renders the step for explain, given a coefficient formatter and an
    option formatter.
    """

    name: str
    meaning: str
    effect: str
    linear: bool
    arithmetic: bool
    text: Callable[[Step, Callable, Callable], str]


def _b(slot: int) -> str:
    return f"b{slot}"


def _text_set(step: Step, c, _options) -> str:
    coef = c(step.coef)
    return f"{_b(step.dst)} = {_b(step.srcs[0])}" + ("" if coef == "1" else f" * {coef}")


def _text_add(step: Step, c, _options) -> str:
    first, second = (c(x) for x in step.coef)
    left = _b(step.srcs[0]) if first == "1" else f"{first} * {_b(step.srcs[0])}"
    if second.startswith("-"):
        right = f" - {_b(step.srcs[1])}" if second == "-1" else f" - {second[1:]} * {_b(step.srcs[1])}"
    else:
        right = f" + {_b(step.srcs[1])}" if second == "1" else f" + {second} * {_b(step.srcs[1])}"
    return f"{_b(step.dst)} = {left}{right}"


def _text_axpy(step: Step, c, _options) -> str:
    coef = c(step.coef)
    if coef == "1":
        return f"{_b(step.dst)} += {_b(step.srcs[0])}"
    if coef == "-1":
        return f"{_b(step.dst)} -= {_b(step.srcs[0])}"
    return f"{_b(step.dst)} += {coef} * {_b(step.srcs[0])}"


def _text_call(step: Step, _c, options) -> str:
    args = [_b(s) for s in step.srcs] + [f"{k}={options(v)}" for k, v in step.options]
    return f"{_b(step.dst)} = {step.name}({', '.join(args)})"


STEP_OPS: dict[str, StepOp] = {op.name: op for op in (
    StepOp("read", "dst = the tensor of source `name`", "make", True, False,
           lambda step, c, o: f"{_b(step.dst)} = read({step.name})"),
    StepOp("set", "dst = coef * src", "make", True, True, _text_set),
    StepOp("add", "dst = coef[0] * srcs[0] + coef[1] * srcs[1]", "make", True, True, _text_add),
    StepOp("scale", "dst *= coef", "update", True, True, lambda step, c, o: f"{_b(step.dst)} *= {c(step.coef)}"),
    StepOp("axpy", "dst += coef * src", "update", True, True, _text_axpy),
    StepOp("zero", "dst = zeros of the tensor's shape", "make", False, False,
           lambda step, c, o: f"{_b(step.dst)} = zeros"),
    StepOp("call", "dst = kernel `name`(srcs, options)", "make", False, False, _text_call),
    StepOp("write", "output `name` <- src", "sink", True, False,
           lambda step, c, o: f"write({step.name}, {_b(step.srcs[0])})"),
    StepOp("feed", "reduction task `name` <- srcs", "sink", False, False,
           lambda step, c, o: f"{step.name} <- {', '.join(_b(s) for s in step.srcs)}"),
)}


@dataclass
class TensorProgram:
    steps: list[Step]
    n_buffers: int
    reads: list[str]  # source keys, in first-read order
    writes: list[str]  # output names


def needed_steps(program: TensorProgram, targets: set[int], opaque: Collection[int] = ()) -> list[int]:
    """Indices of the steps that the steps ``targets`` depend on, and those steps, in order.

    A backward walk over slots: a step is needed when it makes or changes a slot
    that a needed step reads later. Writes are never needed, unless they are targets. (The
    passes before the main one run these: tvlang.run.chunked's and the torch-free executor's.)
    ``opaque``: steps whose inputs are not needed for what they make (the torch-free
    executor's main pass: a random_like call's noise takes nothing of its input).
    """
    needed: list[int] = []
    live: set[int] = set()
    for index in range(len(program.steps) - 1, -1, -1):
        step = program.steps[index]
        if index in targets:
            needed.append(index)
        elif step.op != "write" and step.dst in live:
            needed.append(index)
            if STEP_OPS[step.op].effect != "update":  # makes a new value: earlier ones are dead
                live.discard(step.dst)
        else:
            continue
        if index not in opaque:
            live.update(step.srcs)
    return needed[::-1]


@dataclass
class ReductionTask:
    """A whole-model scalar: which reducer, over which per-tensor vectors."""

    name: str  # "r0", "r1", ...
    node: Node  # the reduce node
    builtin: str
    options: dict
    factory: Callable[[], object] | None = None  # a Reducer factory from tvlang.ops


@dataclass
class Schedule:
    """Everything the evaluator needs, in order."""

    levels: list[tuple[list[ReductionTask], TensorProgram]]  # earlier passes
    main: TensorProgram  # the vector outputs, per tensor (no steps when every output is a scalar)
    tasks: dict[int, ReductionTask] = field(default_factory=dict)  # id(reduce node) -> task
    call_reductions: dict[int, list[tuple[str, Node]]] = field(default_factory=dict)
    scalars: list[tuple[str, Node]] = field(default_factory=list)  # scalar outputs: name, scalar node

    @property
    def sources_read(self) -> list[str]:
        seen: dict[str, None] = {}  # a dict keeps first-read order, and looks up in O(1)
        for _, program in self.levels:
            seen.update(dict.fromkeys(program.reads))
        seen.update(dict.fromkeys(self.main.reads))
        return list(seen)

    @property
    def passes(self) -> int:
        """Streaming passes over the inputs, the main one included (when there are vector outputs)."""
        total = 1 if self.main.steps else 0
        for tasks, _ in self.levels:
            total += max(getattr(task.factory(), "passes", 1) if task.factory else 1 for task in tasks)
        return total


# -- scheduling ----------------------------------------------------------------------


def schedule(program: IRProgram) -> Schedule:
    """Order the reductions into levels and emit every per-tensor program."""
    it = program.interner
    roots = list(program.roots())
    tasks: dict[int, ReductionTask] = {}
    call_reductions: dict[int, list[tuple[str, Node]]] = {}
    factories: dict[int, Callable[[], object]] = {}  # synthetic reduce node id -> reducer factory

    # Calls that need whole-model scalars of their own (a global threshold)
    # get synthetic reduce nodes over their inputs.
    for node in postorder(roots):
        if node.op == "call":
            extra = _call_reductions(node, it, factories)
            if extra:
                call_reductions[id(node)] = extra

    level: dict[int, int] = {}  # id(node) -> highest reduction level it needs

    def need(node: Node) -> int:
        return level.get(id(node), 0)

    everything = postorder(roots + [r for extra in call_reductions.values() for _, r in extra])
    for node in everything:
        children = list(node.args) + (list(node.attr) if node.op == "lin" else [])
        deepest = max((need(c) for c in children), default=0)
        if node.op == "reduce":
            deepest += 1
        if node.op == "call" and id(node) in call_reductions:
            # The call's own reductions (over its arguments, visited already) come first:
            # a reduction over this call is one level later (norm(ties(..., scope="model"))).
            for _, reduce_node in call_reductions[id(node)]:
                level[id(reduce_node)] = max((need(a) for a in reduce_node.args), default=0) + 1
            deepest = max([deepest] + [need(r) for _, r in call_reductions[id(node)]])
        level[id(node)] = deepest

    # Reductions reachable from the outputs (through coefficients and calls).
    reduce_nodes = [node for node in postorder(roots + [r for extra in call_reductions.values() for _, r in extra])
                    if node.op == "reduce"]  # each once: postorder visits a node once
    reduce_nodes.sort(key=need)  # named in the order their passes run: r0, r1, ... (stable within a level)
    for index, node in enumerate(reduce_nodes):
        tasks[id(node)] = _task(f"r{index}", node, factories.get(id(node)))

    levels: list[tuple[list[ReductionTask], TensorProgram]] = []
    for lvl in range(1, max((need(n) for n in reduce_nodes), default=0) + 1):
        at_level = [tasks[id(n)] for n in reduce_nodes if need(n) == lvl]
        feeds = [(task.name, task.node.args) for task in at_level]
        levels.append((at_level, emit([], feeds, call_reductions)))
    vectors = [(name, node) for name, node in program.outputs if node.kind == "vector"]
    scalars = [(name, node) for name, node in program.outputs if node.kind == "scalar"]
    main = emit(vectors, [], call_reductions)
    return Schedule(levels, main, tasks, call_reductions, scalars)


def _call_reductions(node: Node, it, factories: dict[int, Callable[[], object]]) -> list[tuple[str, Node]]:
    """Synthetic reduce nodes for a call that needs whole-model scalars (its row's
    ``reductions``); their reducer factories go into ``factories`` (per schedule, keyed
    by node id)."""
    name, options = node.attr
    row = BUILTINS.get(name)
    if row is None or row.reductions is None:
        return []
    result = []
    for reduction in row.reductions(row.complete(dict(options)), len(node.args)):
        inputs = tuple(node.args[i] for i in reduction.inputs)
        reduce_node = it.reduce(f"@{name}.{reduction.key}", inputs, tuple(options))
        factories[id(reduce_node)] = functools.partial(_make_reducer, reduction.reducer, reduction.args)
        result.append((reduction.key, reduce_node))
    return result


def _make_reducer(reference: str, args: tuple) -> object:
    """A Reducer from a row's lazy reference: the ops layer is imported here, when a pass runs."""
    return resolve(reference)(*args)


def _task(name: str, node: Node, factory: Callable[[], object] | None) -> ReductionTask:
    builtin, options = node.attr
    if factory is None:
        row = BUILTINS.get(builtin)
        if row is not None and row.stage == "reduce":
            factory = functools.partial(_make_reducer, row.kernel, ())
    return ReductionTask(name, node, builtin, dict(options), factory)


# -- emission ------------------------------------------------------------------------


def emit(outputs: list[tuple[str, Node]], feeds: list[tuple[str, tuple[Node, ...]]],
         call_reductions: dict[int, list[tuple[str, Node]]]) -> TensorProgram:
    """The per-tensor program that computes ``outputs`` and ``feeds``."""
    sinks = [node for _, node in outputs] + [n for _, args in feeds for n in args]
    uses: dict[int, int] = {}
    for node in postorder(sinks):
        for child in node.args:
            if child.kind == "vector" and node.kind == "vector":
                uses[id(child)] = uses.get(id(child), 0) + 1
    for node in sinks:
        uses[id(node)] = uses.get(id(node), 0) + 1

    steps: list[Step] = []
    reads: dict[str, None] = {}  # source keys in first-read order
    slot_of: dict[int, int] = {}
    free: list[int] = []
    n_buffers = 0

    def allocate() -> int:
        nonlocal n_buffers
        if free:
            return free.pop()
        n_buffers += 1
        return n_buffers - 1

    def release(node: Node) -> None:
        uses[id(node)] -= 1
        if uses[id(node)] == 0:
            free.append(slot_of.pop(id(node)))

    # compute and emit_linear are frames (see trampoline): a node's inputs are emitted
    # by yielding them, so a deep unoptimized tree is emitted without recursion.

    def compute(node: Node) -> Frame:
        """Emit ``node`` (once) and return its buffer."""
        if id(node) in slot_of:
            return slot_of[id(node)]
        op = node.op
        if op == "source":
            key = node.attr[0]
            dst = allocate()
            steps.append(Step("read", dst, name=key, node=node))
            reads.setdefault(key)
        elif op == "zero":
            dst = allocate()
            steps.append(Step("zero", dst, node=node))
        elif op == "call":
            srcs = []
            for arg in node.args:
                srcs.append((yield compute(arg)))
            for arg in node.args:
                release(arg)
            dst = allocate()
            name, options = node.attr
            steps.append(Step("call", dst, tuple(srcs), name=name, options=options, node=node))
        else:  # lin, or unlinearized add/sub/neg/mul/div
            dst = yield from emit_linear(node, _terms(node))
        slot_of[id(node)] = dst
        return dst

    def emit_linear(node: Node, terms: list[tuple[object, Node]]) -> Frame:
        # A unit coefficient first: no scaling needed to start the accumulator.
        terms = sorted(terms, key=lambda t: 0 if _is_one(t[0]) else 1)
        first_coef, first = terms[0]
        src = yield compute(first)
        if uses[id(first)] == 1:  # this is its last use: accumulate in place
            dst = slot_of.pop(id(first))
            uses[id(first)] = 0
            if not _is_one(first_coef):
                steps.append(Step("scale", dst, coef=first_coef, node=node))
        elif len(terms) >= 2:
            # dst = c0*x0 + c1*x1 in one fused step, then accumulate the rest.
            second_coef, second = terms[1]
            src2 = yield compute(second)
            release(first)
            release(second)
            dst = allocate()
            steps.append(Step("add", dst, (src, src2), coef=(first_coef, second_coef), node=node))
            terms = terms[1:]
        else:
            release(first)
            dst = allocate()
            steps.append(Step("set", dst, (src,), coef=first_coef, node=node))
        for coef, vec in terms[1:]:
            steps.append(Step("axpy", dst, ((yield compute(vec)),), coef=coef, node=node))
            release(vec)
        return dst

    for name, node in outputs:
        slot = trampoline(compute(node))
        steps.append(Step("write", None, (slot,), name=name, node=node))
        release(node)
    for task_name, args in feeds:
        slots = tuple(trampoline(compute(a)) for a in args)
        steps.append(Step("feed", None, slots, name=task_name))
        for arg in args:
            release(arg)
    return TensorProgram(steps, n_buffers, list(reads), [name for name, _ in outputs])


def _terms(node: Node) -> list[tuple[object, Node]]:
    """(coefficient, vector) pairs of a linear node; coefficients are floats or scalar nodes."""
    op = node.op
    if op == "lin":
        return [(_coef(c), v) for c, v in zip(node.attr, node.args)]
    if op == "add":
        return [(1.0, node.args[0]), (1.0, node.args[1])]
    if op == "sub":
        return [(1.0, node.args[0]), (-1.0, node.args[1])]
    if op == "neg":
        return [(-1.0, node.args[0])]
    if op == "mul":
        return [(_coef(node.args[0]), node.args[1])]
    if op == "div":
        return [(("div", _coef(node.args[1])), node.args[0])]
    raise AssertionError(f"not a linear node: {node}")


def _coef(node: Node) -> object:
    return const_value(node) if node.op == "const" else node


def _is_one(coef: object) -> bool:
    return isinstance(coef, float) and coef == 1.0


def format_coef(coef: object, scalar_names: Callable[[Node], str]) -> str:
    if isinstance(coef, float):
        coef = float(f"{coef:.12g}")  # as explain shows coefficients; the step keeps the exact value
        return repr(coef) if not coef.is_integer() else str(int(coef)) if abs(coef) < 1e15 else repr(coef)
    if isinstance(coef, tuple) and coef[0] == "div":
        return f"1/{format_coef(coef[1], scalar_names)}"
    return scalar_names(coef)


# The IR's scalar ops, as the language's arithmetic (a division by zero is checked first).
_SCALAR_OPS = {"add": ARITHMETIC["+"], "sub": ARITHMETIC["-"], "mul": ARITHMETIC["*"], "div": ARITHMETIC["/"]}


def scalar_value(node: Node, reduced: Mapping[int, float], cache: dict[int, float] | None = None) -> float:
    """The number a scalar node stands for, given the value of every reduction it
    uses (``reduced``: id of the reduce node -> value); ``cache`` keeps the values of
    the nodes already computed, by id.

    >>> from tvlang.plan.ir import Interner
    >>> it = Interner()
    >>> r = it.reduce("norm", (it.source("a", "model"),))
    >>> scalar_value(it.binary("div", it.const(3.0), it.binary("add", r, it.const(1.0))), {id(r): 2.0})
    1.0
    """
    cache = {} if cache is None else cache
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:  # children first; a reduction is a leaf here (its vectors were streamed)
        current, ready = stack.pop()
        if id(current) in cache:
            continue
        op = current.op
        if not ready and op in ("neg", *_SCALAR_OPS):
            stack.append((current, True))
            stack.extend((arg, False) for arg in current.args)
            continue
        if op == "const":
            value = const_value(current)
        elif op == "reduce":
            value = reduced[id(current)]
        elif op == "neg":
            value = -cache[id(current.args[0])]
        else:
            left, right = cache[id(current.args[0])], cache[id(current.args[1])]
            if op == "div" and right == 0.0:
                raise TvlangError("division by zero: a scalar in the recipe divides by a value that is 0 "
                                  "(a norm of an all-zero task vector?)")
            value = _SCALAR_OPS[op](left, right)
        cache[id(current)] = value
    return cache[id(node)]


def resolve_coef(coef: object, scalars: Callable[[Node], float]) -> float:
    """The number a coefficient stands for once the reductions are known."""
    if isinstance(coef, float):
        return coef
    if isinstance(coef, tuple) and coef[0] == "div":
        value = resolve_coef(coef[1], scalars)
        if value == 0.0:
            raise TvlangError("division by zero: a coefficient divides by a scalar that is 0")
        return 1.0 / value
    return scalars(coef)
