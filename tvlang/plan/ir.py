"""The typed, hash-consed IR between the checker and the planner.

Every node is made through an :class:`Interner`, one per compile: structurally
equal nodes are the same object, so a subexpression written twice (in one
output or across several ``out`` statements) is one node, computed once per
tensor.

Vector nodes (models and task vectors) carry their affine ``weight``: the sum of
their model coefficients, 1 for a Model and 0 for a Delta. Scalar nodes are
numbers: constants, or whole-model reductions computed in an earlier pass.

>>> interner = Interner()
>>> a = interner.source("a", "model")
>>> interner.source("a", "model") is a
True
>>> lin = interner.lin((a,), (interner.const(0.5),))
>>> lin.weight
0.5
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tvlang.errors import Span, TvlangError
from tvlang.language import ast, constants
from tvlang.language.builtins import BUILTINS, REQUIRED, Builtin
from tvlang.language.pertensor import PER_TENSOR, Layers, PerTensor, Where, representative
from tvlang.language.printer import to_text
from tvlang.language.trampoline import Frame, trampoline

__all__ = ["Node", "Interner", "SourceSpec", "IRProgram", "build", "postorder", "const_value", "is_source_call"]

VECTOR_OPS = {"source", "lin", "call", "zero", "add", "sub", "neg", "mul", "div"}
_serial = itertools.count()


class Node:
    """An interned IR node. Compare with ``is``; never build one directly."""

    __slots__ = ("op", "args", "attr", "kind", "weight", "serial", "__weakref__")

    def __init__(self, op: str, args: tuple["Node", ...], attr: object, kind: str, weight: float | None):
        self.op = op
        self.args = args
        self.attr = attr
        self.kind = kind  # "vector" or "scalar"
        self.weight = weight
        self.serial = next(_serial)

    @property
    def is_vector(self) -> bool:
        return self.kind == "vector"

    @property
    def vector_kind(self) -> str:
        """"model", "delta" or "affine(w)" for an intermediate vector."""
        if self.weight is None:
            return "scalar"
        if abs(self.weight - 1.0) < 1e-9:
            return "model"
        if abs(self.weight) < 1e-9:
            return "delta"
        return f"affine({self.weight:g})"

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.attr!r}, {len(self.args)} args)"


@dataclass(frozen=True)
class SourceSpec:
    """Where a source's tensors come from: a path from ``load()``, or a binding name."""

    key: str
    kind: str  # "model" | "delta"
    path: str | None = None  # resolved path from load(); None for a free name bound from outside
    span: Span | None = None
    func: str = "load"  # the source built-in that reads the path: load, load_delta, lora or stack
    layers: tuple[int, int] | None = None  # load(..., layers=[START, END]): that range of layers, from 0
    parts: tuple["SourceSpec", ...] = ()  # stack(...): its parts, each a load (path = the first part's)
    strip_prefix: str | None = None  # load(..., strip_prefix=P): names lose P when they start with it
    add_prefix: str | None = None  # load(..., add_prefix=P): names get P in front (after strip_prefix)


