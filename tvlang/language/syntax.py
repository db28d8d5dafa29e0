"""Recipe text -> AST, with Lark's errors translated into :class:`TvlangError`.

The grammar is ``grammar/tvlang.lark`` (shipped inside the wheel as
``tvlang/tvlang.lark``). Lark's LALR parser calls the rule callbacks of
:class:`_Builder` as it reduces, so the AST is built while parsing and no parse
tree (and no recursive tree walk) ever exists. The parser keeps its stack in a
list, so nesting has no limit: ``(((...)))`` 5,000 deep or a sum of 20,000 terms
parses, and every later stage walks the tree without recursion.

>>> from tvlang.language.syntax import parse, parse_expression
>>> parse_expression("-a*b")
Neg(operand=BinOp(op='*', left=Name(id='a'), right=Name(id='b')))
>>> program = parse("param lm = 0.4\\nout = pre + lm*(ft - pre)\\n")
>>> [type(s).__name__ for s in program.statements]
['Param', 'Out']
>>> parse("out = (a +", filename="r.tv")
Traceback (most recent call last):
  ...
tvlang.errors.TvlangError: r.tv:1:11: error: unexpected end of input, '(' at 1:7 is not closed
  out = (a +
            ^
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from tvlang.language import ast
from tvlang.errors import Span, TvlangError

__all__ = ["RESERVED", "parse", "parse_expression", "grammar_text"]

#: Words that cannot be used as names.
RESERVED = ("param", "out", "true", "false")

_GRAMMAR_FILE = "tvlang.lark"


# -- loading the grammar ---------------------------------------------------------

def grammar_text() -> str:
    """The grammar: from the installed package first, then from the source tree.

    A wheel carries ``tvlang/tvlang.lark``; an editable install does not, so
    the fallback reads ``grammar/tvlang.lark`` next to the package directory.
    """
    from importlib import resources

    try:
        packaged = resources.files("tvlang").joinpath(_GRAMMAR_FILE)
        if packaged.is_file():
            text = packaged.read_text(encoding="utf-8")
            if text.strip():  # an editable install may leave an empty placeholder
                return text
    except (FileNotFoundError, ModuleNotFoundError):  # pragma: no cover - unusual loaders
        pass
    source_tree = Path(__file__).resolve().parents[2] / "grammar" / _GRAMMAR_FILE
    try:
        return source_tree.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuntimeError(
            f"tvlang is installed without its grammar: neither tvlang/{_GRAMMAR_FILE} in the "
            f"package nor {source_tree} exists; reinstall tvlang"
        ) from None


#: The parser's tables, saved by :func:`write_tables` (``python scripts/parser_tables.py``).
TABLES_FILE = Path(__file__).with_name("parser_tables.json")


def _build(text: str) -> Lark:
    return Lark(
        text,
        parser="lalr",
        lexer="basic",
        start=["start", "expression"],
        propagate_positions=False,  # spans are computed by the callbacks from token positions
        maybe_placeholders=False,
        transformer=_Builder(),
        postlex=_PostLexer(),
    )


def _fingerprint(text: str) -> dict:
    """What saved tables must have been made from: this grammar, by this version of Lark."""
    import lark

    return {"grammar_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "lark": lark.__version__}


def write_tables(path: Path = TABLES_FILE) -> None:
    """Save the parser's tables (Lark's own serialized form: rules, terminals, LALR states) as JSON,
    with the grammar's hash and Lark's version, for :func:`_parser` to load instead of building
    them (about 2 ms against 20-40 ms at every start of the command line). Recipes never reach
    this file: it is part of the package, and JSON holds data only."""
    from lark.grammar import Rule
    from lark.lexer import TerminalDef

    text = grammar_text()
    data, memo = _build(text).memo_serialize([TerminalDef, Rule])
    data = dict(data, options={k: v for k, v in data["options"].items() if k not in ("transformer", "postlex")})
    saved = {**_fingerprint(text), "data": data, "memo": memo}
    path.write_text(json.dumps(saved, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")


def _int_keys(table: dict) -> dict:
    return {int(key): value for key, value in table.items()}


def _load(text: str) -> Lark | None:
    """The parser from :data:`TABLES_FILE`, or ``None`` where that file is missing, unreadable, or
    made from another grammar or by another version of Lark (JSON's keys are strings: the
    memo's and the parse table's were integers)."""
    try:
        saved = json.loads(TABLES_FILE.read_text(encoding="utf-8"))
        if {key: saved.get(key) for key in ("grammar_sha256", "lark")} != _fingerprint(text):
            return None
        data = saved["data"]
        table = data["parser"]["parser"]
        table["tokens"] = _int_keys(table["tokens"])
        table["states"] = {int(state): _int_keys(actions) for state, actions in table["states"].items()}
        return Lark._load_from_dict(data, _int_keys(saved["memo"]), transformer=_Builder(), postlex=_PostLexer())
    except Exception:  # noqa: BLE001 - any trouble with the saved tables: build them instead
        return None


@lru_cache(maxsize=None)
def _parser() -> Lark:
    """The parser: loaded from the saved tables where they match the grammar and Lark, else built."""
    text = grammar_text()
    return _load(text) or _build(text)


# -- per-parse state -------------------------------------------------------------

class _State(threading.local):
    """What the postlexer and the callbacks know about the text being parsed."""

    def __init__(self) -> None:
        self.reset("", None)

    def reset(self, text: str, filename: str | None) -> None:
        self.text = text
        self.filename = filename
        self.open_brackets: list[Token] = []
        self.last_end = 0  # end offset of the last real token
        self.previous: Token | None = None  # the token before the last one
        self.last: Token | None = None


_state = _State()


def _error(message: str, start: int, end: int, notes: tuple[str, ...] = ()) -> TvlangError:
    return TvlangError(
        message, Span.of(_state.text, start, end), source=_state.text, filename=_state.filename, notes=notes
    )


def _where(token: Token) -> str:
    return f"{token.line}:{token.column}"


_CLOSERS = {"RPAR": "LPAR", "RSQB": "LSQB"}


class _PostLexer:
    """Drops newlines inside brackets, ends the input with a newline."""

    always_accept = ("_NL",)

    def process(self, stream):
        state = _state
        brackets = state.open_brackets
        for token in stream:
            kind = token.type
            if kind == "_NL":
                if brackets:
                    continue
            else:
                if kind == "NAME" and not token.value.isascii():
                    # Python's rule: names are compared after NFKC normalization
                    token = token.update(value=unicodedata.normalize("NFKC", token.value))
                state.last_end = token.end_pos
                state.previous, state.last = state.last, token
                if kind in ("LPAR", "LSQB"):
                    brackets.append(token)
                elif kind in _CLOSERS and brackets and brackets[-1].type == _CLOSERS[kind]:
                    brackets.pop()
            yield token
        if brackets:
            opener = brackets[-1]
            end = state.last_end
            raise _error(f"unexpected end of input, '{opener.value}' at {_where(opener)} is not closed", end, end)
        end = len(state.text)
        yield Token("_NL", "", start_pos=end, end_pos=end, line=0, column=0)


# -- building the AST --------------------------------------------------------------

# Spans come from the lexer's line and column counts: Span.of would rescan the
# text for every node, which makes long recipes quadratic.

def _tok_span(token: Token) -> Span:
    return Span(token.start_pos, token.end_pos, token.line, token.column, token.end_line, token.end_column)


def _between(first, last) -> Span:
    """The span from the start of ``first`` to the end of ``last`` (tokens or nodes)."""
    a = _tok_span(first) if isinstance(first, Token) else first.span
    b = _tok_span(last) if isinstance(last, Token) else last.span
    return Span(a.start, b.end, a.line, a.column, b.end_line, b.end_column)


_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


def _string_value(token: Token) -> str:
    raw = token.value[1:-1]
    if "\\" not in raw:
        return raw
    out: list[str] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            escaped = raw[i + 1]
            if escaped not in _ESCAPES:
                at = token.start_pos + 1 + i
                raise _error(
                    f"unknown escape sequence '\\{escaped}' in a string",
                    at,
                    at + 2,
                    notes=("note: strings know \\\\, \\\", \\', \\n and \\t",),
                )
            out.append(_ESCAPES[escaped])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _number_value(token: Token) -> float:
    value = float(token.value)
    if math.isinf(value):
        raise _error(f"number {token.value} is too large", token.start_pos, token.end_pos)
    return value


class _Builder:
    """Rule callbacks: Lark calls them with the rule's children as it reduces."""

    def start(self, statements):
        return ast.Program(tuple(statements), span=Span.of(_state.text, 0, len(_state.text)))

    def expression(self, children):
        (expr,) = children
        return expr

    def assign(self, children):
        name, _, value = children
        return ast.Assign(name.value, value, span=_between(name, value))

    def param(self, children):
        keyword, name, _, (value, number) = children
        return ast.Param(name.value, value, span=_between(keyword, number))

    def signed_number(self, children):
        number = children[-1]
        value = _number_value(number)
        return (-value if len(children) == 2 else value), number

    def out(self, children):
        if len(children) == 4:
            keyword, name, _, value = children
            name = name.value
        else:
            keyword, _, value = children
            name = None
        return ast.Out(name, value, span=_between(keyword, value))

    def binop(self, children):
        left, op, right = children
        return ast.BinOp(op.value, left, right, span=_between(left, right))

    def neg(self, children):
        minus, operand = children
        return ast.Neg(operand, span=_between(minus, operand))

    def number(self, children):
        (token,) = children
        return ast.Number(_number_value(token), span=_tok_span(token))

    def name(self, children):
        (token,) = children
        return ast.Name(token.value, span=_tok_span(token))

    def string(self, children):
        (token,) = children
        return ast.String(_string_value(token), span=_tok_span(token))

    def true(self, children):
        return ast.Bool(True, span=_tok_span(children[0]))

    def false(self, children):
        return ast.Bool(False, span=_tok_span(children[0]))

    def keyword(self, children):
        name, _, value = children
        return ast.Keyword(name.value, value, span=_between(name, value))

    def call(self, children):
        name, *arguments, rpar = children
        arguments = arguments[1:]  # drop the '('
        args: list[ast.Expr] = []
        kwargs: list[ast.Keyword] = []
        for argument in arguments:
            if isinstance(argument, ast.Keyword):
                kwargs.append(argument)
            elif kwargs:
                raise _error(
                    "positional argument after a keyword argument",
                    argument.span.start,
                    argument.span.end,
                    notes=(f"note: put positional arguments first: {name.value}(a, b, key=value)",),
                )
            else:
                args.append(argument)
        return ast.Call(name.value, tuple(args), tuple(kwargs), span=_between(name, rpar))

    def list(self, children):
        lsqb, *items, rsqb = children
        return ast.ListExpr(tuple(items), span=_between(lsqb, rsqb))

    def group(self, children):
        lpar, expr, rpar = children
        # Parentheses leave no node; the expression's span grows to cover them.
        return dataclasses.replace(expr, span=_between(lpar, rpar))


