"""The names a REPL session knows, and the recipes made from them.

A :class:`Workspace` holds the checkpoints bound to names and the accepted
definitions (``x = expr``, ``param p = 1``). Every input is checked or compiled
as one recipe text: the definitions it needs, in dependency order, then its own
line. So the parser, the checker and the planner do all the work, and what the
REPL accepts is exactly what a recipe file would accept. Errors in that text
point back at what the user typed (:func:`remap`).

>>> space = Workspace()
>>> space.set_param("lam", 0.5)
>>> text = "x = 2*lam"
>>> space.define(parse(text).statements[0], text, text)
>>> space.kinds_of_definitions()
{'lam': 'scalar', 'x': 'scalar'}
>>> print(space.recipe(space.entries, ["x"], [("out = ", "x + 1", 0, "x + 1")])[0], end="")
param lam = 0.5
x = 2*lam
out = x + 1
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from tvlang.errors import Span, TvlangError
from tvlang.faces.commands.args import LORA_PREFIX, split_binding
from tvlang.language import ast
from tvlang.language.checker import CheckedProgram, check
from tvlang.language.printer import to_text
from tvlang.language.syntax import parse, parse_expression
from tvlang.plan.compiler import Plan, compile
from tvlang.plan.ir import is_source_call
from tvlang.plan.records import DeltaBinding, delta

__all__ = ["FILENAME", "VALUE", "Compiled", "Entry", "Piece", "Workspace", "check_loads", "loads", "names",
           "parse_expr", "remap", "statement_text"]

FILENAME = "<repl>"
VALUE = "out"  # the output the REPL compiles an expression as: `out = EXPR`


@dataclass
class Entry:
    """One accepted definition: its statement, the text it came from, where from."""

    name: str
    stmt: ast.Stmt  # ast.Assign or ast.Param
    text: str  # the statement's own text (what the user typed, or printed canonically)
    origin: str  # "<repl>" or the recipe file it was loaded from
    deps: list[str] = field(default_factory=list)


@dataclass
class Piece:
    """Where a statement's text sits in a combined recipe, to map error spans back."""

    start: int
    end: int
    source: str  # the text errors should show
    offset: int  # where the piece starts in ``source``
    filename: str


@dataclass
class Compiled:
    """The plan of ``out = EXPR`` with the definitions it needs, and where its text came from."""

    plan: Plan
    pieces: list[Piece]

    @contextlib.contextmanager
    def spans(self) -> Iterator[None]:
        """Errors raised inside (binding, reading, computing) point at what the user typed."""
        try:
            yield
        except TvlangError as exc:
            raise remap(exc, self.pieces) from None