class Interner:
    """The per-compile table that makes structurally equal nodes one object."""

    def __init__(self) -> None:
        self._table: dict[tuple, Node] = {}

    def make(self, op: str, args: tuple[Node, ...] = (), attr: object = None, *,
             kind: str = "vector", weight: float | None = None) -> Node:
        key = (op, tuple(map(id, args)), attr)
        node = self._table.get(key)
        if node is None:
            node = Node(op, args, attr, kind, weight if kind == "vector" else None)
            self._table[key] = node
        return node

    # -- constructors, one per op ----------------------------------------------

    def const(self, value: float) -> Node:
        value = float(value)
        if value == 0.0:
            value = 0.0  # one zero: -0.0 and 0.0 intern together
        return self.make("const", (), value, kind="scalar")

    def source(self, key: str, kind: str) -> Node:
        return self.make("source", (), (key, kind), weight=1.0 if kind == "model" else 0.0)

    def zero(self) -> Node:
        """The zero task vector (what a fully cancelled combination leaves)."""
        return self.make("zero", (), None, weight=0.0)

    def lin(self, vectors: tuple[Node, ...], coefs: tuple[Node, ...], weight: float | None = None) -> Node:
        """sum(coefs[i] * vectors[i]); coefficients are scalar nodes.

        ``weight`` is the affine weight when a rewrite already knows it (a
        coefficient known only at run time multiplies a combination whose
        weight the checker proved); otherwise it is computed from constants.
        """
        if weight is None:
            weight = 0.0
            for vec, coef in zip(vectors, coefs):
                weight += (const_value(coef) if coef.op == "const" else 0.0) * (vec.weight or 0.0)
        return self.make("lin", tuple(vectors), _Coefs(coefs), weight=weight)

    def call(self, name: str, args: tuple[Node, ...], options: tuple[tuple[str, object], ...], weight: float) -> Node:
        return self.make("call", args, (name, options), weight=weight)

    def reduce(self, name: str, args: tuple[Node, ...], options: tuple = ()) -> Node:
        return self.make("reduce", args, (name, options), kind="scalar")

    def binary(self, op: str, left: Node, right: Node) -> Node:
        """Unlinearized arithmetic (what the AST says, before the linearize pass)."""
        if left.kind == "scalar" and right.kind == "scalar":
            return self.make(op, (left, right), None, kind="scalar")
        lw, rw = left.weight, right.weight
        if op == "add":
            weight = lw + rw
        elif op == "sub":
            weight = lw - rw
        elif op == "mul":  # (scalar, vector)
            scale = const_value(left) if left.op == "const" else 0.0
            weight = scale * rw
        else:  # div: (vector, scalar)
            scale = const_value(right) if right.op == "const" else 1.0
            weight = lw / scale if scale else 0.0
        return self.make(op, (left, right), None, weight=weight)

    def neg(self, operand: Node) -> Node:
        if operand.kind == "scalar":
            return self.make("neg", (operand,), None, kind="scalar")
        return self.make("neg", (operand,), None, weight=-(operand.weight or 0.0))