# -- error translation -------------------------------------------------------------

_EXPRESSION_START = ("NUMBER", "NAME", "LPAR", "MINUS")
_SYMBOLS = {
    "NUMBER": "a number",
    "NAME": "a name",
    "STRING": "a string",
    "TRUE": "'true'",
    "FALSE": "'false'",
    "LPAR": "'('",
    "LSQB": "'['",
    "PARAM": "'param'",
    "OUT": "'out'",
    "EQUAL": "'='",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "RPAR": "')'",
    "RSQB": "']'",
    "COMMA": "','",
    "_NL": "end of line",
    "$END": "end of input",
}
_ORDER = list(_SYMBOLS)
_KEYWORDS = {"PARAM", "OUT", "TRUE", "FALSE"}


def _expected(expected: set[str]) -> str:
    names = set(expected)
    if set(_EXPRESSION_START) <= names:
        # Strings, lists and true/false are valid too, but only useful as call arguments.
        names -= {"STRING", "TRUE", "FALSE", "LSQB"}
    words = [_SYMBOLS[n] for n in sorted(names, key=lambda n: _ORDER.index(n) if n in _ORDER else 99) if n in _SYMBOLS]
    if not words:
        return ""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _shown(text: str) -> str:
    if len(text) > 24:
        text = text[:21] + "..."
    return f"'{text}'" if "'" not in text else f'"{text}"'


