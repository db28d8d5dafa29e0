"""Pieces several subcommands share: the recipe arguments and reading a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from tvlang.errors import TvlangError
from tvlang.faces.commands.args import UsageError

if TYPE_CHECKING:
    from tvlang.frontends.mergekit import Translation

# A RECIPE with one of these suffixes is a mergekit config: it runs as its translation.
MERGEKIT_SUFFIXES = (".yml", ".yaml")


def read_recipe(path: str) -> str:
    """A recipe file's text, or a TvlangError that names the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise TvlangError(f"cannot read recipe {path}: no such file") from None
    except IsADirectoryError:
        raise TvlangError(f"cannot read recipe {path}: it is a directory") from None
    except UnicodeDecodeError as exc:
        raise TvlangError(f"cannot read recipe {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TvlangError(f"cannot read recipe {path}: {exc.strerror or exc}") from None


def recipe_source(args: argparse.Namespace) -> tuple[str, str]:
    """(text, filename) from ``RECIPE`` or ``-e EXPR``; a usage error when neither or both."""
    if args.recipe is None and args.expr is None:
        raise UsageError("give a RECIPE file or -e EXPR")
    if args.recipe is not None and args.expr is not None:
        lone = [item for item in getattr(args, "bind", None) or () if "=" not in item]
        if lone:  # `--bind pre base/`: argparse took the path for the recipe
            raise UsageError(f"--bind {lone[0]}: no '=' (write --bind {lone[0]}={args.recipe}; "
                             f"'{args.recipe}' was read as the recipe file)")
        raise UsageError("give a RECIPE file or -e EXPR, not both")
    if args.expr is not None:
        return args.expr, "<expr>"
    config = mergekit_config(args)
    if config is not None:
        return config.recipe, args.recipe
    return read_recipe(args.recipe), args.recipe


def mergekit_config(args: argparse.Namespace) -> Translation | None:
    """The translation of a RECIPE that is a mergekit config (``.yml``/``.yaml``), else None."""
    if args.recipe is None or not args.recipe.endswith(MERGEKIT_SUFFIXES):
        return None
    from tvlang.frontends.mergekit import translate  # here: a .tv recipe or -e starts without it

    return translate(Path(args.recipe))


def add_recipe_arguments(parser: argparse.ArgumentParser, bind_help: str, *, bind_metavar: str = "NAME=PATH",
                         expr_help: str = "an expression instead of a recipe file") -> None:
    """RECIPE, ``-e EXPR``, ``--bind`` and ``--set``: the arguments of run, check and explain."""
    parser.add_argument("recipe", nargs="?", metavar="RECIPE",
                        help="recipe file (.tv), or a mergekit config (.yml, .yaml: see tvlang import)")
    parser.add_argument("-e", "--expr", metavar="EXPR", help=expr_help)
    parser.add_argument("--bind", action="append", default=[], metavar=bind_metavar, help=bind_help)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a param (repeatable)")


def locked_path(args: argparse.Namespace) -> str | None:
    """The lockfile of ``--locked`` (``RECIPE.lock``), or None without the flag; a usage error with ``-e``."""
    if not getattr(args, "locked", False):
        return None
    if args.recipe is None:
        raise UsageError("--locked needs a RECIPE file (its lock is RECIPE.lock)")
    from tvlang.run.lock import lock_path  # the run layer imports torch

    return lock_path(args.recipe)


def add_executor_arguments(parser: argparse.ArgumentParser, *, ray_help: str, fails: str) -> None:
    """``--executor``, ``--address``, ``--workers`` and ``--task-timeout`` (``run``, ``similarity``,
    ``bases``); ``ray_help`` says what the Ray executor does, ``fails`` what a timeout fails."""
    parser.add_argument("--executor", default="local", choices=("local", "ray"),
                        help=f"local (default), or ray: {ray_help} (docs/distributed.md; pip install 'tvlang[ray]')")
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                        help="--executor ray: the cluster to use (default: start a local Ray instance)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="--executor ray: at most N tasks at a time (a local instance gets N CPUs)")
    parser.add_argument("--task-timeout", type=float, default=None, metavar="SECONDS",
                        help=f"--executor ray: a task running longer is cancelled and {fails} (default: no limit)")


def executor_options(args: argparse.Namespace) -> dict:
    """``executor=`` (and for Ray ``address=``, ``workers=``, ``task_timeout=``) for the API."""
    if args.executor == "local":
        if args.address is not None or args.workers is not None:
            raise UsageError("--address and --workers go with --executor ray")
        if args.task_timeout is not None:
            raise UsageError("--task-timeout goes with --executor ray")
        return {}
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers expects a positive number, got {args.workers}")
    if args.task_timeout is not None and not args.task_timeout > 0:  # not NaN either
        raise UsageError(f"--task-timeout expects a positive number of seconds, got {args.task_timeout:g}")
    return {"executor": "ray", "address": args.address, "workers": args.workers, "task_timeout": args.task_timeout}
