"""``tvlang lock``: pin the bytes a recipe's inputs are now, in ``RECIPE.lock``."""

from __future__ import annotations

import argparse

from tvlang.faces.commands.args import UsageError
from tvlang.faces.commands.common import add_recipe_arguments
from tvlang.faces.commands.run import compile_from_args

HELP = "write RECIPE.lock: the resolved revision and sha256 of every file the recipe's inputs are read from"

DESCRIPTION = """\
Write RECIPE.lock beside the recipe: for every input (each load() path and each
--bind value), a Hub reference with the commit it resolves to now, or a local
path relative to the recipe file, and the files a run reads from it (weights,
index and shards; for the base, the config and tokenizer files an output
directory copies) with their size and sha256. The format is sorted, indented
JSON (docs/hub.md, "The lockfile").

`tvlang run --locked` and `tvlang check --locked` then refuse inputs that differ
from the lock. A file's hash is computed once and cached (by path, size and
modification time) under $TVLANG_CACHE_DIR (default ~/.cache/tvlang); a Hub file
stored by git LFS is not read at all: the cache names its blob by its sha256.

examples:
  tvlang lock merge.tv
  tvlang lock merge.tv --bind pre=hf:org/base@main --bind ft=finetuned/
  tvlang run merge.tv --locked -o merged/
  tvlang check merge.tv --locked
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("lock", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser, "bind a free name to a checkpoint: NAME=PATH or NAME=hf:ORG/NAME@REV (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing (no hashing report)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tvlang.run.lock import lock_path, write_lockfile  # the run layer imports torch

    if args.recipe is None:
        raise UsageError("give a RECIPE file: the lock is written beside it, as RECIPE.lock")
    plan, bindings = compile_from_args(args)
    write_lockfile(plan, bindings, lock_path(args.recipe), report=not args.quiet)
    return 0

