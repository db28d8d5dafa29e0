"""The tvlang REPL: recipes typed one line at a time.

The REPL keeps a list of accepted statements (definitions and params). Each
new line is compiled together with the definitions it needs as one recipe
text, so the parser, the checker and the printer do all the work: what the
REPL accepts is exactly what a recipe file would accept.

- ``name = expr`` and ``param name = number`` define (or redefine) a name;
  they print nothing.
- An expression prints a summary of its value: its kind, the sources it
  reads, the number of tensors and parameters and the dtype (from the file
  headers, no tensor is read), and for a scalar (``norm(a - pre)``) its value,
  computed by streaming over the inputs.
- ``:explain EXPR``, ``:save EXPR to PATH``, ``:sources``, ``:vars``,
  ``:bind NAME=PATH``, ``:load RECIPE``, ``:help``, ``:quit``.

>>> import io
>>> out, err = io.StringIO(), io.StringIO()
>>> repl = Repl(stdout=out, stderr=err)
>>> repl.feed("param lam = 0.5")
True
>>> repl.feed("lam*2 + 1")
True
>>> out.getvalue()
'Scalar: 2\\n'
>>> repl.feed("lam2 + 1")
True
>>> print(err.getvalue().strip())
<repl>:1:1: error: unknown name 'lam2'; did you mean 'lam'?
  lam2 + 1
  ^^^^
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, TextIO

from tvlang.language import ast
from tvlang.errors import Span, TvlangError

__all__ = ["Repl", "COMMANDS", "HISTORY_ENV", "history_path", "open_parens", "interact"]

HISTORY_ENV = "TVLANG_HISTORY"
HISTORY_LENGTH = 2000
PROMPT = "tv> "
CONTINUATION = "... "
FILENAME = "<repl>"

# Output names the REPL gives the values it computes; user names never clash
# with them in practice (they are not reserved, just unusual).
_VALUE = "out"  # the value shown is the bare `out` of the compiled recipe
_ARG = "_arg{}"
_KIND = "repl_kind_{}__"
_SCALAR = "repl_scalar__"
# The checker wants every recipe to have an output; the REPL checks scalars as
# definitions and adds this one, which is never compiled or run.
_DUMMY_OUT = 'out repl_placeholder__ = load("placeholder")\n'


COMMANDS = {  # command -> (usage, what it does)
    ":explain": (":explain EXPR", "the optimized expression and its per-tensor plan"),
    ":save": (":save EXPR to PATH", "compute EXPR and write it: PATH ending .safetensors is one file, "
              "any other a model directory; add --force to replace an existing PATH"),
    ":sources": (":sources", "the checkpoints bound or loaded, with kinds and sizes"),
    ":vars": (":vars", "every definition and param, with its kind"),
    ":bind": (":bind NAME=PATH", "bind a name to a checkpoint (NAME=delta:PATH for a task vector)"),
    ":load": (":load RECIPE", "add a recipe's params and definitions (its named outs become definitions)"),
    ":help": (":help", "this help"),
    ":quit": (":quit", "leave (Ctrl-D works too)"),
}


def _command_help() -> str:
    import textwrap

    lines = []
    for usage, what in COMMANDS.values():
        wrapped = textwrap.wrap(what, 56) or [""]
        lines.append(f"  {usage.ljust(20)} {wrapped[0]}")
        lines.extend(" " * 23 + rest for rest in wrapped[1:])
    return "\n".join(lines)


HELP = """\
Type statements and expressions in the recipe language:
  pre = load("checkpoints/t5-base")      define a name (paths relative to the current directory)
  param lam = 0.4                        define a param
  pre + lam*(ft - pre)                   show a summary of a value: kind, sources, tensors, dtype
  cos(a - pre, b - pre)                  a scalar is computed (streaming over the inputs)
