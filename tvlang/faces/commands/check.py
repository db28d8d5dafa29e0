"""``tvlang check``: check a recipe, and the checkpoints it names, without tensor math.

Prints nothing and exits 0 when the recipe is good; prints every error and
exits 1 when it is not; exits 2 on a command-line mistake.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Mapping

from tvlang.errors import TvlangError
from tvlang.faces.commands.args import KINDS, UsageError, binding_kind, binding_value, parse_bindings, parse_params
from tvlang.faces.commands.common import add_recipe_arguments, locked_path, recipe_source
from tvlang.faces.commands.json_output import emit, error_object
from tvlang.faces.commands.report_file import add_out_argument
from tvlang.language import ast
from tvlang.language.checker import CheckedProgram, check, free_names
from tvlang.language.syntax import parse, parse_expression
from tvlang.plan.compiler import check_coefficients, declare_params
from tvlang.plan.compiler import compile as compile_recipe
from tvlang.plan.ir import build
from tvlang.plan.optimize import optimize

HELP = "check a recipe's names, types and the affine rule, and its checkpoints' headers"

DESCRIPTION = """\
Check a recipe: syntax, names, built-in arguments, and the affine rule (model
coefficients must sum to 1 for a model, 0 for a task vector). No tensor math.
Prints nothing and exits 0 when the recipe is good; prints the errors and exits 1
when it is not. With --json it prints one JSON object either way.

A name the recipe uses but does not define is checked as a model unless --bind
says otherwise: NAME=model or NAME=delta gives its kind; any other value is a
checkpoint path ([delta:]PATH). A free name close to one the recipe defines is
reported as a likely typo (bind it to check it anyway). When names are bound to paths, or with --files, the checkpoints
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
  tvlang check recipe.tv --locked     (is recipe.tv.lock current? see tvlang lock)
  tvlang check recipe.tv --json     (the result as JSON: docs/cli-json.md)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_recipe_arguments(parser, "bind a free name: 'model', 'delta', or a checkpoint path (repeatable)",
                         bind_metavar="NAME=KIND|PATH", expr_help="check one expression instead of a recipe file")
    parser.add_argument("--files", action="store_true",
                        help="also check the headers of the checkpoints the recipe loads (as run would)")
    parser.add_argument("--missing", default="error", choices=("error", "base", "skip"),
                        help="policy for tensors missing from some inputs, as in run (default error)")
    parser.add_argument("--locked", action="store_true",
                        help="say whether RECIPE.lock (tvlang lock) is current: the inputs resolve to the files it"
                             " pins (hashes from the hash cache or the Hub's blob names where they have them)")
    parser.add_argument("-q", "--quiet", action="store_true", help="with --locked: no hashing report")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on stdout: ok, errors (message, file, line,"
                             " column), inputs, outputs, the checked files' name matching (docs/cli-json.md)")
    add_out_argument(parser, "the result (the --json object, or the report of --locked)")
    parser.set_defaults(func=run)


