"""``tvlang explain``: show a recipe as written, optimized, and as a per-tensor plan."""

from __future__ import annotations

import argparse
import os

from tvlang.faces.commands.args import binding_kind, parse_bindings, parse_params
from tvlang.faces.commands.common import add_recipe_arguments, recipe_source
from tvlang.faces.commands.json_output import emit
from tvlang.faces.commands.report_file import add_out_argument
from tvlang.plan.compiler import compile as compile_recipe
from tvlang.plan.explain import explain_data
from tvlang.plan.optimize import PASSES, OptimizerFlags

PASS_NAMES = tuple(name for name, _ in PASSES)  # one --no-NAME switch per optimizer pass

HELP = "show the optimized recipe and the per-tensor plan"

DESCRIPTION = """\
Print the recipe as written, its optimized form in tvlang syntax, the sources
each output reads, and the per-tensor program over numbered buffers (with any
earlier streaming passes for whole-model scalars). Reads no weights.

examples:
  tvlang explain recipe.tv
  tvlang explain -e "pre + 0.5*(a - pre) + 0.5*(b - pre)"
  tvlang explain -e "pre + lam*(ft - pre)" --set lam=0.3 --no-fold
  tvlang explain recipe.tv --json     (the same sections as JSON: docs/cli-json.md)
  tvlang explain merged/              (the recipe an output recorded, with its params)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("explain", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser, "declare a free name's kind: NAME=model, NAME=delta or NAME=[delta:]PATH")
    for name in PASS_NAMES:
        parser.add_argument(f"--no-{name}", action="store_true", help=f"turn the {name} pass off")
    parser.add_argument("--json", action="store_true",
                        help="print the plan's sections as one JSON object on stdout (docs/cli-json.md)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="accepted for symmetry: explain prints nothing but its result")
    add_out_argument(parser, "the plan (or its --json object)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = parse_params(args.set)
    if args.recipe is not None and args.expr is None and is_output(args.recipe):
        text, filename, recorded = recorded_recipe(args.recipe)
        params = {**recorded, **params}  # as it ran, unless --set says otherwise
    else:
        text, filename = recipe_source(args)
    kinds = {name: binding_kind(value) for name, value in parse_bindings(args.bind).items()}
    flags = OptimizerFlags(**{name: not getattr(args, f"no_{name}") for name in PASS_NAMES})
    plan = compile_recipe(text, filename=filename, sources=kinds if args.bind else None, flags=flags, **params)
    if args.json:
        emit({"ok": True, **explain_data(plan)})
    else:
        print(plan.explain())
    return 0


def is_output(path: str) -> bool:
    """Whether ``path`` names an output rather than a recipe: a model directory or a ``.safetensors`` file."""
    return os.path.isdir(path) or path.endswith(".safetensors")


def recorded_recipe(path: str) -> tuple[str, str, dict[str, float]]:
    """The recipe an output recorded (``tvlang show``), a name for its errors, and the
    param values it ran with that differ from the recipe's own (its ``--set``)."""
    from tvlang.faces.commands.show import provenance, set_params

    info = provenance(path)
    changed = dict(item.split("=", 1) for item in set_params(info["recipe"], info["params"]))
    return info["recipe"], f"{path} (its recipe)", {name: float(value) for name, value in changed.items()}
