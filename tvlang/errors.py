"""One exception class for every recipe and data error, with spans and carets.

>>> src = "out = pre + amazon_snt\\n"
>>> err = TvlangError("unknown name 'amazon_snt'", Span.of(src, 12, 22), source=src, filename="r.tv")
>>> print(err.render())
r.tv:1:13: error: unknown name 'amazon_snt'
  out = pre + amazon_snt
              ^^^^^^^^^^
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Span", "TvlangError"]


@dataclass(frozen=True)
class Span:
    """Half-open character range ``[start, end)`` with 1-based line and column of both ends."""

    start: int
    end: int
    line: int
    column: int
    end_line: int
    end_column: int

    @classmethod
    def of(cls, source: str, start: int, end: int) -> "Span":
        """The span of ``source[start:end]``, computing lines and columns."""
        line = source.count("\n", 0, start) + 1
        column = start - (source.rfind("\n", 0, start) + 1) + 1
        end_line = source.count("\n", 0, end) + 1
        end_column = end - (source.rfind("\n", 0, end) + 1) + 1
        return cls(start, end, line, column, end_line, end_column)

    def merge(self, other: "Span | None") -> "Span":
        if other is None:
            return self
        first, last = (self, other) if self.start <= other.start else (other, self)
        end = max(self.end, other.end)
        last_end = self if self.end >= other.end else other
        return Span(first.start, end, first.line, first.column, last_end.end_line, last_end.end_column)


class TvlangError(Exception):
    """A recipe, data or usage error that a user can act on.

    ``span``/``source``/``filename`` place it in a recipe; ``tensor`` names the
    tensor a data error is about; ``notes`` are extra lines printed after the
    caret (hints, the fix). ``errors`` holds several independent errors found in
    one go (``check`` reports them all); a plain error holds just itself.
    ``usage`` marks a command-line mistake found while checking (``--set`` of a param
    the recipe does not declare): the command line exits 2 when every error is one.
    """

    usage = False

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        source: str | None = None,
        filename: str | None = None,
        tensor: str | None = None,
        notes: tuple[str, ...] | list[str] = (),
        errors: list["TvlangError"] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.source = source
        self.filename = filename
        self.tensor = tensor
        self.notes = tuple(notes)
        self._errors = errors

    @property
    def is_usage(self) -> bool:
        """Whether every error here is a command-line mistake (exit 2 on the command line)."""
        return all(err.usage for err in self.errors)

    @property
    def errors(self) -> list["TvlangError"]:
        return list(self._errors) if self._errors else [self]

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def with_context(self, *, source: str | None = None, filename: str | None = None) -> "TvlangError":
        """Fill in the recipe text and file name where they are still unknown (in place)."""
        for err in self.errors:
            if err.source is None:
                err.source = source
            if err.filename is None:
                err.filename = filename
        if self.source is None:
            self.source = source
        if self.filename is None:
            self.filename = filename
        return self

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """``file:line:col: error: message``, the source line, a caret, and any notes."""
        if self._errors:
            return "\n".join(err.render() for err in self._errors)
        where = self.filename or "<input>"
        if self.span is not None:
            head = f"{where}:{self.span.line}:{self.span.column}: error: {self.message}"
        elif self.filename is not None and not self.filename.startswith("<"):
            head = f"{self.filename}: error: {self.message}"
        else:
            head = f"error: {self.message}"
        lines = [head]
        if self.span is not None and self.source is not None:
            lines.extend(_caret(self.source, self.span))
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def _caret(source: str, span: Span) -> list[str]:
    text_lines = source.splitlines() or [""]
    if span.line - 1 >= len(text_lines):
        # The span points past the last line (end of input after a final newline).
        text = text_lines[-1] if source and not source.endswith("\n") else ""
        column = span.column if span.line - 1 == len(text_lines) else len(text) + 1
    else:
        text = text_lines[span.line - 1]
        column = span.column
    width = 1
    if span.end_line == span.line:
        width = max(1, span.end_column - span.column)
    else:
        width = max(1, len(text) - column + 1)
    text, column, width = _visible(text.replace("\t", " "), column, width)
    if len(text) > _MAX_LINE:
        # Show a window around the caret, not a megabyte of one-line recipe.
        start = max(0, min(column - 1 - _MAX_LINE // 3, len(text) - _MAX_LINE))
        window = text[start:start + _MAX_LINE]
        prefix = "..." if start > 0 else ""
        suffix = "..." if start + _MAX_LINE < len(text) else ""
        column = column - start + len(prefix)
        width = max(1, min(width, _MAX_LINE - (column - 1 - len(prefix))))
        text = prefix + window + suffix
    return [f"  {text}", "  " + " " * (column - 1) + "^" * width]


_MAX_LINE = 120  # characters of a source line shown under an error


def _visible(text: str, column: int, width: int) -> tuple[str, int, int]:
    r"""``text`` with control and format characters written as escapes (a recipe's
    ``\x1b[2J`` must not clear the terminal, nor a bidi override reorder the line), and
    the caret's column and width moved to match.

    >>> _visible("ab\x1bcd", 3, 2)
    ('ab\\x1bcd', 3, 5)
    """
    if text.isprintable():
        return text, column, width
    pieces = [c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text]
    start = sum(len(p) for p in pieces[:column - 1]) + 1
    span = sum(len(p) for p in pieces[column - 1:column - 1 + width])
    return "".join(pieces), start, max(1, span)