def _only_blank_after(pos: int) -> bool:
    rest = _state.text[pos:]
    return all(not line.split("#", 1)[0].strip() for line in rest.split("\n"))


def _translate_token(exc: UnexpectedToken) -> TvlangError:
    token = exc.token
    try:
        # The tokens that really lead somewhere (LALR merges lookaheads of similar states).
        acceptable = set(exc.accepts) or set(exc.expected)
    except Exception:  # pragma: no cover - accepts() replays the parser; fall back to the table
        acceptable = set(exc.expected)
    expected = _expected(acceptable)
    tail = f"; expected {expected}" if expected else ""
    notes: list[str] = []
    if token.type in ("_NL", "$END"):
        pos = token.start_pos if token.start_pos is not None else len(_state.text)
        if token.type == "$END" or _only_blank_after(pos):
            pos = _state.last_end
            return _error(f"unexpected end of input{tail}", pos, pos)
        return _error(f"unexpected end of line{tail}", pos, pos)
    start, end = token.start_pos, token.end_pos
    if token.type in _KEYWORDS and "NAME" in acceptable:
        return _error(f"'{token.value}' is a reserved word and cannot be used as a name", start, end)
    brackets = _state.open_brackets
    if brackets and brackets[-1].line < token.line:
        opener = brackets[-1]
        notes.append(f"note: '{opener.value}' at {_where(opener)} is not closed")
    previous = _state.previous
    if token.type == "EQUAL" and previous is not None and previous.type == "PARAM" and acceptable == {"NAME"}:
        return _error("'param' needs a name: param lm = 0.4", start, end)
    if token.type == "EQUAL" and acceptable & {"PLUS", "RPAR", "COMMA"}:
        notes.append("note: '=' starts a statement (name = expr) or passes a keyword argument (f(x, key=value))")
    return _error(f"unexpected {_shown(token.value)}{tail}", start, end, notes=tuple(notes))


