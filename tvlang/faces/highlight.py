"""Syntax highlighting of recipes, with Pygments when it is installed.

``TvlangLexer`` is a Pygments lexer (keywords ``param``/``out``, built-in
calls, names, numbers, strings, comments); ``highlight(text)`` colours recipe
text for a terminal and returns the text unchanged without Pygments. The REPL
colours ``:explain`` and ``:vars`` with it on a terminal (not when ``NO_COLOR``
is set or ``TERM=dumb``). Documentation tools find the lexer by name once it
is registered as a ``pygments.lexers`` entry point.

>>> kinds = [str(kind) for kind, text in tokens("out = ties(a, b)  # merge") if text.strip()]
>>> kinds[:4]
['Token.Keyword', 'Token.Operator', 'Token.Name.Builtin', 'Token.Punctuation']
"""

from __future__ import annotations

import os
from typing import Iterator

from tvlang.language.builtins import BUILTINS

__all__ = ["PYGMENTS", "TvlangLexer", "highlight", "tokens", "use_color"]

try:
    from pygments import highlight as _highlight
    from pygments.formatters import TerminalFormatter
    from pygments.lexer import RegexLexer, words
    from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Text

    PYGMENTS = True
except ImportError:  # pragma: no cover - Pygments is optional
    PYGMENTS = False


if PYGMENTS:

    class TvlangLexer(RegexLexer):
        """Pygments lexer for tvlang recipes (``.tv``)."""

        name = "tvlang"
        aliases = ["tvlang", "tv"]
        filenames = ["*.tv"]
        mimetypes = ["text/x-tvlang"]

        tokens = {
            "root": [
                (r"\s+", Text),
                (r"#.*?$", Comment.Single),
                (r"\b(param|out)\b", Keyword),
                (r"\b(true|false)\b", Keyword.Constant),
                (words(tuple(sorted(BUILTINS)), prefix=r"\b", suffix=r"(?=\s*\()"), Name.Builtin),
                (r"[^\W\d]\w*(?=\s*=(?!=))", Name.Variable),
                (r"[^\W\d]\w*", Name),
                (r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", Number),
                (r'"(?:[^"\\\n]|\\.)*"', String.Double),
                (r"'(?:[^'\\\n]|\\.)*'", String.Single),
                (r"[-+*/=]", Operator),
                (r"[()\[\],]", Punctuation),
                (r".", Text),
            ],
        }

else:  # pragma: no cover
    TvlangLexer = None  # type: ignore[assignment,misc]


def tokens(text: str) -> Iterator[tuple[object, str]]:
    """(token type, text) pairs; without Pygments, one plain token."""
    if not PYGMENTS:
        yield "Token.Text", text
        return
    yield from TvlangLexer().get_tokens(text)


def use_color(stream) -> bool:
    """Colour for ``stream``: a terminal, Pygments installed, no ``NO_COLOR``, not ``TERM=dumb``."""
    isatty = getattr(stream, "isatty", None)
    return bool(PYGMENTS and isatty and isatty() and "NO_COLOR" not in os.environ
                and os.environ.get("TERM", "") not in ("", "dumb"))


def highlight(text: str) -> str:
    """``text`` with ANSI colours for a terminal (unchanged without Pygments)."""
    if not PYGMENTS:
        return text
    coloured = _highlight(text, TvlangLexer(), TerminalFormatter())
    return coloured if text.endswith("\n") else coloured.rstrip("\n")
