"""The parser: trees, spans, translated errors, deep nesting, and robustness."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvlang.language import ast
from tvlang.language.ast import Assign, BinOp, Bool, Call, Keyword, ListExpr, Name, Neg, Number, Out, Param, String
from tvlang.errors import TvlangError
from tvlang.language.printer import to_text
from tvlang.language.syntax import parse, parse_expression
from tvlang.language.checker import check

ROOT = Path(__file__).resolve().parent.parent
a, b, c = Name("a"), Name("b"), Name("c")


def error_of(text: str, filename: str = "r.tv") -> TvlangError:
    with pytest.raises(TvlangError) as info:
        parse(text, filename)
    return info.value


# -- trees -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, tree",
    [
        ("-a*b", Neg(BinOp("*", a, b))),
        ("a - b - c", BinOp("-", BinOp("-", a, b), c)),
        ("a - (b - c)", BinOp("-", a, BinOp("-", b, c))),
        ("2*-a", BinOp("*", Number(2.0), Neg(a))),
        ("a - -b", BinOp("-", a, Neg(b))),
        ("-a + b", BinOp("+", Neg(a), b)),
        ("a + b*c", BinOp("+", a, BinOp("*", b, c))),
        ("a/b*c", BinOp("*", BinOp("/", a, b), c)),
        ("--a", Neg(Neg(a))),
        ("(a)", a),
        ("3", Number(3.0)),
        ("0.4", Number(0.4)),
        (".5", Number(0.5)),
        ("1e-3", Number(0.001)),
        ("2.E2", Number(200.0)),
        ("'it''", None),
        ('"x"', String("x")),
        ("'a\\'b\\\\'", String("a'b\\")),
        ('"tab\\tnl\\n"', String("tab\tnl\n")),
        ("true", Bool(True)),
        ("false", Bool(False)),
        ("[1, 2.5, 3]", ListExpr((Number(1.0), Number(2.5), Number(3.0)))),
        ("[]", ListExpr(())),
        ("f()", Call("f")),
        ("f(a, b, key=1)", Call("f", (a, b), (Keyword("key", Number(1.0)),))),
        ("f(a,\n b,\n)", Call("f", (a, b))),
        ("truex + outer", BinOp("+", Name("truex"), Name("outer"))),
    ],
)
def test_expression_trees(text, tree):
    if tree is None:
        with pytest.raises(TvlangError):
            parse_expression(text)
    else:
        assert parse_expression(text) == tree


def test_statements_comments_and_blank_lines():
    text = (
        "# a recipe\n"
        "\n"
        "param lm = 0.4   # default\n"
        "param neg = -1e-2\n"
        "   # indented comment\n"
        "tau = mean(a - pre,\n"
        "           # a comment inside brackets\n"
        "           b - pre)\n"
        "out merged = pre + lm*tau\n"
        "\n"
        "out = pre"  # no final newline
    )
    program = parse(text)
    assert program.statements == (
        Param("lm", 0.4),
        Param("neg", -0.01),
        Assign("tau", Call("mean", (BinOp("-", a, Name("pre")), BinOp("-", b, Name("pre"))))),
        Out("merged", BinOp("+", Name("pre"), BinOp("*", Name("lm"), Name("tau")))),
        Out(None, Name("pre")),
    )


def test_empty_and_comment_only_programs():
    assert parse("").statements == ()
    assert parse("\n\n# nothing\n   \n").statements == ()


def test_windows_line_endings():
    assert parse("x = a\r\nout = x\r\n").statements == (Assign("x", a), Out(None, Name("x")))


def test_spans():
    text = "x = 1\nout = pre + 0.4*(ft - pre)\n"
    program = parse(text)
    out = program.statements[1]
    assert (out.span.line, out.span.column, out.span.end_column) == (2, 1, 27)
    plus = out.value
    assert text[plus.span.start:plus.span.end] == "pre + 0.4*(ft - pre)"
    product = plus.right
    assert text[product.span.start:product.span.end] == "0.4*(ft - pre)"
    group = product.right  # the parentheses belong to the span of what they hold
    assert text[group.span.start:group.span.end] == "(ft - pre)"
    assert (group.left.span.line, group.left.span.column) == (2, 18)
    call = parse_expression("mean(a, k=-1)")
    assert (call.span.start, call.span.end) == (0, 13)
    assert (call.kwargs[0].span.start, call.kwargs[0].span.end) == (8, 12)
    assert (call.kwargs[0].value.span.start, call.kwargs[0].value.span.end) == (10, 12)
    for node in ast.walk(program):
        assert node.span is not None, node


# -- errors ------------------------------------------------------------------------

def test_unclosed_paren_at_end_of_input():
    err = error_of("x = 1\ny = 2\nout = pre+(a - pre\n")
    assert err.render() == (
        "r.tv:3:19: error: unexpected end of input, '(' at 3:11 is not closed\n"
        "  out = pre+(a - pre\n"
        "                    ^"
    )
    assert (err.line, err.column) == (3, 19)


def test_unexpected_token_names_the_text_and_symbols():
    err = error_of("out = a + )")
    assert err.message == "unexpected ')'; expected a number, a name, '(' or '-'"
    message = error_of("out = f(a b)").message
    assert message == "unexpected 'b'; expected '(', '=', '+', '-', '*', '/', ')' or ','"


@pytest.mark.parametrize(
    "text",
    ["out = a + )", "out = (", "out = f(a b)", "x = [1 2]", "out = a 1", "param x = y", "= a", "out a b", "x ="],
)
def test_no_terminal_names_leak(text):
    message = error_of(text).render()
    for internal in ("LPAR", "RPAR", "$END", "_NL", "NAME", "NUMBER", "MINUS", "Token", "lark"):
        assert internal not in message, message


def test_unexpected_characters():
    assert error_of("out = a $ b").message == "unexpected character '$'"
    assert error_of("out = a @ b").message == "unexpected character '@'"
    assert error_of("out = a ` b").message == "unexpected character '`'"
    assert error_of("out = a \x00 b").message == "unexpected character '\\x00'"


def test_unterminated_string():
    err = error_of("out = load('base)\n")
    assert err.message == "unterminated string"
    assert (err.span.start, err.span.end) == (11, 17)


def test_unexpected_end_of_line_vs_input():
    assert error_of("x = a +\nout = x\n").message.startswith("unexpected end of line;")
    assert error_of("x = a +\n\n# trailing\n").message.startswith("unexpected end of input;")


def test_reserved_words():
    assert error_of("x = out + a").message == "'out' is a reserved word and cannot be used as a name"
    assert error_of("x = param*2").message == "'param' is a reserved word and cannot be used as a name"
    assert error_of("param true = 1").message == "'true' is a reserved word and cannot be used as a name"
    assert error_of("param = 1").message == "'param' needs a name: param lm = 0.4"
    assert error_of("false = 1").message == "'false' is a reserved word and cannot be used as a name"


def test_positional_after_keyword():
    err = error_of("out = f(a, k=1, b)")
    assert err.message == "positional argument after a keyword argument"
    assert err.column == 17


# -- nesting ------------------------------------------------------------------------

# Nesting has no limit: the parser keeps its stack in a list, and no later stage recurses.

@pytest.mark.parametrize(
    "text",
    [
        "out = " + "(" * 10_000 + "a" + ")" * 10_000,
        "out = " + "[" * 10_000 + "]" * 10_000,
        "out = " + "-" * 10_000 + "a",
        "out = " + " + ".join(["a"] * 10_000),
        "out = " + "*".join(["a"] * 10_000),
        "out = " + "f(" * 10_000 + ")" * 10_000,
        "out = " + "2*-" * 10_000 + "a",
    ],
)
def test_deep_input_parses_and_prints_back(text):
    program = parse(text)
    assert parse(to_text(program)) == program


def test_deep_parentheses_leave_no_node():
    assert parse_expression("(" * 10_000 + "a" + ")" * 10_000) == a
    chain = parse_expression(" + ".join(["a"] * 10_000))
    assert isinstance(chain, BinOp) and chain.span.end == len(" + ".join(["a"] * 10_000))


def test_deep_unclosed_bracket_is_the_usual_error():
    err = error_of("out = " + "(" * 10_000)
    assert err.message == "unexpected end of input, '(' at 1:10006 is not closed"


# -- robustness ---------------------------------------------------------------------

GOOD_RECIPES = [
    "pre = load(\"t5-base\")\nparam lm = 0.4\nout yelp = pre + lm*(yelp_lm - amazon_lm) + 0.7*amazon_sent\n",
    "tau = ties(a - pre, b - pre, density=0.2, method='sum')\nout = pre + 0.5*tau\n",
    "out = mean(a, b)\nout c = -2*-(x - y)/3 + f(s=[1, .5, 1e-3], flag=true)\n",
]


def _parse_or_tvlang_error(text):
    try:
        program = parse(text)
    except TvlangError as err:
        assert err.render()  # renders without crashing
    else:
        try:  # whatever parses, the checker answers with a result or a TvlangError
            check(program, source=text)
        except TvlangError as err:
            assert err.render()
    try:
        parse_expression(text)
    except TvlangError as err:
        assert err.render()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_random_text_raises_only_tvlang_error(text):
    _parse_or_tvlang_error(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="ab01.e+-*/()[]=,'\"# \n_\\outparamtruefalse", max_size=40))
def test_random_token_soup_raises_only_tvlang_error(text):
    _parse_or_tvlang_error(text)


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(GOOD_RECIPES))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from(list("()[]=,+-*/.'\"#\n \\a1e") + ["param", "out", "true"]))
        if action == "insert":
            text = text[:pos] + char + text[pos:]
        elif action == "delete":
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos] + char + text[pos + 1:]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_recipes_raise_only_tvlang_error(text):
    _parse_or_tvlang_error(text)


def test_parse_is_thread_safe():
    texts = [f"out = a{i} + {i}*(b - a{i})\n" for i in range(8)]
    results: dict[int, object] = {}

    def work(i):
        for _ in range(50):
            results[i] = parse(texts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert results[i].statements[0].value.left == Name(f"a{i}")


def test_front_end_sources_run_no_code():
    files = sorted((ROOT / "tvlang" / "language").glob("*.py")) + [ROOT / "tvlang/faces/commands/check.py"]
    assert len(files) >= 7
    pattern = re.compile(r"\b(eval|exec|compile)\s*\(|\bpickle\b|__import__")
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not pattern.search(text), path


@pytest.mark.parametrize("text", GOOD_RECIPES + ["x = f(a,\n  [1,\n 2])\nout = -(x\n - y)*2\n"])
def test_spans_agree_with_span_of(text):
    # Spans are built from the lexer's line/column counts; they must equal a rescan.
    from tvlang.errors import Span

    for node in ast.walk(parse(text)):
        assert node.span == Span.of(text, node.span.start, node.span.end), node


# -- the saved parser tables ------------------------------------------------------------

def test_saved_tables_are_made_from_this_grammar():
    import hashlib
    import json

    from tvlang.language.syntax import TABLES_FILE, grammar_text

    saved = json.loads(TABLES_FILE.read_text(encoding="utf-8"))
    digest = hashlib.sha256(grammar_text().encode("utf-8")).hexdigest()
    assert saved["grammar_sha256"] == digest, "the grammar changed: run python scripts/parser_tables.py"


def test_the_parser_loads_the_saved_tables_where_they_match():
    import json

    import lark

    from tvlang.language import syntax

    saved = json.loads(syntax.TABLES_FILE.read_text(encoding="utf-8"))
    if saved["lark"] != lark.__version__:
        pytest.skip(f"tables saved by Lark {saved['lark']}, this is {lark.__version__}: the parser is built")
    assert syntax._load(syntax.grammar_text()) is not None


def _corpus() -> list[str]:
    """Recipes and expressions, good and bad, for the two parsers to agree on."""
    examples = sorted((ROOT / "examples").rglob("*.tv"))
    texts = list(GOOD_RECIPES) + [path.read_text(encoding="utf-8") for path in examples]
    texts += ["out = (a +", "out = a + )", "out = f(a b)", "out = a $ b", "out = load('base)\n", "x = a +\nout = x\n",
              "x = a +\n\n# trailing\n", "x = out + a", "param = 1", "out = f(a, k=1, b)", "out = [1, 2",
              "param lm = 0.4\r\nout = pre + lm*(ft - pre)\r\n", "out = " + "(" * 300 + "a" + ")" * 300]
    return texts


def _outcome(text: str, start: str) -> object:
    from tvlang.language.syntax import _run

    try:
        return _run(text, "r.tv", start)
    except TvlangError as err:
        return err.render()


def test_loaded_and_built_parsers_agree(tmp_path, monkeypatch):
    """Tables saved and loaded again (here by the Lark installed, whatever the committed file's
    version) parse every text of the corpus into the same tree, or the same error, as a parser
    built from the grammar."""
    from tvlang.language import syntax

    text = syntax.grammar_text()
    monkeypatch.setattr(syntax, "TABLES_FILE", tmp_path / "tables.json")
    syntax.write_tables(tmp_path / "tables.json")
    loaded, built = syntax._load(text), syntax._build(text)
    assert loaded is not None and built is not None
    corpus = _corpus()
    assert len(corpus) > 20
    outcomes = {}
    for name, parser in (("loaded", loaded), ("built", built)):
        monkeypatch.setattr(syntax, "_parser", lambda parser=parser: parser)
        outcomes[name] = [_outcome(t, start) for t in corpus for start in ("start", "expression")]
    assert outcomes["loaded"] == outcomes["built"]
    assert sum(isinstance(o, str) for o in outcomes["built"]) >= 13  # errors were compared too
    assert sum(not isinstance(o, str) for o in outcomes["built"]) >= 10


def test_tables_of_another_grammar_or_lark_or_broken_are_ignored(tmp_path, monkeypatch):
    import json

    from tvlang.language import syntax

    path = tmp_path / "tables.json"
    monkeypatch.setattr(syntax, "TABLES_FILE", path)
    text = syntax.grammar_text()
    assert syntax._load(text) is None  # no file
    syntax.write_tables(path)
    assert syntax._load(text) is not None
    assert syntax._load(text + "\n// another grammar\n") is None
    saved = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**saved, "lark": "0.0.1"}), encoding="utf-8")
    assert syntax._load(text) is None
    path.write_text(json.dumps({**saved, "data": {"rules": []}}), encoding="utf-8")
    assert syntax._load(text) is None
    path.write_text("{not json", encoding="utf-8")
    assert syntax._load(text) is None