def free_models(program: ast.Program, bound: Mapping[str, str]) -> list[str]:
    r"""The names ``program`` uses but neither defines nor has bound: checked as models
    (bind ``NAME=delta`` for a task vector), as ``explain`` does, so a recipe whose
    inputs are bound at run time checks with no ``--bind``. A name close to one the recipe
    defines (difflib's ratio of 0.6) is left out, so the checker reports it as the typo it
    most likely is (``unknown name 'amazon_snt'; did you mean 'amazon_sent'?``).

    >>> from tvlang.language.syntax import parse
    >>> free_models(parse("tau = ft - pre\nout = pre + 0.5*tua\n"), {})
    ['ft', 'pre']
    """
    defined = [stmt.name for stmt in program.statements if stmt.name is not None]
    return [name for name in free_names(program)
            if name not in bound and not difflib.get_close_matches(name, defined, n=1)]


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

    >>> kinds = {"pre": "model", "ft": "delta:tau.safetensors"}
    >>> checked = check_recipe("pre + 0.4*ft", None, kinds, None, expression=True)
    >>> [(o.name, o.kind) for o in checked.outputs]
    [('out', 'model')]
    """
    if expression:
        expr = parse_expression(text, filename)
        program = ast.Program((ast.Out(None, expr, span=expr.span),), span=expr.span)
    else:
        program = parse(text, filename)
    program = declare_params(program, params or {})
    sources = {name: binding_kind(value) for name, value in (bindings or {}).items()}
    sources.update({name: "model" for name in free_models(program, sources)})
    checked = check(program, source=text, filename=filename, sources=sources, params=params)
    # Constant options a kernel would reject (ties density=1.5) are errors too, and so are
    # coefficients the optimizer would fold to inf (1e308*tau + 1e308*tau).
    check_coefficients(optimize(build(checked)), checked)
    return checked


def run(args: argparse.Namespace) -> int:
    bindings = parse_bindings(args.bind)
    params = parse_params(args.set)
    text, filename = recipe_source(args)
    kinds = {name: binding_kind(value) for name, value in bindings.items()}  # one header peek per path
    try:
        checked = check_recipe(text, filename, kinds, params, expression=args.expr is not None)
        paths = {name: value for name, value in bindings.items() if value not in KINDS}
        lock = locked_path(args)
        current = None
        if lock is not None:  # inputs that are not the locked ones: that first, then their headers
            current = check_lock(text, filename, bindings, kinds, params, lock, quiet=args.quiet)
            if not args.json:
                print(f"{lock} is current: {current['inputs']} inputs, {current['files']} files")
        files = None
        if args.files or paths or lock is not None:
            files = check_files(text, filename, bindings, kinds, params, missing=args.missing)
    except TvlangError as exc:
        if not args.json:
            raise
        emit(error_object(exc, inputs=_inputs(bindings, kinds)))  # with the inputs, unlike other commands
        print(exc.render(), file=sys.stderr)
        return 1
    if args.json:
        emit({"ok": True, "errors": [], "inputs": _inputs(bindings, dict(checked.sources)),
              "outputs": [{"name": o.name, "kind": o.kind, "layers": o.layers} for o in checked.outputs],
              "files": files,
              "lock": current})
    return 0


def _inputs(bindings: dict[str, str], kinds: dict[str, str]) -> list[dict]:
    """``check --json``'s inputs: each free name, its kind, and the path bound to it (null when none)."""
    return [{"name": name, "kind": kind, "path": None if bindings.get(name, "model") in KINDS else bindings[name]}
            for name, kind in kinds.items()]


def check_lock(text: str, filename: str, bindings: dict[str, str], kinds: dict[str, str],
               params: dict[str, float], lock: str, *, quiet: bool) -> dict:
    """``--locked``: the inputs against the lockfile; says that it is current, or raises what differs."""
    named = [name for name, value in bindings.items() if value in KINDS]
    if named:
        raise UsageError(f"--locked needs a checkpoint for --bind {named[0]}, not a kind")
    from tvlang.run.lock import check_lockfile  # the run layer imports torch

    bound = {name: binding_value(value, kinds[name]) for name, value in bindings.items()}
    plan = compile_recipe(text, filename=filename, sources=kinds, **params)
    result = check_lockfile(plan, bound, lock, report=not quiet)
    count = sum(len(entry["files"]) for entry in result["inputs"].values())
    return {"path": lock, "current": True, "inputs": len(result["inputs"]), "files": count}


def check_files(text: str, filename: str, bindings: dict[str, str], kinds: dict[str, str],
                params: dict[str, float], *, missing: str = "error") -> list[dict] | None:
    """Open the checkpoints the plan reads and check them as ``run`` would (headers only); what
    each input's names did (``run --json``'s ``inputs``), or None when nothing was opened.

    ``kinds`` are the bound names' kinds (from :func:`binding_kind`). Names bound
    to a kind (``model``/``delta``) have no file: they are checked only when
    every name is bound to a path.
    """
    if any(value in KINDS for value in bindings.values()):
        return None
    from tvlang.run.layout import validate_report  # the run layer imports torch

    bound = {name: binding_value(value, kinds[name]) for name, value in bindings.items()}
    plan = compile_recipe(text, filename=filename, sources=kinds, **params)
    return validate_report(plan, bound, missing=missing)[1]
