"""``tvlang import``: print a mergekit config as an equivalent tvlang recipe.

(The module is ``import_``: ``import`` is a Python keyword; the command is ``tvlang import``.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tvlang.faces.commands.report_file import add_out_argument

HELP = "print a mergekit config (YAML) as an equivalent tvlang recipe"

DESCRIPTION = """\
Translate a mergekit config (the YAML file mergekit-yaml takes) into a tvlang
recipe and print it. Comments keep the config's intent: the merge method, and
where each value came from. The recipe's load() paths are the config's, relative
to the config's directory: save the recipe next to the config. dtype and
out_dtype become --dtype/--out-dtype of `tvlang run` (a recipe does not carry
run options; `tvlang run config.yml` applies them itself). A model reference that
is not a local path is a Hub model id (org/name[@revision]), read as hf:org/name.
Layer surgery (slices) becomes stack(...) of layer ranges, gradients and filters
per-tensor values (layers(...), where(...)). What tvlang cannot express yet
(model+lora, tokenizer_source: union, modules, ...) is an error at its line. See
docs/mergekit.md.

examples:
  tvlang import merge.yml
  tvlang import merge.yml > merge.tv && tvlang check merge.tv
  tvlang run merge.yml -o merged/
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("import", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", metavar="CONFIG", help="a mergekit config (.yml or .yaml)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="accepted for symmetry: import prints nothing but the recipe")
    add_out_argument(parser, "the recipe")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tvlang.frontends.mergekit import translate  # here: other commands start without it

    sys.stdout.write(translate(Path(args.config)).recipe)
    return 0
