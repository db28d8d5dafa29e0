"""``-o/--out FILE`` on the commands that print a report (check, explain, show, import, similarity).

The command's stdout (its text, or its ``--json`` object) goes to FILE instead, put in
place in one step by the atomic-replace transaction (``tvlang.io.atomic``) once the
command has finished: when it succeeded, or with ``--json`` whatever its exit status (the
object then says ``"ok": false``: the report of a failure is still a report). A failure
without ``--json`` (its message is on stderr) or an interruption leaves FILE as it
was. An existing file is replaced, as a shell's ``>`` would; a directory, or a path the
command reads (the recipe, a config, a bound checkpoint), is refused before anything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

from tvlang.errors import TvlangError
from tvlang.faces.commands.args import UsageError

__all__ = ["add_out_argument", "captured", "check_target", "write_report"]

DEST = "report_out"  # not "out": run, bases and extract-lora write checkpoints with -o


def add_out_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("-o", "--out", dest=DEST, metavar="FILE",
                        help=f"write {what} to FILE instead of stdout (replaced in one step, once the command"
                             " has finished)")


def _read_paths(args: argparse.Namespace) -> list[str]:
    """The paths the command reads, as its arguments name them."""
    paths = [getattr(args, name, None) for name in ("recipe", "config", "output", "base", "against")]
    for item in [*(getattr(args, "bind", None) or ()), *(getattr(args, "inputs", None) or ())]:
        value = item.partition("=")[2] if "=" in item else item
        for kind in ("delta:", "lora:"):
            value = value[len(kind):] if value.startswith(kind) else value
        paths.append(value)
    return [path for path in paths if isinstance(path, str) and path]


def check_target(args: argparse.Namespace) -> str | None:
    """FILE of ``-o``, after checking it may be written; None without ``-o``."""
    target = getattr(args, DEST, None)
    if target is None:
        return None
    if not target or target.endswith(("/", os.sep)) or os.path.isdir(target):
        raise UsageError(f"-o {target}: a directory; give the name of a file to write the report to")
    parent = os.path.dirname(target) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"-o {target}: no directory {parent}")
    real = os.path.realpath(target)
    for path in _read_paths(args):
        if os.path.realpath(path) == real:
            raise UsageError(f"-o {target}: the command reads this file; write the report elsewhere")
    return target


@contextlib.contextmanager
def captured(target: str | None):
    """stdout into a buffer while the command runs, when there is a ``-o`` FILE."""
    if target is None:
        yield None
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


def write_report(target: str, text: str) -> None:
    """Put ``text`` at ``target`` in one step (a TvlangError naming the file when it cannot be written)."""
    from tvlang.io.atomic import AtomicReplace  # tvlang.io imports torch: only when -o is given

    try:
        replace = AtomicReplace(target, directory=False)
        try:
            with open(replace.tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
        except BaseException:
            replace.abort()
            raise
        replace.commit()
    except OSError as exc:
        raise TvlangError(f"cannot write the report to {target}: {exc.strerror or exc}") from None


def finish(args: argparse.Namespace, target: str | None, buffer: io.StringIO | None, code: int) -> int:
    """Write the captured report when the command gave one (see the module's docstring)."""
    if target is None or buffer is None:
        return code
    if code == 0 or (getattr(args, "json", False) and code in (1, 2)):
        try:
            write_report(target, buffer.getvalue())
        except TvlangError as exc:
            print(exc.render(), file=sys.stderr)
            return 1
    return code
