"""``tvlang repl``: an interactive session over checkpoints (or a script on stdin)."""

from __future__ import annotations

import argparse
import sys

from tvlang.faces.commands.args import parse_bindings, parse_params

HELP = "interactive recipes: define names, see summaries of values, save results"

DESCRIPTION = """\
Start an interactive session. Type statements (x = a - pre, param lam = 0.4)
and expressions; an expression prints a summary of its value (Model, Delta or
Scalar, the sources it reads, tensors, parameters, dtype) and a scalar such as
norm(a - pre) or cos(a - pre, b - pre) is computed by streaming over the inputs.
Errors are shown as `tvlang check` shows them, and the session goes on.

Commands: :explain EXPR, :save EXPR to PATH, :sources, :vars, :bind NAME=PATH,
:load RECIPE, :help, :quit. Tab completes names, built-ins, keyword
arguments and paths; history is kept in ~/.tvlang_history (or $TVLANG_HISTORY).

With input piped on stdin there are no prompts and the output is the same, so a
script can drive it; the exit status is then 1 if any line failed.

examples:
  tvlang repl --bind pre=base/ --bind ft=finetuned/
  tvlang repl examples/yelp_analogy.tv      (its definitions and params are loaded)
  tvlang repl examples/forget.tv --set lam=0.8 --bind control=examples/checkpoints/t5-control
  printf 'tau = ft - pre\\nnorm(tau)\\n' | tvlang repl --bind pre=base/ --bind ft=ft/
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("repl", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", metavar="RECIPE",
                        help="a recipe whose params, definitions and named outputs are loaded first")
    parser.add_argument("--bind", action="append", default=[], metavar="NAME=PATH",
                        help="bind a name to a checkpoint: NAME=PATH or NAME=delta:PATH (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="set a param after the recipe is loaded (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default float32)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no banner and no progress bar on :save")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bindings = parse_bindings(args.bind)
    params = parse_params(args.set)
    from tvlang.faces.repl import Repl, interact  # here: other commands start without the REPL's modules

    repl = Repl(device=args.device, dtype=args.dtype, quiet=args.quiet)
    for name, value in bindings.items():
        repl.bind(name, value)
    if args.recipe is not None:
        repl.load_recipe(args.recipe)
    for name, value in params.items():
        repl.set_param(name, value)
    return interact(repl, stdin=sys.stdin)