class _Coefs(tuple):
    """Coefficient nodes of a ``lin``; hashed by identity of the (interned) nodes."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(id(c) for c in self))

    def __eq__(self, other: object) -> bool:  # type: ignore[override]
        return isinstance(other, tuple) and len(self) == len(other) and all(a is b for a, b in zip(self, other))


def const_value(node: Node) -> float:
    assert node.op == "const", node
    return node.attr  # type: ignore[return-value]


def postorder(roots: tuple[Node, ...] | list[Node]) -> list[Node]:
    """Every node reachable from ``roots``, children before parents, each once."""
    seen: set[int] = set()
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(list(roots))]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        children = list(node.args)
        if node.op == "lin":
            children = list(node.attr) + children  # coefficient nodes
        for child in reversed(children):
            if id(child) not in seen:
                stack.append((child, False))
    return order


@dataclass
class IRProgram:
    """Outputs as IR roots, plus where every source comes from."""

    outputs: list[tuple[str, Node]]
    sources: dict[str, SourceSpec]
    interner: Interner

    def roots(self) -> tuple[Node, ...]:
        return tuple(node for _, node in self.outputs)

    def as_node(self) -> Node:
        """The whole program as one ``program`` node (what optimizer passes take)."""
        names = tuple(name for name, _ in self.outputs)
        return self.interner.make("program", self.roots(), names, kind="program")

    def with_root(self, program: Node) -> "IRProgram":
        return IRProgram(list(zip(program.attr, program.args)), self.sources, self.interner)


# -- AST -> IR ---------------------------------------------------------------------


def build(checked, interner: Interner | None = None) -> IRProgram:
    """Turn a :class:`tvlang.language.checker.CheckedProgram` into IR (params become constants)."""
    builder = _Builder(checked, interner or Interner())
    outputs = [(out.name, trampoline(builder.expr(out.expr))) for out in checked.outputs]
    return IRProgram(outputs, builder.sources, builder.interner)


class _Builder:
    """AST -> IR. ``expr``, ``name`` and ``call`` are frames (see trampoline): a chain of
    100,000 definitions, each naming the one before, is built without recursion, and
    nodes are made in the order a recursive builder would make them."""

    def __init__(self, checked, interner: Interner) -> None:
        self.checked = checked
        self.interner = interner
        self.sources: dict[str, SourceSpec] = {}
        self.memo: dict[str, Node] = {}
        base = Path(checked.filename).parent if checked.filename else Path(".")
        self.base_dir = base

    def error(self, message: str, span: Span | None) -> TvlangError:
        return TvlangError(message, span, source=self.checked.source, filename=self.checked.filename)

    def name(self, node: ast.Name) -> Frame:
        ident = node.id
        if ident in self.memo:
            return self.memo[ident]
        if ident in self.checked.params:
            result = self.interner.const(self.checked.params[ident])
        elif ident in self.checked.env:
            value = self.checked.env[ident]
            if isinstance(value, ast.Call) and is_source_call(value):
                result = self.load(value, key=ident)
            else:
                result = yield self.expr(value)
        elif ident in self.checked.sources:
            kind = self.checked.sources[ident]
            self.sources.setdefault(ident, SourceSpec(ident, kind, None, node.span))
            result = self.interner.source(ident, kind)
        else:  # the checker rejects this first
            raise self.error(f"unknown name '{ident}'", node.span)
        self.memo[ident] = result
        return result

    def load(self, call: ast.Call, key: str | None = None) -> Node:
        # An inline load is named by its own text, which explain prints as is
        # (and which parses back to the same load).
        key = key or _source_key(call)
        if key not in self.sources:
            self.sources[key] = self.stack_spec(call, key) if call.func == "stack" else self.load_spec(call, key)
        return self.interner.source(key, self.sources[key].kind)

    def load_spec(self, call: ast.Call, key: str) -> SourceSpec:
        from tvlang.language.checker import bind_call

        bound = bind_call(call)
        path_node = bound.args["path"]
        assert isinstance(path_node, ast.String)
        path = path_node.value
        # A Hub reference (hf:org/name@rev, resolved by tvlang.io.hub) is not a path.
        resolved = path if path.startswith("hf:") else str(path if Path(path).is_absolute() else self.base_dir / path)
        kind = BUILTINS[call.func].result  # load: "model"; load_delta, lora: "delta"
        span = bound.args.get("layers")
        layers = None if span is None or span is REQUIRED else self.constant(span)
        if layers is not None:
            if (len(layers) != 2 or not all(float(v).is_integer() for v in layers)
                    or not 0 <= layers[0] < layers[1]):
                raise self.error(f"layers is [START, END], whole numbers with 0 <= START < END; got "
                                 f"{to_text(span)}", span.span)
            layers = (int(layers[0]), int(layers[1]))
        renames = {}
        for option in ("strip_prefix", "add_prefix"):
            node = bound.args.get(option)
            if node is None or node is REQUIRED:
                continue
            if not isinstance(node, ast.String) or not node.value:
                raise self.error(f"{option} is a non-empty string of the prefix, such as \"bert.\"", node.span)
            renames[option] = node.value
        return SourceSpec(key, kind, resolved, call.span, call.func, layers, **renames)

    def stack_spec(self, call: ast.Call, key: str) -> SourceSpec:
        """``stack(p1, p2, ...)``: each part a ``load(...)`` call or a name bound to one."""
        if call.kwargs:
            raise self.error("stack takes its parts only: load(PATH, layers=[START, END]) calls",
                             call.kwargs[0].span)
        parts = []
        for arg in call.args:
            value = self.checked.env.get(arg.id) if isinstance(arg, ast.Name) else arg
            if not (isinstance(value, ast.Call) and value.func == "load"):
                raise TvlangError("a part of stack is a load(PATH, layers=[START, END]) call, or a name bound "
                                  "to one", arg.span, source=self.checked.source, filename=self.checked.filename,
                                  notes=("stack reads layers of checkpoints; to merge, merge stacks of the same "
                                         "layers: slerp(stack(...), stack(...), t=0.5)",))
            part = self.load_spec(value, _source_key(value))
            if part.strip_prefix or part.add_prefix:  # the stack's layers are renumbered by their names
                raise self.error("a part of stack cannot rename its tensors (strip_prefix, add_prefix)", value.span)
            parts.append(part)
        return SourceSpec(key, "model", parts[0].path, call.span, "stack", None, tuple(parts))

    def expr(self, node: ast.Expr) -> Frame:
        it = self.interner
        if isinstance(node, ast.Number):
            return it.const(node.value)
        if isinstance(node, ast.Name):
            return (yield from self.name(node))
        if isinstance(node, ast.Neg):
            return it.neg((yield self.expr(node.operand)))
        if isinstance(node, ast.BinOp):
            left = yield self.expr(node.left)
            right = yield self.expr(node.right)
            op = {"+": "add", "-": "sub", "*": "mul", "/": "div"}[node.op]
            if op == "mul" and left.kind == "vector":
                left, right = right, left  # scalar first
            return it.binary(op, left, right)
        if isinstance(node, ast.Call):
            return (yield from self.call(node))
        raise self.error("a string, boolean or list is only allowed as a built-in argument", node.span)

    def call(self, node: ast.Call) -> Frame:
        from tvlang.language.checker import bind_call

        if is_source_call(node):
            return self.load(node)
        bound = bind_call(node)
        row = bound.builtin
        vectors: list[Node] = []
        options: list[tuple[str, object]] = []
        for param in row.params:
            value = bound.args.get(param.name)
            if param.kind in ("model", "delta", "vector"):
                vectors.append((yield self.expr(value)))
            elif value is not None:
                options.append((param.name, self.constant(value)))
        for extra in bound.varargs:
            vectors.append((yield self.expr(extra)))
        for option in row.options:
            value = bound.args.get(option.name)
            if value is not None:
                options.append((option.name, self.constant(value)))
        options.sort()
        self.validate(row, options, len(vectors), node)
        if row.stage == "reduce":
            return self.interner.reduce(row.name, tuple(vectors), tuple(options))
        if row.result == "model":
            weight = 1.0
        elif row.result == "delta":
            weight = 0.0
        else:
            weight = vectors[0].weight if vectors else 0.0
        return self.interner.call(row.name, tuple(vectors), tuple(options), weight)

    def validate(self, row: Builtin, options: list[tuple[str, object]], n_inputs: int, node: ast.Call) -> None:
        """Constant options a kernel would reject, reported at the call before any tensor is read."""
        try:
            filled = row.check_options(dict(options), n_inputs)
        except TvlangError as exc:
            raise self.error(exc.message, node.span) from None
        varying = sorted(name for name, value in options
                         if isinstance(value, PerTensor) or (isinstance(value, tuple)
                                                             and any(isinstance(v, PerTensor) for v in value)))
        plain = {name: representative(value) for name, value in filled.items()}
        if varying and row.reductions is not None and row.reductions(plain, n_inputs):
            raise self.error(f"{row.name}: option '{varying[0]}' varies per tensor, which whole-model thresholds "
                             "(scope=\"model\") cannot use", node.span)

    def constant(self, node: ast.Expr) -> object:
        """A compile-time constant option value (the checker has vetted its kind)."""
        if node is REQUIRED:
            return None
        if not isinstance(node, ast.Node):  # a Python default from the table
            return tuple(node) if isinstance(node, list) else node
        if isinstance(node, ast.String):
            return node.value
        if isinstance(node, ast.Bool):
            return node.value
        if isinstance(node, ast.ListExpr):
            return tuple(self.constant(item) for item in node.items)
        if isinstance(node, ast.Call) and node.func in PER_TENSOR:  # layers(...), where(...): checked
            if node.func == "layers":
                return Layers(tuple(float(self.constant(item)) for item in node.args))  # type: ignore[arg-type]
            pattern, then, otherwise = node.args
            return Where(pattern.value, self.constant(then), self.constant(otherwise))  # type: ignore[union-attr]
        number = constants.value(node, self.checked.params, self.checked.env)
        if number is None:
            raise self.error("this option must be a number known before any tensor is read", node.span)
        return number


def is_source_call(call: ast.Call) -> bool:
    """Whether ``call`` reads a checkpoint (a ``"source"`` row: load, load_delta, lora)."""
    row = BUILTINS.get(call.func)
    return row is not None and row.stage == "source"


def _source_key(call: ast.Call) -> str:
    """An inline source's key: its own text (``load("a")``, ``stack(load("a", layers=[0, 2]))``)."""
    if call.func != "stack" and not call.kwargs and len(call.args) == 1 and isinstance(call.args[0], ast.String):
        return f'{call.func}("{_escaped(call.args[0].value)}")'
    return to_text(call)


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def iter_vectors(node: Node) -> Iterator[Node]:
    return (a for a in node.args if a.kind == "vector")
