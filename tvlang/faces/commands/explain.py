"""``tvlang explain``: show a recipe as written, optimized, and as a per-tensor plan."""

from __future__ import annotations

import argparse

from tvlang.faces.commands.check import parse_bindings, parse_params
from tvlang.faces.commands.common import add_recipe_arguments, recipe_source

HELP = "show the optimized recipe and the per-tensor plan"

DESCRIPTION = """\
Print the recipe as written, its optimized form in tvlang syntax, the sources
each output reads, and the per-tensor program over numbered buffers (with any
earlier streaming passes for whole-model scalars). Reads no weights.

examples:
  tvlang explain recipe.tv
  tvlang explain -e "pre + 0.5*(a - pre) + 0.5*(b - pre)"
  tvlang explain -e "pre + lam*(ft - pre)" --set lam=0.3 --no-fold
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("explain", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser, "declare a free name's kind: NAME=model, NAME=delta or NAME=[delta:]PATH")
    for name in ("linearize", "fold", "cancel", "share"):
        parser.add_argument(f"--no-{name}", action="store_true", help=f"turn the {name} pass off")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tvlang.plan.compiler import compile
    from tvlang.plan.optimize import OptimizerFlags

    text, filename = recipe_source(args)
    from tvlang.faces.commands.check import binding_kind

    kinds = {name: binding_kind(value) for name, value in parse_bindings(args.bind).items()}
    flags = OptimizerFlags(**{n: not getattr(args, f"no_{n}") for n in ("linearize", "fold", "cancel", "share")})
    plan = compile(text, filename=filename, sources=kinds if args.bind else None, flags=flags,
                   **parse_params(args.set))
    print(plan.explain())
    return 0
