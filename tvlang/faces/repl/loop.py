"""The REPL's loop: readline with prompts and history on a terminal, plain lines from a pipe.

Input continues on the next line while a parenthesis or bracket is open
(``open_parens``). With input piped on stdin there are no prompts and the exit
status is 1 when a line failed, so a script can drive the REPL.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, TextIO

from tvlang.faces.repl.commands import Repl

__all__ = ["CONTINUATION", "HISTORY_ENV", "HISTORY_LENGTH", "PROMPT", "history_path", "interact", "open_parens"]

HISTORY_ENV = "TVLANG_HISTORY"
HISTORY_LENGTH = 2000
PROMPT = "tv> "
CONTINUATION = "... "


def history_path() -> str:
    """Where history is kept: ``$TVLANG_HISTORY``, else ``~/.tvlang_history``."""
    return os.environ.get(HISTORY_ENV) or os.path.join(os.path.expanduser("~"), ".tvlang_history")


def open_parens(text: str) -> int:
    """How many ``(`` and ``[`` are still open (strings and comments ignored).

    >>> open_parens('ties(a, b,'), open_parens('f("(", [1, 2])  # (')
    (1, 0)
    """
    depth = 0
    quote: str | None = None
    escaped = False
    comment = False
    for char in text:
        if comment:
            comment = char != "\n"
        elif quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote or char == "\n":
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            comment = True
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
    return max(depth, 0)


def _read_inputs(readline_fn: Callable[[str], str], prompts: bool) -> Iterable[str]:
    """Complete inputs: lines joined while a parenthesis or bracket is open."""
    while True:
        try:
            line = readline_fn(PROMPT if prompts else "")
        except EOFError:
            return
        except KeyboardInterrupt:
            print(file=sys.stdout)
            continue
        buffered = line
        while open_parens(buffered) > 0:
            try:
                buffered += "\n" + readline_fn(CONTINUATION if prompts else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print(file=sys.stdout)
                buffered = ""
                break
        yield buffered


def interact(repl: Repl, *, stdin: TextIO | None = None) -> int:
    """Run the loop: readline with prompts on a terminal, plain lines from a pipe.

    Returns the exit status: 0, or 1 when input came from a pipe and a line failed.
    """
    stdin = stdin or sys.stdin
    terminal = stdin.isatty() and sys.stdout.isatty()
    if terminal:
        from tvlang.faces.highlight import use_color  # loads Pygments: only on a terminal

        repl.color = use_color(sys.stdout)
        state = _setup_readline(repl)
        try:
            if not repl.quiet:
                print("tvlang REPL: :help for help, :quit or Ctrl-D to leave")
            for text in _read_inputs(input, True):
                if not repl.feed(text):
                    break
        finally:
            _save_history(state)
            print()
        return 0

    def read(_prompt: str) -> str:
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    for text in _read_inputs(read, False):
        if not repl.feed(text):
            break
    return 1 if repl.errors else 0


def _setup_readline(repl: Repl):
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows without pyreadline
        return None
    path = history_path()
    try:
        readline.read_history_file(path)
    except (FileNotFoundError, PermissionError, OSError):
        pass
    readline.set_history_length(HISTORY_LENGTH)
    pending: list[str] = []

    def complete(word: str, state: int):
        if state == 0:
            buffer = readline.get_line_buffer()
            before = buffer[:readline.get_begidx()]
            pending[:] = repl.completions(before, word)
        return pending[state] if state < len(pending) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n()[],=+-*/\"'#")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    return readline, path


def _save_history(state) -> None:
    if not state:
        return
    readline, path = state
    try:
        readline.write_history_file(path)
    except OSError:
        pass
