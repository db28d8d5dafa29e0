"""The ``tvlang`` command line: subcommands live in ``tvlang/faces/commands/``."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading

from tvlang import __version__
from tvlang.errors import TvlangError
from tvlang.faces.commands import (
    bases,
    check,
    explain,
    extract_lora,
    import_,
    lock,
    repl,
    report_file,
    run,
    show,
    similarity,
)
from tvlang.faces.commands.args import UsageError
from tvlang.faces.commands.json_output import emit, error_object, usage_error_object
from tvlang.faces.interrupts import Interrupted, interrupts_raise
from tvlang.io.atomic import abort_unfinished

# Each subcommand's module has register(subparsers); this order is the order of ``tvlang --help``.
# A command named by a Python keyword lives in a module with a trailing _ (import_); a module's
# other underscores are the command's dashes (extract_lora: extract-lora).
COMMAND_MODULES = (run, check, lock, show, explain, repl, similarity, bases, extract_lora, import_)
COMMANDS = tuple(module.__name__.rpartition(".")[2].rstrip("_").replace("_", "-") for module in COMMAND_MODULES)

DESCRIPTION = """\
tvlang: task arithmetic on model checkpoints, as a small language.

examples:
  tvlang run recipe.tv -o merged/
  tvlang run -e "pre + 0.4*(ft - pre)" --bind pre=base/ --bind ft=finetuned/ -o out/
  tvlang check recipe.tv
  tvlang explain recipe.tv
  tvlang import merge.yml     (a mergekit config as a recipe)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvlang", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"tvlang {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # The REPL reads Ctrl-C as "cancel this line"; every other command stops cleanly on
    # SIGINT or SIGTERM, and a second signal does not cut the first one's cleanup short.
    guard = interrupts_raise() if args.command != "repl" else contextlib.nullcontext()
    try:
        target = report_file.check_target(args)  # -o FILE of a command that prints a report
    except UsageError as exc:
        return _usage_error(args, exc)
    with report_file.captured(target) as buffer:
        code = _dispatch(args, guard)
    return report_file.finish(args, target, buffer, code)


def entry() -> None:
    """The ``tvlang`` console script and ``python -m tvlang``: ``main()``, then exit.

    The interpreter's own teardown (freeing every module loaded) takes about half a second
    once torch is loaded, and about 30 ms with numpy and lark alone (the torch-free
    executor's runs), on the development machine, after the work is done and the output
    renamed into place. So the process exits without it: other threads are joined, the
    ``atexit`` functions run and the streams are flushed as at a normal exit (the same
    calls, in the same order: ``threading._shutdown``, then ``atexit``), then ``os._exit``.
    Under a profiler or tracer (``python -m cProfile -m tvlang`` writes its results after the
    program returns) the exit is the normal one. ``main()`` itself returns the status, for
    callers in Python.

    numpy's BLAS (OpenBLAS) starts a thread a core when numpy is imported, which spins for a
    while: about 70 ms of the second core's time at every start here, beside the run's own
    threads. No command does linear algebra in numpy worth a thread (torch has its own
    BLAS), so the command line sets ``OPENBLAS_NUM_THREADS=1`` where the environment does
    not set it already (child processes, such as Ray's workers, inherit it).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = main()
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter's exit runs first
    watched = sys.getprofile() is not None or sys.gettrace() is not None  # cProfile, coverage, a debugger
    if shutdown is None or watched:
        sys.exit(code)
    shutdown()  # the exit functions of threading (idle thread pools told to stop), then join
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a reader that went away, or a closed stream
        code = code or 1
    os._exit(code)


def _dispatch(args: argparse.Namespace, guard) -> int:
    """Run the command; its errors become their message on stderr (and the JSON object) and the exit status."""
    try:
        with guard:
            return int(args.func(args) or 0)
    except UsageError as exc:
        return _usage_error(args, exc)
    except TvlangError as exc:
        code = 2 if exc.is_usage else 1
        if getattr(args, "json", False):  # the object on stdout, the message on stderr as always
            emit({**error_object(exc), "exit": code})
        print(exc.render(), file=sys.stderr)
        return code
    except KeyboardInterrupt as exc:
        abort_unfinished()  # an output the signal caught before the run's cleanup could see it
        reason = exc.reason if isinstance(exc, Interrupted) else "interrupted"
        print(f"tvlang: {reason}; nothing was written", file=sys.stderr)
        return exc.exit_code if isinstance(exc, Interrupted) else 130
    except BrokenPipeError:
        return 1


def _usage_error(args: argparse.Namespace, exc: UsageError) -> int:
    if getattr(args, "json", False):
        emit(usage_error_object(str(exc)))
    print(f"tvlang {args.command}: error: {exc}", file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(main())