class Workspace:
    """The checkpoints bound to names and the definitions of one REPL session."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}  # insertion order = definition order
        self.bindings: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}  # bound name -> "model" | "delta"

    # -- bindings -------------------------------------------------------------------

    def bind(self, name: str, value: Any) -> None:
        """Bind ``name`` to a checkpoint: a path, ``delta:PATH``, ``lora:DIR`` (a PEFT adapter), a state
        dict, or ``tvlang.delta(x)``."""
        from tvlang.io import open_reader  # imports torch

        if not name.isidentifier():
            raise TvlangError(f"cannot bind '{name}': not a name")
        if name in self.entries:
            raise TvlangError(f"cannot bind '{name}': it is defined in this session (:vars)")
        if isinstance(value, str) and value.startswith(LORA_PREFIX):  # lora:DIR (or lora:hf:...), as --bind takes it
            from tvlang.run.adapters import open_adapter  # imports torch

            open_adapter(value[len(LORA_PREFIX):]).close()  # a clear error now if it is not an adapter
            self.bindings[name] = value  # the run layer reads "lora:DIR"
            self.kinds[name] = "delta"
            return
        marked = isinstance(value, DeltaBinding)
        if isinstance(value, str):  # PATH or delta:PATH, as --bind takes it
            kind, value = split_binding(value)
            marked = kind == "delta"
        raw = value.value if isinstance(value, DeltaBinding) else value
        reader = open_reader(raw, label=raw if isinstance(raw, str) else None)
        try:
            kind = "delta" if marked or reader.kind == "delta" else "model"
        finally:
            reader.close()
        self.bindings[name] = delta(raw) if marked else raw
        self.kinds[name] = kind

    # -- definitions ----------------------------------------------------------------

    def define(self, stmt: ast.Stmt, source: str, own_text: str | None, origin: str = FILENAME) -> None:
        """Add (or replace) a definition, once every definition checks with it."""
        if isinstance(stmt, ast.Out):  # `out name = e` defines name
            stmt = ast.Assign(stmt.name, stmt.value, span=stmt.span)
        name = stmt.name
        if name in self.kinds:
            raise TvlangError(f"'{name}' is bound to a checkpoint (:sources); choose another name", stmt.span,
                              source=source, filename=origin)
        entry = Entry(name, stmt, own_text if own_text is not None else statement_text(stmt), origin,
                      names(stmt) if isinstance(stmt, ast.Assign) else [])
        if own_text is not None and stmt.span is not None:
            where = (source, stmt.span.start)
        else:
            where = (entry.text, 0)
        entries = {k: v for k, v in self.entries.items() if k != name}
        entries[name] = entry
        self.order(entries, [name])  # a cycle through the new definition, named from it
        self.check(entries, {name: where})
        check_loads(stmt, source, origin)
        self.entries = entries

    def set_param(self, name: str, value: float) -> None:
        """Define (or redefine) ``param name = value``."""
        stmt = ast.Param(name, float(value))
        self.define(stmt, statement_text(stmt), None)

    def load(self, path: str, text: str) -> tuple[list[str], int]:
        """Add a recipe's params and definitions (named outs become definitions, load()
        paths are made relative to the recipe's directory); the names defined and the
        number of unnamed outs skipped."""
        program = parse(text, path)
        directory = os.path.dirname(path)
        defined: list[str] = []
        skipped = 0
        for stmt in program.statements:
            if isinstance(stmt, ast.Out) and stmt.name is None:
                skipped += 1
                continue
            if isinstance(stmt, (ast.Assign, ast.Out)):
                stmt = replace(stmt, value=_rebase_loads(stmt.value, directory))
            self.define(stmt, text, None if directory else text[stmt.span.start:stmt.span.end], origin=path)
            defined.append(stmt.name)
        return defined, skipped

    def kinds_of_definitions(self) -> dict[str, str]:
        """``"scalar"``, ``"model"`` or ``"delta"`` for every definition (params are scalars)."""
        return self.check(self.entries, {}).kinds if self.entries else {}

    # -- recipes --------------------------------------------------------------------

    def check(self, entries: dict[str, Entry], overrides: dict[str, tuple[str, int]],
              tail: Sequence[tuple[str, str, int, str]] = ()) -> CheckedProgram:
        """Check every definition together, then ``tail``; errors point at what the user typed."""
        text, pieces = self.recipe(entries, list(entries), list(tail), overrides)
        try:
            return check(parse(text, FILENAME), source=text, filename=FILENAME, sources=dict(self.kinds),
                         require_output=False, scalar_outputs=True)
        except TvlangError as exc:
            raise remap(exc, pieces) from None

    def compile(self, expr: ast.Expr, source: str) -> Compiled:
        """The plan of ``out = EXPR`` (``expr`` as it sits in ``source``), with the definitions it needs.

        The expression is first checked after every definition, so that an unknown
        name gets a "did you mean" from all of them.
        """
        start = expr.span.start if expr.span else 0
        end = expr.span.end if expr.span else len(source)
        tail = [("out = ", source, start, source[start:end])]
        self.check(self.entries, {}, tail)
        check_loads(expr, source)
        text, pieces = self.recipe(self.entries, names(expr), tail)
        try:
            return Compiled(compile(text, filename=FILENAME, sources=dict(self.kinds)), pieces)
        except TvlangError as exc:
            raise remap(exc, pieces) from None

    def order(self, entries: dict[str, Entry], roots: list[str]) -> list[Entry]:
        """The entries ``roots`` need, dependencies first (definition order otherwise)."""
        ordered: list[Entry] = []
        state: dict[str, int] = {}  # 1 visiting, 2 done

        def visit(name: str, path: list[str]) -> None:
            entry = entries.get(name)
            if entry is None or state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(path[path.index(name):] + [name])
                raise TvlangError(f"'{name}' would depend on itself: {cycle}",
                                  notes=("note: redefine one of these names without the other",))
            state[name] = 1
            for dep in entry.deps:
                if dep != name:
                    visit(dep, path + [name])
            state[name] = 2
            ordered.append(entry)

        position = {name: index for index, name in enumerate(entries)}
        for root in sorted((r for r in roots if r in position), key=position.__getitem__):
            visit(root, [])  # definition order, except where a redefinition needs otherwise
        return ordered

    def recipe(self, entries: dict[str, Entry], needed: list[str], tail: list[tuple[str, str, int, str]],
               overrides: dict[str, tuple[str, int]] | None = None) -> tuple[str, list[Piece]]:
        """Text of ``entries`` that ``needed`` uses, then ``tail`` lines ``(prefix, source, offset, text)``;
        ``overrides`` gives, by name, the ``(source, offset)`` an entry's errors should show."""
        overrides = overrides or {}
        parts: list[str] = []
        pieces: list[Piece] = []
        position = 0
        for entry in self.order(entries, needed):
            source, offset = overrides.get(entry.name, (entry.text, 0))
            pieces.append(Piece(position, position + len(entry.text), source, offset, entry.origin))
            parts.append(entry.text + "\n")
            position += len(entry.text) + 1
        for prefix, source, offset, text in tail:
            start = position + len(prefix)
            pieces.append(Piece(start, start + len(text), source, offset, FILENAME))
            parts.append(prefix + text + "\n")
            position += len(prefix) + len(text) + 1
        return "".join(parts), pieces