def _translate_characters(exc: UnexpectedCharacters) -> TvlangError:
    pos = exc.pos_in_stream
    char = _state.text[pos]
    if char in "\"'":
        line_end = _state.text.find("\n", pos)
        line_end = len(_state.text) if line_end < 0 else line_end
        return _error(
            "unterminated string", pos, max(line_end, pos + 1), notes=(f"note: close it with {char} on the same line",)
        )
    if char == "\t" or not char.isprintable():
        shown = repr(char)
    else:
        shown = f"'{char}'"
    notes = ()
    meant = LOOKALIKES.get(char)
    if meant is not None:
        what = unicodedata.name(char, repr(char)).lower()
        fix = f"did you mean {meant!r}?" if meant else "delete it:"
        notes = (f"note: {fix} ({what}, as text copied from a paper or a word processor has; recipes use "
                 "plain ASCII operators and quotes)",)
    return _error(f"unexpected character {shown}", pos, pos + 1, notes=notes)


#: Characters that text from papers and word processors has where a recipe means an
#: ASCII one: the hint an unexpected one gets.
LOOKALIKES = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u2010": "-", "\u2011": "-", "\ufe63": "-", "\uff0d": "-",
    "\u00d7": "*", "\u00b7": "*", "\u22c5": "*", "\u2217": "*", "\u2219": "*", "\uff0a": "*",
    "\u00f7": "/", "\u2215": "/", "\uff0f": "/",
    "\uff0b": "+",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2018": "'", "\u2019": "'", "\u201a": "'",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2007": " ", "\u200b": "", "\ufeff": "",
    "\u2264": "<=", "\uff08": "(", "\uff09": ")", "\uff1d": "=", "\uff0c": ",",
}


def _run(text: str, filename: str | None, start: str):
    if not isinstance(text, str):
        raise TypeError(f"tvlang.parse expects a str, got {type(text).__name__}")
    parser = _parser()
    _state.reset(text, filename)
    try:
        return parser.parse(text, start=start)
    except UnexpectedToken as exc:
        raise _translate_token(exc) from None
    except UnexpectedCharacters as exc:
        raise _translate_characters(exc) from None
    except UnexpectedEOF:  # pragma: no cover - the postlexer always ends the input
        end = _state.last_end
        raise _error("unexpected end of input", end, end) from None
    except UnexpectedInput as exc:  # pragma: no cover - no other kind is raised by LALR
        raise _error("syntax error", 0, 0) from exc
    finally:
        _state.reset("", None)


def parse(text: str, filename: str | None = None) -> ast.Program:
    """Parse a recipe into an :class:`ast.Program`; errors are :class:`TvlangError`."""
    return _run(text, filename, "start")


def parse_expression(text: str, filename: str | None = None) -> ast.Expr:
    """Parse one expression (``tvlang run -e EXPR``); callers wrap it as ``Out(None, expr)``."""
    return _run(text, filename, "expression")
