"""Tab completion: commands, names, built-ins, keyword arguments and paths.

``completions(space, commands, before, word)`` lists what may replace ``word``,
typed after ``before`` (readline's split of the line). Paths are completed after
``:load``, ``:bind NAME=`` and ``:save ... to``, and inside a string
(``load("examples/chec<TAB>``); keyword arguments inside the argument list of the
built-in being called.

>>> from tvlang.faces.repl.session import Workspace
>>> completions(Workspace(), [":explain", ":quit"], "x = ties(a, b, ", "dens")
['density=']
"""

from __future__ import annotations

import glob
import os
import re
from typing import Iterable

from tvlang.faces.repl.session import Workspace
from tvlang.language.builtins import BUILTINS

__all__ = ["completions"]


def completions(space: Workspace, commands: Iterable[str], before: str, word: str) -> list[str]:
    """Candidates for ``word``, typed after ``before`` (the input so far)."""
    if not before.strip() and word.startswith(":"):
        return [c + " " for c in commands if c.startswith(word)]
    command = re.match(r"^\s*(?::load\s+|:bind\s+[^\W\d]\w*=(?:delta:)?|:save\s.*\sto\s+)", before)
    if command:  # a path after :load, :bind NAME= or :save ... to
        return _path_completions(before[command.end():], word)
    quote = _open_string(before)
    if quote is not None:  # inside a string: load("examples/chec<TAB>
        return _path_completions(before[quote + 1:], word)
    if re.match(r"^\s*:(?:bind|load)\b", before):
        return []
    candidates: list[str] = []
    call = _open_call(before)
    if call is not None and call in BUILTINS:
        row = BUILTINS[call]
        given = set(re.findall(r"([^\W\d]\w*)\s*=", before[before.rfind(call + "("):]))
        for arg in list(row.params) + list(row.options):
            if arg.name not in given and arg.name.startswith(word):
                candidates.append(arg.name + "=")
    names = list(space.kinds) + list(space.entries)
    candidates += [n for n in names if n.startswith(word)]
    candidates += [n + "(" for n in sorted(BUILTINS) if n.startswith(word)]
    if not before.strip():
        candidates += [k + " " for k in ("param",) if k.startswith(word)]
    return list(dict.fromkeys(candidates))  # each once, in order


def _open_string(text: str) -> int | None:
    """Where the string that ``text`` ends inside starts (its quote), if any."""
    quote: str | None = None
    start = None
    escaped = False
    for index, char in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote, start = char, index
        elif char == "#":
            return None
    return start if quote else None


def _path_completions(typed: str, word: str) -> list[str]:
    """Files and directories that complete ``typed + word``; each candidate is what
    replaces ``word`` (readline may have split the path at a delimiter such as '-')."""
    prefix = typed + word
    matches = sorted(glob.glob(glob.escape(os.path.expanduser(prefix)) + "*"))
    result = []
    for match in matches:
        if prefix.startswith("~"):
            match = "~" + match[len(os.path.expanduser("~")):]
        if os.path.isdir(os.path.expanduser(match)):
            match += "/"
        result.append(match[len(typed):])
    return result


def _open_call(text: str) -> str | None:
    """The function whose argument list the end of ``text`` is inside, if any."""
    stack: list[int] = []
    quote = None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "([":
            stack.append(index)
        elif char in ")]":
            if stack:
                stack.pop()
    while stack:
        index = stack.pop()
        if text[index] != "(":
            continue
        match = re.search(r"([^\W\d]\w*)\s*$", text[:index])
        return match.group(1) if match else None
    return None
