"""``tvlang check``: check a recipe, and the checkpoints it names, without tensor math.

Prints nothing and exits 0 when the recipe is good; prints every error and
exits 1 when it is not; exits 2 on a command-line mistake.
"""

from __future__ import annotations

import argparse
import math

from tvlang.language import ast
from tvlang.language.syntax import parse, parse_expression
from tvlang.plan.ir import build
from tvlang.language.checker import CheckedProgram, check

HELP = "check a recipe's names, types and the affine rule, and its checkpoints' headers"

DESCRIPTION = """\
Check a recipe: syntax, names, built-in arguments, and the affine rule (model
coefficients must sum to 1 for a model, 0 for a task vector). No tensor math.
Prints nothing and exits 0 when the recipe is good; prints the errors and exits 1
when it is not.

Every name the recipe uses but does not define must be bound with --bind:
NAME=model or NAME=delta gives its kind; any other value is a checkpoint path
([delta:]PATH). When names are bound to paths, or with --files, the checkpoints
the plan reads are opened and their headers checked as `run` would (tensor
names, shapes and dtypes, under --missing), without reading any weights. A
recipe alone, with no --files, is checked without opening any checkpoint (for a
model repository's CI, where the weights are not present).

examples:
  tvlang check recipe.tv
  tvlang check recipe.tv --files
  tvlang check recipe.tv --bind pre=base/ --bind ft=finetuned/
  tvlang check -e "pre + 0.4*(ft - pre)" --bind pre=model --bind ft=model
  tvlang check recipe.tv --set lm=0.5
"""

_KINDS = ("model", "delta")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe file (.tv)")
    parser.add_argument("-e", "--expr", metavar="EXPR", help="check one expression instead of a recipe file")
    parser.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="NAME=KIND|PATH",
        help="bind a free name: 'model', 'delta', or a checkpoint path (repeatable)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a param (repeatable)"
    )
    parser.add_argument("--files", action="store_true",
                        help="also check the headers of the checkpoints the recipe loads (as run would)")
    parser.add_argument("--missing", default="error", choices=("error", "base", "skip"),
                        help="policy for tensors missing from some inputs, as in run (default error)")
    parser.set_defaults(func=run)


def parse_bindings(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` pairs; a usage error (exit 2) when malformed or repeated."""
    from tvlang.faces.cli import UsageError

    bindings: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or not value:
            raise UsageError(f"--bind expects NAME=PATH (or NAME=model, NAME=delta), got {item!r}")
        if name in bindings:
            raise UsageError(f"--bind {name} is given twice")
        bindings[name] = value
    return bindings


def parse_params(items: list[str]) -> dict[str, float]:
    """``NAME=NUMBER`` pairs; a usage error (exit 2) when malformed or repeated."""
    from tvlang.faces.cli import UsageError

    params: dict[str, float] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(f"--set expects NAME=NUMBER, got {item!r}")
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"--set {name}: {text!r} is not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"--set {name}: {text!r} is not a finite number")
        if name in params:
            raise UsageError(f"--set {name} is given twice")
        params[name] = value
    return params


def binding_kind(value: str) -> str:
    """The kind a ``--bind`` value gives: ``model``/``delta`` literally, ``delta:PATH``,
    or a path: a task vector when the file's metadata says so, else a model."""
    if value in _KINDS:
        return value
    from tvlang.faces.commands.common import split_binding
    from tvlang.io import peek_kind

    kind, path = split_binding(value)
    return kind if kind == "delta" else peek_kind(path)


def check_recipe(
    text: str,
    filename: str | None,
    bindings: dict[str, str] | None,
    params: dict[str, float] | None,
    *,
    expression: bool = False,
) -> CheckedProgram:
    """Parse and check recipe text (or one expression, as ``out = EXPR``).

    ``bindings`` maps free names to ``model``, ``delta`` or a path.

    >>> checked = check_recipe("pre + 0.4*(ft - pre)", None, {"pre": "model", "ft": "m.safetensors"}, None, expression=True)
    >>> [(o.name, o.kind) for o in checked.outputs]
    [('out', 'model')]
    """
    if expression:
        expr = parse_expression(text, filename)
        program = ast.Program((ast.Out(None, expr, span=expr.span),), span=expr.span)
    else:
        program = parse(text, filename)
    from tvlang.plan.compiler import declare_params

    program = declare_params(program, params or {})
    sources = {name: binding_kind(value) for name, value in (bindings or {}).items()}
    checked = check(program, source=text, filename=filename, sources=sources, params=params)
    build(checked)  # constant options a kernel would reject (ties density=1.5) are errors too
    return checked


def run(args: argparse.Namespace) -> int:
    from tvlang.faces.commands.common import recipe_source

    bindings = parse_bindings(args.bind)
    params = parse_params(args.set)
    text, filename = recipe_source(args)
    kinds = {name: binding_kind(value) for name, value in bindings.items()}  # one header peek per path
    check_recipe(text, filename, kinds, params, expression=args.expr is not None)
    paths = {name: value for name, value in bindings.items() if value not in _KINDS}
    if args.files or paths:
        check_files(text, filename, bindings, kinds, params, missing=args.missing)
    return 0


def check_files(text: str, filename: str, bindings: dict[str, str], kinds: dict[str, str],
                params: dict[str, float], *, missing: str = "error") -> None:
    """Open the checkpoints the plan reads and check them as ``run`` would (headers only).

    ``kinds`` are the bound names' kinds (from :func:`binding_kind`). Names bound
    to a kind (``model``/``delta``) have no file: they are checked only when
    every name is bound to a path.
    """
    if any(value in _KINDS for value in bindings.values()):
        return
    from tvlang.faces.commands.common import split_binding
    from tvlang.plan.compiler import compile as compile_recipe
    from tvlang.plan.compiler import delta
    from tvlang.run.evaluate import validate

    bound = {}
    for name, value in bindings.items():
        path = split_binding(value)[1]
        bound[name] = delta(path) if kinds[name] == "delta" else path
    plan = compile_recipe(text, filename=filename, sources=kinds, **params)
    validate(plan, bound, missing=missing)