def remap(exc: TvlangError, pieces: list[Piece]) -> TvlangError:
    """``exc`` with its spans pointing at the statements the user wrote, not the combined recipe."""
    moved = []
    for err in exc.errors:
        span, source, filename = err.span, err.source, err.filename
        for piece in pieces if span is not None else ():
            if piece.start <= span.start <= piece.end:
                start = span.start - piece.start + piece.offset
                end = min(span.end, piece.end) - piece.start + piece.offset
                span, source, filename = Span.of(piece.source, start, end), piece.source, piece.filename
                break
        moved.append(TvlangError(err.message, span, source=source, filename=filename, tensor=err.tensor,
                                 notes=err.notes))
    if len(moved) == 1:
        return moved[0]
    first = moved[0]
    return TvlangError(first.message, first.span, source=first.source, filename=first.filename, errors=moved)


def check_loads(node: ast.Node, source: str, filename: str = FILENAME) -> None:
    """A load() of a missing or unreadable file, reported at its call before anything runs."""
    from tvlang.io import open_reader  # imports torch

    for call in loads(node):
        path_node = call.args[0] if call.args else next((k.value for k in call.kwargs if k.name == "path"), None)
        if isinstance(path_node, ast.String):
            try:
                open_reader(path_node.value).close()
            except TvlangError as exc:
                raise TvlangError(exc.message, call.span, source=source, filename=filename,
                                  notes=exc.notes) from None


def names(node: ast.Node) -> list[str]:
    """Names an expression or statement uses, in order, each once."""
    seen: list[str] = []
    for item in ast.walk(node):
        if isinstance(item, ast.Name) and item.id not in seen:
            seen.append(item.id)
    return seen


def statement_text(stmt: ast.Stmt) -> str:
    return to_text(ast.Program((stmt,))).strip()


def parse_expr(text: str) -> ast.Expr:
    return parse_expression(text, FILENAME)


def loads(node: ast.Node) -> list[ast.Call]:
    """The ``load()``/``load_delta()``/``lora()`` calls in ``node`` (the source built-ins)."""
    return [c for c in ast.walk(node) if isinstance(c, ast.Call) and is_source_call(c)]


def _rebase_loads(node: ast.Expr, directory: str) -> ast.Expr:
    """``load("x")`` -> ``load("<directory>/x")`` for relative paths (a recipe's own base)."""
    if not directory:
        return node
    if isinstance(node, ast.Call):
        args = tuple(_rebase_loads(a, directory) for a in node.args)
        kwargs = tuple(replace(k, value=_rebase_loads(k.value, directory)) for k in node.kwargs)
        if is_source_call(node):
            args = tuple(_rebase_path(a, directory) for a in args)
            kwargs = tuple(replace(k, value=_rebase_path(k.value, directory)) if k.name == "path" else k
                           for k in kwargs)
        return replace(node, args=args, kwargs=kwargs)
    if isinstance(node, ast.BinOp):
        return replace(node, left=_rebase_loads(node.left, directory), right=_rebase_loads(node.right, directory))
    if isinstance(node, ast.Neg):
        return replace(node, operand=_rebase_loads(node.operand, directory))
    if isinstance(node, ast.ListExpr):
        return replace(node, items=tuple(_rebase_loads(i, directory) for i in node.items))
    return node


def _rebase_path(node: ast.Expr, directory: str) -> ast.Expr:
    if isinstance(node, ast.String) and not os.path.isabs(node.value):
        return replace(node, value=os.path.normpath(os.path.join(directory, node.value)))
    return node