Commands:
""" + _command_help() + """
Redefining a name replaces it; definitions that use it follow the new value.
Tab completes names, built-ins, keyword arguments, commands and paths (in
strings, after :load and :bind NAME=); input continues while a parenthesis or
bracket is open."""


def history_path() -> str:
    """Where history is kept: ``$TVLANG_HISTORY``, else ``~/.tvlang_history``."""
    return os.environ.get(HISTORY_ENV) or os.path.join(os.path.expanduser("~"), ".tvlang_history")


def open_parens(text: str) -> int:
    """How many ``(`` and ``[`` are still open (strings and comments ignored).

    >>> open_parens('ties(a, b,'), open_parens('f("(", [1, 2])  # (')
    (1, 0)
    """
    depth = 0
    quote: str | None = None
    escaped = False
    comment = False
    for char in text:
        if comment:
            comment = char != "\n"
        elif quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote or char == "\n":
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            comment = True
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
    return max(depth, 0)


# -- AST helpers --------------------------------------------------------------------------


def _walk(node: ast.Node) -> Iterable[ast.Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, ast.BinOp):
            stack.extend((current.right, current.left))
        elif isinstance(current, ast.Neg):
            stack.append(current.operand)
        elif isinstance(current, ast.Call):
            stack.extend(reversed([k.value for k in current.kwargs]))
            stack.extend(reversed(current.args))
        elif isinstance(current, ast.ListExpr):
            stack.extend(reversed(current.items))
        elif isinstance(current, (ast.Assign, ast.Out)):
            stack.append(current.value)


def _names(node: ast.Node) -> list[str]:
    """Names an expression or statement uses, in order, each once."""
    seen: list[str] = []
    for item in _walk(node):
        if isinstance(item, ast.Name) and item.id not in seen:
            seen.append(item.id)
    return seen


def _loads(node: ast.Node) -> list[ast.Call]:
    return [c for c in _walk(node) if isinstance(c, ast.Call) and c.func in ("load", "load_delta")]


def _rebase_loads(node: ast.Expr, directory: str) -> ast.Expr:
    """``load("x")`` -> ``load("<directory>/x")`` for relative paths (a recipe's own base)."""
    if not directory:
        return node
    if isinstance(node, ast.Call):
        args = tuple(_rebase_loads(a, directory) for a in node.args)
        kwargs = tuple(replace(k, value=_rebase_loads(k.value, directory)) for k in node.kwargs)
        if node.func in ("load", "load_delta"):
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


def _builtins():
    from tvlang.language.checker import load_builtins
    from tvlang.language.builtins import BUILTINS

    load_builtins()
    return BUILTINS


# -- the session -------------------------------------------------------------------------


@dataclass
class Entry:
    """One accepted definition: its statement, the text it came from, where from."""

    name: str
    stmt: ast.Stmt  # ast.Assign or ast.Param
    text: str  # the statement's own text (what the user typed, or printed canonically)
    origin: str  # "<repl>" or the recipe file it was loaded from
    deps: list[str] = field(default_factory=list)


@dataclass
class _Piece:
    """Where a statement's text sits in a compiled recipe, to map error spans back."""

    start: int
    end: int
    source: str  # the text errors should show
    offset: int  # where the piece starts in ``source``
    filename: str


class Repl:
    """One REPL session. ``feed(text)`` handles one complete input; False means quit."""

    def __init__(self, bindings: dict[str, Any] | None = None, *, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, device: str = "cpu", dtype: str = "float32",
                 color: bool = False) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.device = device
        self.dtype = dtype
        self.color = color  # colour recipe text (:explain, :vars) with tvlang.faces.highlight
        self.entries: dict[str, Entry] = {}  # insertion order = definition order
        self.bindings: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}  # bound name -> "model" | "delta"
        self.errors = 0
        for name, value in (bindings or {}).items():
            self.bind(name, value)

    # -- output ------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.stdout)
        self.stdout.flush()

    def say_recipe(self, text: str) -> None:
        """Print recipe text, coloured when ``self.color``."""
        if self.color:
            from tvlang.faces.highlight import highlight

            text = highlight(text)
        self.say(text)

    def report(self, exc: TvlangError) -> None:
        self.errors += 1
        print(exc.render(), file=self.stderr)
        self.stderr.flush()

    # -- bindings ----------------------------------------------------------------------

    def bind(self, name: str, value: Any) -> None:
        """Bind ``name`` to a checkpoint (a path, ``delta:PATH``, a state dict, or ``tvlang.delta(x)``)."""
        from tvlang.plan.compiler import DeltaBinding, delta
        from tvlang.io import open_reader

        if not name.isidentifier():
            raise TvlangError(f"cannot bind '{name}': not a name")
        if name in self.entries:
            raise TvlangError(f"cannot bind '{name}': it is defined in this session (:vars)")
        marked = isinstance(value, DeltaBinding)
        if isinstance(value, str) and value.startswith("delta:"):
            value, marked = value[len("delta:"):], True
        raw = value.value if isinstance(value, DeltaBinding) else value
        reader = open_reader(raw, label=raw if isinstance(raw, str) else None)
        try:
            kind = "delta" if marked or reader.kind == "delta" else "model"
        finally:
            reader.close()
        self.bindings[name] = delta(raw) if marked else raw
        self.kinds[name] = kind

    # -- input -------------------------------------------------------------------------

    def feed(self, text: str) -> bool:
        """Handle one complete input (a statement, an expression or a command)."""
        stripped = text.strip()
        if not stripped:
            return True
        try:
            if stripped.startswith(":"):
                return self.command(stripped)
            self.statement_or_expression(text)
        except TvlangError as exc:
            self.report(exc)
        except KeyboardInterrupt:
            print("interrupted", file=self.stderr)
        except Exception as exc:  # a bug: say so, and keep the session
            self.errors += 1
            print(f"internal error (a bug in tvlang, please report it): {type(exc).__name__}: {exc}",
                  file=self.stderr)
        return True

    def command(self, line: str) -> bool:
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        matches = [c for c in COMMANDS if c.startswith(word)] if word != ":" else []
        if word in COMMANDS:
            matches = [word]
        if len(matches) != 1:
            choices = ", ".join(COMMANDS)
            what = "ambiguous" if matches else "unknown"
            raise TvlangError(f"{what} command '{word}'; the commands are {choices}")
        name = matches[0]
        if name == ":quit":
            return False
        if name == ":help":
            self.say(HELP)
        elif name == ":vars":
            self.show_vars()
        elif name == ":sources":
            self.show_sources()
        elif name == ":explain":
            self.explain(self._need(rest, ":explain EXPR"))
        elif name == ":save":
            rest = self._need(rest, ":save EXPR to PATH [--force]")
            force = rest.endswith(" --force")
            if force:
                rest = rest[: -len(" --force")]
            expr, sep, path = rest.rpartition(" to ")
            if not sep or not expr.strip() or not path.strip():
                raise TvlangError("usage: :save EXPR to PATH [--force]")
            self.save(expr, path.strip().strip("\"'"), force=force)
        elif name == ":bind":
            target, sep, value = self._need(rest, ":bind NAME=PATH").partition("=")
            if not sep or not value.strip():
                raise TvlangError("usage: :bind NAME=PATH (or NAME=delta:PATH)")
            self.bind(target.strip(), value.strip())
        elif name == ":load":
            self.load_recipe(self._need(rest, ":load RECIPE").strip("\"'"))
        return True

    @staticmethod
    def _error(message: str, node: ast.Node, source: str, filename: str = FILENAME) -> TvlangError:
        return TvlangError(message, node.span, source=source, filename=filename)

    @staticmethod
    def _need(rest: str, usage: str) -> str:
        if not rest:
            raise TvlangError(f"usage: {usage}")
        return rest

    def statement_or_expression(self, text: str) -> None:
        from tvlang.language.syntax import parse, parse_expression

        try:
            program = parse(text, FILENAME)
        except TvlangError as program_error:
            try:
                expr = parse_expression(text, FILENAME)
            except TvlangError as expr_error:
                raise (program_error if _looks_like_statement(text) else expr_error) from None
            self.show(expr, text)
            return
        for stmt in program.statements:
            if isinstance(stmt, ast.Out) and stmt.name is None:
                self.show(stmt.value, text)
            else:
                self.define(stmt, text, text[stmt.span.start:stmt.span.end] if stmt.span else None)

    # -- definitions -----------------------------------------------------------------------

    def define(self, stmt: ast.Stmt, source: str, own_text: str | None, origin: str = FILENAME) -> None:
        if isinstance(stmt, ast.Out):  # `out name = e` defines name
            stmt = ast.Assign(stmt.name, stmt.value, span=stmt.span)
        name = stmt.name
        if name in self.kinds:
            raise self._error(f"'{name}' is bound to a checkpoint (:sources); choose another name", stmt, source,
                              origin)
        entry = Entry(name, stmt, own_text if own_text is not None else _stmt_text(stmt), origin,
                      _names(stmt) if isinstance(stmt, ast.Assign) else [])
        if own_text is not None and stmt.span is not None:
            entry_piece = (source, stmt.span.start)
        else:
            entry_piece = (entry.text, 0)
        entries = {k: v for k, v in self.entries.items() if k != name}
        entries[name] = entry
        self._order(entries, [name])  # a cycle through the new definition, named from it
        self._check_all(entries, {name: entry_piece})
        self._check_loads(stmt, source, origin)
        self.entries = entries

    def set_param(self, name: str, value: float) -> None:
        """Define (or redefine) ``param name = value``."""
        self.define(ast.Param(name, float(value)), f"param {name} = {_number(value)}", None)

    @staticmethod
    def _check_loads(node: ast.Node, source: str, filename: str = FILENAME) -> None:
        """A load() of a missing or unreadable file, reported at its call before anything runs."""
        from tvlang.io import open_reader

        for call in _loads(node):
            path_node = call.args[0] if call.args else next((k.value for k in call.kwargs if k.name == "path"), None)
            if isinstance(path_node, ast.String):
                try:
                    open_reader(path_node.value).close()
                except TvlangError as exc:
                    raise TvlangError(exc.message, call.span, source=source, filename=filename,
                                      notes=exc.notes) from None

    def load_recipe(self, path: str) -> None:
        """Add a recipe's statements: params, definitions, and named outs as definitions."""
        from tvlang.faces.commands.common import read_recipe
        from tvlang.language.syntax import parse

        text = read_recipe(path)
        program = parse(text, path)
        directory = os.path.dirname(path)
        names = []
        skipped = 0
        for stmt in program.statements:
            if isinstance(stmt, ast.Out) and stmt.name is None:
                skipped += 1
                continue
            if isinstance(stmt, (ast.Assign, ast.Out)):
                stmt = replace(stmt, value=_rebase_loads(stmt.value, directory))
            self.define(stmt, text, None if directory else text[stmt.span.start:stmt.span.end], origin=path)
            names.append(stmt.name)
        line = f"loaded {path}: {', '.join(names) if names else 'nothing to define'}"
        if skipped:
            line += f" ({skipped} unnamed out skipped: type its expression to see it)"
        self.say(line)

    # -- building recipe text ------------------------------------------------------------

    def _order(self, entries: dict[str, Entry], roots: list[str]) -> list[Entry]:
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

    def _recipe(self, entries: dict[str, Entry], needed: list[str], tail: list[tuple[str, str, int, str]],
                overrides: dict[str, tuple[str, int]] | None = None) -> tuple[str, list[_Piece]]:
        """Text of ``entries`` that ``needed`` uses, then ``tail`` lines ``(prefix, source, offset, text)``."""
        overrides = overrides or {}
        parts: list[str] = []
        pieces: list[_Piece] = []
        position = 0
        for entry in self._order(entries, needed):
            source, offset = overrides.get(entry.name, (entry.text, 0))
            pieces.append(_Piece(position, position + len(entry.text), source, offset, entry.origin))
            parts.append(entry.text + "\n")
            position += len(entry.text) + 1
        for prefix, source, offset, text in tail:
            start = position + len(prefix)
            pieces.append(_Piece(start, start + len(text), source, offset, FILENAME))
            parts.append(prefix + text + "\n")
            position += len(prefix) + len(text) + 1
        return "".join(parts), pieces

    def _remap(self, exc: TvlangError, pieces: list[_Piece]) -> TvlangError:
        """Point an error's spans at the statement the user wrote, not the combined recipe."""
        for err in exc.errors:
            span = err.span
            if span is None:
                continue
            for piece in pieces:
                if piece.start <= span.start <= piece.end:
                    start = span.start - piece.start + piece.offset
                    end = min(span.end, piece.end) - piece.start + piece.offset
                    err.span = Span.of(piece.source, start, end)
                    err.source = piece.source
                    err.filename = piece.filename
                    break
        if exc._errors:  # the head mirrors the first error
            first = exc.errors[0]
            exc.span, exc.source, exc.filename = first.span, first.source, first.filename
        return exc

    def _scalar_names(self, entries: dict[str, Entry]) -> set[str]:
        """Names whose value is a number: params, and definitions made only of numbers."""
        scalars = {e.name for e in entries.values() if isinstance(e.stmt, ast.Param)}
        for entry in self._order(entries, list(entries)):
            if isinstance(entry.stmt, ast.Assign) and _is_scalar(entry.stmt.value, scalars):
                scalars.add(entry.name)
        return scalars

    def _check_all(self, entries: dict[str, Entry], overrides: dict[str, tuple[str, int]]) -> dict[str, str]:
        """Check every definition together; their kinds by name."""
        from tvlang.language.syntax import parse
        from tvlang.language.checker import check

        scalars = self._scalar_names(entries)
        vectors = [e.name for e in entries.values() if isinstance(e.stmt, ast.Assign) and e.name not in scalars]
        text, pieces = self._recipe(entries, list(entries), [], overrides)
        text += "".join(f"out {_KIND.format(n)} = {n}\n" for n in vectors)
        if not vectors:  # the checker wants an output; this one is never run
            text += _DUMMY_OUT
        try:
            checked = check(parse(text, FILENAME), source=text, filename=FILENAME, sources=dict(self.kinds))
        except TvlangError as exc:
            raise self._remap(exc, pieces) from None
        kinds = {name: "scalar" for name in scalars}
        for output in checked.outputs:
            for name in vectors:
                if output.name == _KIND.format(name):
                    kinds[name] = output.kind
        return kinds

    def _compile(self, outputs: list[tuple[str, str, str, int]]):
        """A Plan for ``out NAME = EXPR`` lines ``(name, expr text, source, offset)``, with the
        definitions they need; ``(plan, text, pieces)``."""
        from tvlang.plan.compiler import compile

        needed: list[str] = []
        tail = []
        for name, expr_text, source, offset in outputs:
            needed += _names(_parse_expr(expr_text))
            tail.append((_out_prefix(name), source, offset, expr_text))
        text, pieces = self._recipe(self.entries, needed, tail)
        try:
            return compile(text, filename=FILENAME, sources=dict(self.kinds)), text, pieces
        except TvlangError as exc:
            raise self._remap(exc, pieces) from None

    def _checked_expression(self, expr_text: str, source: str, offset: int):
        """``(checked, kind, expr)`` for one expression, via the checker only.

        A vector expression is checked as ``out = EXPR``; a scalar one as a
        definition (outputs are models or task vectors), with a placeholder output.
        """
        from tvlang.language.syntax import parse
        from tvlang.language.checker import check

        expr = _parse_expr(expr_text)
        scalar = _is_scalar(expr, self._scalar_names(self.entries))
        head = f"{_SCALAR} = " if scalar else _out_prefix(_VALUE)
        # Every definition, used or not, so an unknown name gets a "did you mean".
        text, pieces = self._recipe(self.entries, list(self.entries), [(head, source, offset, expr_text)])
        if scalar:
            text += _DUMMY_OUT
        try:
            checked = check(parse(text, FILENAME), source=text, filename=FILENAME, sources=dict(self.kinds))
        except TvlangError as exc:
            raise self._remap(exc, pieces) from None
        if scalar:
            return checked, "scalar", checked.env[_SCALAR], pieces
        output = checked.outputs[-1]
        return checked, output.kind, output.expr, pieces

    # -- values ----------------------------------------------------------------------------

    def show(self, expr: ast.Expr, source: str) -> None:
        """Print the summary of an expression's value."""
        start = expr.span.start if expr.span else 0
        end = expr.span.end if expr.span else len(source)
        expr_text = source[start:end]
        checked, kind, value_expr, pieces = self._checked_expression(expr_text, source, start)
        self._check_loads(expr, source)
        if kind == "scalar":
            value, reads = self._scalar(value_expr, checked, pieces)
            line = f"Scalar: {_number(value)}"
            self.say(line)
            if reads:
                self.say(f"  reads: {reads}")
            return
        plan, _, pieces = self._compile([(_VALUE, expr_text, source, start)])
        self.say(self._summary(plan, _VALUE, pieces))

    def _bound(self, plan, pieces: list[_Piece]):
        from tvlang.run.evaluate import bind

        try:
            return bind(plan, self.bindings)
        except TvlangError as exc:
            raise self._remap(exc, pieces) from None

    def _summary(self, plan, output: str, pieces: list[_Piece]) -> str:
        from tvlang.run.evaluate import layout

        bound = self._bound(plan, pieces)
        try:
            lay = layout(bound, "error")
            kind = bound.plan.output_kind(output)
            names = list(lay.names) + (list(lay.passthrough) if kind == "model" else [])
            params = sum(_numel(lay.infos[n].shape) for n in lay.names)
            dtypes = sorted({str(lay.infos[n].dtype).replace("torch.", "") for n in lay.names})
            reads = self._reads(bound.plan, bound.plan.sources_read(output))
        except TvlangError as exc:
            raise self._remap(exc, pieces) from None
        finally:
            bound.close()
        title = {"model": "Model", "delta": "Delta (task vector)"}.get(kind, kind)
        extra = f" (+{len(lay.passthrough)} integer buffers from the base)" if kind == "model" and lay.passthrough else ""
        lines = [f"{title}: {len(names)} tensors{extra}, {params:,} parameters, {', '.join(dtypes) or 'no float tensors'}",
                 f"  reads: {reads or '(nothing)'}"]
        return "\n".join(lines)

    def _reads(self, plan, keys: list[str]) -> str:
        parts = []
        for key in keys:
            spec = plan.optimized.sources.get(key)
            path = spec.path if spec is not None and spec.path is not None else None
            if path is None and key in self.bindings:
                value = self.bindings[key]
                value = getattr(value, "value", value)
                path = value if isinstance(value, str) else None
            if path and not key.isidentifier():  # an inline load("...") is shown by its file
                parts.append(path)
            elif path and os.path.normpath(path) != os.path.normpath(key):
                parts.append(f"{key} ({path})")
            else:
                parts.append(key)
        return ", ".join(parts)

    @staticmethod
    def _reductions(expr: ast.Expr, checked) -> tuple[list[tuple[ast.Call, list[int]]], list[str]]:
        """The whole-model reductions a scalar needs, each once, and the texts of their vector arguments."""
        from tvlang.language.printer import to_text
        from tvlang.language.checker import bind_call

        builtins = _builtins()
        calls: list[tuple[ast.Call, list[int]]] = []
        args: list[str] = []
        seen: set[int] = set()

        def collect(node: ast.Expr, depth: int = 0) -> None:
            if depth > 200:
                raise TvlangError("scalar expression nested too deeply")
            if id(node) in seen:
                return
            seen.add(id(node))
            if isinstance(node, ast.Name):
                if node.id in checked.env:
                    collect(checked.env[node.id], depth + 1)
            elif isinstance(node, ast.BinOp):
                collect(node.left, depth + 1)
                collect(node.right, depth + 1)
            elif isinstance(node, ast.Neg):
                collect(node.operand, depth + 1)
            elif isinstance(node, ast.Call):
                row = builtins.get(node.func)
                if row is None or row.stage != "reduce":
                    raise TvlangError(f"the REPL cannot compute a scalar made by '{node.func}'")
                bound = bind_call(node)
                vectors = [bound.args[p.name] for p in row.params if p.kind in ("model", "delta", "vector")]
                vectors += list(bound.varargs)
                indices = []
                for vector in vectors:
                    text = to_text(vector)
                    if text not in args:
                        args.append(text)
                    indices.append(args.index(text))
                calls.append((node, indices))

        collect(expr)
        return calls, args

    def _scalar(self, expr: ast.Expr, checked, pieces: list[_Piece]) -> tuple[float, str]:
        """Evaluate a scalar expression: arithmetic here, whole-model reductions by streaming."""
        calls, args = self._reductions(expr, checked)
        values: dict[int, float] = {}
        reads = ""
        if calls:
            values, reads = self._reduce(calls, args, pieces)

        def value(node: ast.Expr, depth: int = 0) -> float:
            if isinstance(node, ast.Number):
                return node.value
            if isinstance(node, ast.Name):
                if node.id in checked.params:
                    return checked.params[node.id]
                return value(checked.env[node.id], depth + 1)
            if isinstance(node, ast.Neg):
                return -value(node.operand, depth + 1)
            if isinstance(node, ast.BinOp):
                left, right = value(node.left, depth + 1), value(node.right, depth + 1)
                if node.op == "/":
                    if right == 0.0:
                        raise TvlangError("division by zero: the divisor is 0", node.span,
                                          source=checked.source, filename=FILENAME)
                    return left / right
                return {"+": left + right, "-": left - right, "*": left * right}[node.op]
            if isinstance(node, ast.Call):
                return values[id(node)]
            raise TvlangError("not a number", node.span)

        try:
            return value(expr), reads
        except TvlangError as exc:
            raise self._remap(exc, pieces) from None

    def _reduce(self, calls, args: list[str], pieces: list[_Piece]) -> tuple[dict[int, float], str]:
        """Stream every vector argument of the reductions once, feeding the reducers."""
        from tvlang.run.evaluate import Session
        from tvlang.ops.context import TensorContext
        from tvlang.ops.registry import REDUCERS

        # Reuse the caller's pieces for spans in the definitions; arguments map to themselves.
        outputs = [_ARG.format(i) for i in range(len(args))]
        plan, _, arg_pieces = self._compile([(o, a, a, 0) for o, a in zip(outputs, args)])
        reducers = {}
        for node, _ in calls:
            reducer = REDUCERS[node.func]()
            if getattr(reducer, "passes", 1) != 1:
                raise TvlangError(f"the REPL cannot compute '{node.func}' (it needs several passes)")
            reducers[id(node)] = reducer
        bound = self._bound(plan, arg_pieces)
        try:
            session = Session(bound, device=self.device, dtype=self.dtype, out_dtype="float32")
            session.reduce()
            floats = set(session.layout.names)
            current: str | None = None
            tensors: dict[str, Any] = {}

            def flush() -> None:
                if current is None or current not in floats:
                    return
                ctx = TensorContext(current, session.device, {}, session.layout.num_layers)
                for node, indices in calls:
                    reducers[id(node)].update(0, [tensors[outputs[i]] for i in indices], ctx)

            for output, name, tensor, _ in session.results(outputs):
                if name != current:
                    flush()
                    current, tensors = name, {}
                tensors[output] = tensor
            flush()
            reads = self._reads(bound.plan, bound.plan.sources_read())
        except TvlangError as exc:
            raise self._remap(exc, arg_pieces) from None
        finally:
            bound.close()
        values = {}
        for node, _ in calls:
            reducer = reducers[id(node)]
            reducer.end_pass(0)
            values[id(node)] = float(reducer.result())
        return values, reads

    # -- commands -------------------------------------------------------------------------

    def explain(self, expr_text: str) -> None:
        expr = _parse_expr(expr_text)
        checked, kind, value_expr, pieces = self._checked_expression(expr_text, expr_text, 0)
        self._check_loads(expr, expr_text)
        if kind != "scalar":
            plan, _, _ = self._compile([(_VALUE, expr_text, expr_text, 0)])
            self.say_recipe(plan.explain())
            return
        from tvlang.language.printer import to_text

        calls, args = self._reductions(value_expr, checked)
        self.say(f"# a scalar: {to_text(expr)}")
        if not calls:
            self.say("# a constant: no tensor is read")
            return
        self.say("# whole-model reductions: " + ", ".join(
            f"{node.func}({', '.join(_ARG.format(i) for i in indices)})" for node, indices in calls))
        self.say("# their vector arguments, computed in one streaming pass:")
        outputs = [_ARG.format(i) for i in range(len(args))]
        plan, _, _ = self._compile([(o, a, a, 0) for o, a in zip(outputs, args)])
        self.say_recipe(plan.explain())

    def save(self, expr_text: str, path: str, *, force: bool = False) -> None:
        expr = _parse_expr(expr_text)
        checked, kind, _, pieces = self._checked_expression(expr_text, expr_text, 0)
        self._check_loads(expr, expr_text)
        if kind == "scalar":
            raise TvlangError("a scalar has no tensors to save; save a model or a task vector",
                              expr.span, source=expr_text, filename=FILENAME)
        plan, _, pieces = self._compile([(_VALUE, expr_text, expr_text, 0)])
        try:
            summary = plan.run(self.bindings, path, device=self.device, dtype=self.dtype, force=force,
                               progress=True)
        except TvlangError as exc:
            raise self._remap(exc, pieces) from None
        self.say(summary.line())

    def show_vars(self) -> None:
        if not self.entries:
            self.say("(no definitions yet)")
            return
        kinds = self._check_all(self.entries, {})
        width = max(len(e.name) for e in self.entries.values())
        for entry in self.entries.values():
            if isinstance(entry.stmt, ast.Param):
                self.say_recipe(f"param {entry.name} = {_number(entry.stmt.value)}")
            else:
                kind = {"model": "Model", "delta": "Delta", "scalar": "Scalar"}.get(kinds.get(entry.name, ""), "?")
                self.say_recipe(f"{entry.name.ljust(width)} : {kind.ljust(6)} = "
                                f"{_stmt_text(entry.stmt).split(' = ', 1)[1]}")

    def show_sources(self) -> None:
        from tvlang.io import open_reader

        rows: list[tuple[str, str, Any]] = []
        for name, value in self.bindings.items():
            raw = getattr(value, "value", value)
            rows.append((name, f"bound, {self.kinds[name]}", raw))
        for entry in self.entries.values():
            for call in _loads(entry.stmt):
                path_node = call.args[0] if call.args else next((k.value for k in call.kwargs), None)
                if isinstance(path_node, ast.String):
                    kind = "delta" if call.func == "load_delta" else "model"
                    rows.append((entry.name, f"load() in {entry.name}, {kind}", path_node.value))
        if not rows:
            self.say("(no checkpoints bound or loaded)")
            return
        for name, how, raw in rows:
            label = raw if isinstance(raw, str) else f"<{type(raw).__name__}>"
            try:
                with open_reader(raw, label=label if isinstance(raw, str) else None) as reader:
                    infos = [reader.info(n) for n in reader.names()]
                    floats = [i for i in infos if i.dtype.is_floating_point]
                    dtypes = sorted({str(i.dtype).replace("torch.", "") for i in floats})
                    size = f"{len(infos)} tensors, {sum(_numel(i.shape) for i in floats):,} parameters, {', '.join(dtypes)}"
            except TvlangError as exc:
                size = f"cannot read: {exc.message}"
            self.say(f"{name}: {label} ({how}; {size})")

    # -- completion -----------------------------------------------------------------------

    def completions(self, before: str, word: str) -> list[str]:
        """Candidates for ``word``, typed after ``before`` (the input so far)."""
        builtins = _builtins()
        if not before.strip() and word.startswith(":"):
            return [c + " " for c in COMMANDS if c.startswith(word)]
        command = re.match(r"^\s*(?::load\s+|:bind\s+[A-Za-z_]\w*=(?:delta:)?|:save\s.*\sto\s+)", before)
        if command:  # a path after :load, :bind NAME= or :save ... to
            return _path_completions(before[command.end():], word)
        quote = _open_string(before)
        if quote is not None:  # inside a string: load("examples/chec<TAB>
            return _path_completions(before[quote + 1:], word)
        if re.match(r"^\s*:(?:bind|load)\b", before):
            return []
        candidates: list[str] = []
        call = _open_call(before)
        if call is not None and call in builtins:
            row = builtins[call]
            given = set(re.findall(r"([A-Za-z_]\w*)\s*=", before[before.rfind(call + "("):]))
            for arg in list(row.params) + list(row.options):
                if arg.name not in given and arg.name.startswith(word):
                    candidates.append(arg.name + "=")
        names = list(self.kinds) + list(self.entries)
        candidates += [n for n in names if n.startswith(word)]
        candidates += [n + "(" for n in sorted(builtins) if n.startswith(word)]
        if not before.strip():
            candidates += [k + " " for k in ("param",) if k.startswith(word)]
        seen: list[str] = []
        for c in candidates:
            if c not in seen:
                seen.append(c)
        return seen


def _open_string(text: str) -> int | None:
    """Where the string that ``text`` ends inside starts (its quote), if any."""
    quote: str | None = None
    start = None
    escaped = False
    for index, char in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote, start = char, index
        elif char == "#":
            return None
    return start if quote else None


def _path_completions(typed: str, word: str) -> list[str]:
    """Files and directories that complete ``typed + word``; each candidate is what
    replaces ``word`` (readline may have split the path at a delimiter such as '-')."""
    import glob

    prefix = typed + word
    matches = sorted(glob.glob(glob.escape(os.path.expanduser(prefix)) + "*"))
    result = []
    for match in matches:
        if prefix.startswith("~"):
            match = "~" + match[len(os.path.expanduser("~")):]
        if os.path.isdir(os.path.expanduser(match)):
            match += "/"
        result.append(match[len(typed):])
    return result


def _open_call(text: str) -> str | None:
    """The function whose argument list the end of ``text`` is inside, if any."""
    stack: list[int] = []
    quote = None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "([":
            stack.append(index)
        elif char in ")]":
            if stack:
                stack.pop()
    while stack:
        index = stack.pop()
        if text[index] != "(":
            continue
        match = re.search(r"([A-Za-z_]\w*)\s*$", text[:index])
        return match.group(1) if match else None
    return None


def _is_scalar(expr: ast.Expr, scalars: set[str]) -> bool:
    """Whether ``expr`` is a number (the checker says whether it is a valid one)."""
    if isinstance(expr, ast.Number):
        return True
    if isinstance(expr, ast.Name):
        return expr.id in scalars
    if isinstance(expr, ast.Neg):
        return _is_scalar(expr.operand, scalars)
    if isinstance(expr, ast.BinOp):
        return _is_scalar(expr.left, scalars) and _is_scalar(expr.right, scalars)
    if isinstance(expr, ast.Call):
        row = _builtins().get(expr.func)
        return row is not None and row.result == "scalar"
    return False


def _out_prefix(name: str) -> str:
    return "out = " if name == "out" else f"out {name} = "


def _looks_like_statement(text: str) -> bool:
    return bool(re.match(r"\s*(param\b|out\b|[A-Za-z_]\w*\s*=(?!=))", text))


def _parse_expr(text: str) -> ast.Expr:
    from tvlang.language.syntax import parse_expression

    return parse_expression(text, FILENAME)


def _stmt_text(stmt: ast.Stmt) -> str:
    from tvlang.language.printer import to_text

    return to_text(ast.Program((stmt,))).strip()


def _number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.8g}"


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


# -- the loop -------------------------------------------------------------------------------


def _read_inputs(readline_fn: Callable[[str], str], prompts: bool) -> Iterable[str]:
    """Complete inputs: lines joined while a parenthesis or bracket is open."""
    while True:
        try:
            line = readline_fn(PROMPT if prompts else "")
        except EOFError:
            return
        except KeyboardInterrupt:
            print(file=sys.stdout)
            continue
        buffered = line
        while open_parens(buffered) > 0:
            try:
                buffered += "\n" + readline_fn(CONTINUATION if prompts else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print(file=sys.stdout)
                buffered = ""
                break
        yield buffered


def interact(repl: Repl, *, stdin: TextIO | None = None) -> int:
    """Run the loop: readline with prompts on a terminal, plain lines from a pipe.

    Returns the exit status: 0, or 1 when input came from a pipe and a line failed.
    """
    stdin = stdin or sys.stdin
    terminal = stdin.isatty() and sys.stdout.isatty()
    if terminal:
        from tvlang.faces.highlight import use_color

        repl.color = use_color(sys.stdout)
        state = _setup_readline(repl)
        try:
            print("tvlang REPL: :help for help, :quit or Ctrl-D to leave")
            for text in _read_inputs(input, True):
                if not repl.feed(text):
                    break
        finally:
            _save_history(state)
            print()
        return 0

    def read(_prompt: str) -> str:
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    for text in _read_inputs(read, False):
        if not repl.feed(text):
            break
    return 1 if repl.errors else 0


def _setup_readline(repl: Repl):
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows without pyreadline
        return None
    path = history_path()
    try:
        readline.read_history_file(path)
    except (FileNotFoundError, PermissionError, OSError):
        pass
    readline.set_history_length(HISTORY_LENGTH)
    pending: list[str] = []

    def complete(word: str, state: int):
        if state == 0:
            buffer = readline.get_line_buffer()
            before = buffer[:readline.get_begidx()]
            pending[:] = repl.completions(before, word)
        return pending[state] if state < len(pending) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n()[],=+-*/\"'#")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    return readline, path


def _save_history(state) -> None:
    if not state:
        return
    readline, path = state
    try:
        readline.write_history_file(path)
    except OSError:
        pass
