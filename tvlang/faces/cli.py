"""The ``tvlang`` command line: subcommands live in ``tvlang/faces/commands/``."""

from __future__ import annotations

import argparse
import importlib
import sys

from tvlang.errors import TvlangError

# Order here is the order ``tvlang --help`` lists them in.
COMMANDS = ("run", "check", "explain", "repl", "similarity", "bases")

DESCRIPTION = """\
tvlang: task arithmetic on model checkpoints, as a small language.

examples:
  tvlang run recipe.tv -o merged/
  tvlang run -e "pre + 0.4*(ft - pre)" --bind pre=base/ --bind ft=finetuned/ -o out/
  tvlang check recipe.tv
  tvlang explain recipe.tv
"""


class UsageError(Exception):
    """A command-line mistake: printed with the usage hint, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvlang", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from tvlang import __version__

    parser.add_argument("--version", action="version", version=f"tvlang {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tvlang.faces.commands.{name}")
        except ModuleNotFoundError as exc:  # a command still being built
            if exc.name == f"tvlang.faces.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"tvlang {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TvlangError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tvlang: interrupted; nothing was written", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
