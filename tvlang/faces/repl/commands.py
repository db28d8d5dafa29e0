"""The REPL's inputs: statements, expressions and ``:commands``.

:class:`Repl` handles one complete input at a time (``feed``): a definition goes
to the :class:`~tvlang.faces.repl.session.Workspace`, an expression prints what
:mod:`tvlang.faces.repl.values` says about it, and a ``:command`` runs from the
``COMMANDS`` table. An error is printed as ``tvlang check`` prints it and the
session goes on.
"""

from __future__ import annotations

import math
import re
import sys
import textwrap
from typing import Any, TextIO

from tvlang.errors import TvlangError
from tvlang.faces.commands.common import read_recipe
from tvlang.faces.repl.complete import completions
from tvlang.faces.repl.session import FILENAME, VALUE, Workspace, loads, parse_expr, statement_text
from tvlang.faces.repl.values import adapter_summary, describe
from tvlang.io.atomic import abort_unfinished
from tvlang.language import ast
from tvlang.language.syntax import parse, parse_expression

__all__ = ["COMMANDS", "HELP", "Repl"]

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

_KIND_WORDS = {"model": "Model", "delta": "Delta", "scalar": "Scalar"}


class Repl:
    """One REPL session. ``feed(text)`` handles one complete input; False means quit."""

    def __init__(self, bindings: dict[str, Any] | None = None, *, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, device: str = "cpu", dtype: str = "float32",
                 color: bool = False, quiet: bool = False) -> None:
        self.stdout = stdout or sys.stdout
        self.quiet = quiet  # no banner and no progress bars (tvlang repl -q)
        self.stderr = stderr or sys.stderr
        self.device = device
        self.dtype = dtype
        self.color = color  # colour recipe text (:explain, :vars) with tvlang.faces.highlight
        self.space = Workspace()
        self.errors = 0
        for name, value in (bindings or {}).items():
            self.bind(name, value)

    # -- output ----------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.stdout)
        self.stdout.flush()

    def say_recipe(self, text: str) -> None:
        """Print recipe text, coloured when ``self.color``."""
        if self.color:
            from tvlang.faces.highlight import highlight  # loads Pygments: only when colouring

            text = highlight(text)
        self.say(text)

    def report(self, exc: TvlangError) -> None:
        self.errors += 1
        print(exc.render(), file=self.stderr)
        self.stderr.flush()

    # -- the session's names -------------------------------------------------------------

    def bind(self, name: str, value: Any) -> None:
        """Bind ``name`` to a checkpoint (a path, ``delta:PATH``, a state dict, or ``tvlang.delta(x)``)."""
        self.space.bind(name, value)

    def set_param(self, name: str, value: float) -> None:
        """Define (or redefine) ``param name = value``."""
        self.space.set_param(name, value)

    def load_recipe(self, path: str) -> None:
        """Add a recipe's statements: params, definitions, and named outs as definitions."""
        defined, skipped = self.space.load(path, read_recipe(path))
        line = f"loaded {path}: {', '.join(defined) if defined else 'nothing to define'}"
        if skipped:
            line += f" ({skipped} unnamed out skipped: type its expression to see it)"
        self.say(line)

    def completions(self, before: str, word: str) -> list[str]:
        """Candidates for ``word``, typed after ``before`` (the input so far)."""
        return completions(self.space, COMMANDS, before, word)

    # -- input -----------------------------------------------------------------------

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
            abort_unfinished()  # an output the signal caught before the run's cleanup could see it
            print("interrupted", file=self.stderr)
        except Exception as exc:  # a bug: say so, and keep the session
            self.errors += 1
            print(f"internal error (a bug in tvlang, please report it): {type(exc).__name__}: {exc}",
                  file=self.stderr)
        return True

    def statement_or_expression(self, text: str) -> None:
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
                self.space.define(stmt, text, text[stmt.span.start:stmt.span.end] if stmt.span else None)

    def show(self, expr: ast.Expr, source: str) -> None:
        """Print what the value of ``expr`` is: a summary, or a number."""
        compiled = self.space.compile(expr, source)
        for line in describe(self.space, compiled, device=self.device, dtype=self.dtype, progress=not self.quiet):
            self.say(line)

    # -- commands ----------------------------------------------------------------------

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
            self.explain(_need(rest, ":explain EXPR"))
        elif name == ":save":
            rest = _need(rest, ":save EXPR to PATH [--force]")
            force = rest.endswith(" --force")
            if force:
                rest = rest[: -len(" --force")]
            expr, sep, path = rest.rpartition(" to ")
            if not sep or not expr.strip() or not path.strip():
                raise TvlangError("usage: :save EXPR to PATH [--force]")
            self.save(expr, path.strip().strip("\"'"), force=force)
        elif name == ":bind":
            target, sep, value = _need(rest, ":bind NAME=PATH").partition("=")
            if not sep or not value.strip():
                raise TvlangError("usage: :bind NAME=PATH (or NAME=delta:PATH)")
            self.bind(target.strip(), value.strip())
        elif name == ":load":
            self.load_recipe(_need(rest, ":load RECIPE").strip("\"'"))
        return True

    def explain(self, expr_text: str) -> None:
        """The plan of EXPR: for a scalar, its whole-model reductions and the arithmetic on them."""
        self.say_recipe(self.space.compile(parse_expr(expr_text), expr_text).plan.explain())

    def save(self, expr_text: str, path: str, *, force: bool = False) -> None:
        expr = parse_expr(expr_text)
        compiled = self.space.compile(expr, expr_text)
        if compiled.plan.output_kind(VALUE) == "scalar":
            raise TvlangError("a scalar has no tensors to save; save a model or a task vector",
                              expr.span, source=expr_text, filename=FILENAME)
        with compiled.spans():
            summary = compiled.plan.run(self.space.bindings, path, device=self.device, dtype=self.dtype,
                                        force=force, progress=not self.quiet, allow_unused=True)
        self.say(summary.line())

    def show_vars(self) -> None:
        entries = self.space.entries
        if not entries:
            self.say("(no definitions yet)")
            return
        kinds = self.space.kinds_of_definitions()
        width = max(len(name) for name in entries)
        for entry in entries.values():
            text = statement_text(entry.stmt)
            if isinstance(entry.stmt, ast.Param):
                self.say_recipe(text)
            else:
                kind = _KIND_WORDS.get(kinds.get(entry.name, ""), "?")
                self.say_recipe(f"{entry.name.ljust(width)} : {kind.ljust(6)} = {text.split(' = ', 1)[1]}")

    def show_sources(self) -> None:
        from tvlang.io import open_reader  # imports torch
        from tvlang.run.adapters import lora_path, open_adapter

        rows: list[tuple[str, str, Any, str | None]] = []  # (name, how, what, adapter directory)
        for name, value in self.space.bindings.items():
            raw = getattr(value, "value", value)
            rows.append((name, f"bound, {self.space.kinds[name]}", raw, lora_path(value)))
        for entry in self.space.entries.values():
            for call in loads(entry.stmt):
                path_node = call.args[0] if call.args else next((k.value for k in call.kwargs), None)
                if isinstance(path_node, ast.String):
                    kind = "delta" if call.func in ("load_delta", "lora") else "model"
                    adapter = path_node.value if call.func == "lora" else None
                    rows.append((entry.name, f"{call.func}() in {entry.name}, {kind}", path_node.value, adapter))
        if not rows:
            self.say("(no checkpoints bound or loaded)")
            return
        for name, how, raw, adapter in rows:
            label = adapter if adapter is not None else raw if isinstance(raw, str) else f"<{type(raw).__name__}>"
            try:
                if adapter is not None:
                    with open_adapter(adapter) as opened:
                        size = adapter_summary(opened)
                else:
                    with open_reader(raw, label=label if isinstance(raw, str) else None) as reader:
                        infos = [reader.info(n) for n in reader.names()]
                        floats = [i for i in infos if i.dtype.is_floating_point]
                        dtypes = sorted({str(i.dtype).replace("torch.", "") for i in floats})
                        params = sum(math.prod(int(d) for d in i.shape) for i in floats)
                        size = f"{len(infos)} tensors, {params:,} parameters, {', '.join(dtypes)}"
            except TvlangError as exc:
                size = f"cannot read: {exc.message}"
            self.say(f"{name}: {label} ({how}; {size})")


def _need(rest: str, usage: str) -> str:
    if not rest:
        raise TvlangError(f"usage: {usage}")
    return rest


def _looks_like_statement(text: str) -> bool:
    return bool(re.match(r"\s*(param\b|out\b|[^\W\d]\w*\s*=(?!=))", text))
