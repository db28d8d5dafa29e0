"""The printer: canonical text, and parse(to_text(tree)) == tree for every tree."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvlang.language import ast
from tvlang.language.printer import format_number, to_text
from tvlang.language.syntax import RESERVED, parse, parse_expression

FIXTURES = Path(__file__).parent / "fixtures"


def _identity_cases():
    cases = []
    for lineno, line in enumerate((FIXTURES / "identity.txt").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        source, sep, expected = line.rpartition(" ; ")
        assert sep, f"identity.txt:{lineno}: expected 'input ; canonical'"
        cases.append(pytest.param(source.strip(), expected.strip(), id=f"line{lineno}"))
    return cases


@pytest.mark.parametrize("source, canonical", _identity_cases())
def test_identity_fixture(source, canonical):
    expr = parse_expression(source)
    assert to_text(expr) == canonical
    # The canonical text is a fixed point and parses to the same tree.
    assert parse_expression(canonical) == expr
    assert to_text(parse_expression(canonical)) == canonical


def test_identity_fixture_has_enough_cases():
    assert len(_identity_cases()) >= 40


def test_program_printing():
    text = "# a recipe\nparam  lm=.4\nparam neg = -2e-3\n\nx = f( a ,\n  b, k = 'q\"' )\nout = x\nout y = [1, 2.50]\n"
    assert to_text(parse(text)) == (
        'param lm = 0.4\nparam neg = -0.002\nx = f(a, b, k="q\\"")\nout = x\nout y = [1, 2.5]\n'
    )
    assert to_text(ast.Program(())) == ""


def test_statements_and_keywords_print_alone():
    assert to_text(ast.Param("p", -3.0)) == "param p = -3"
    assert to_text(ast.Out(None, ast.Name("a"))) == "out = a"
    assert to_text(ast.Keyword("density", ast.Number(0.2))) == "density=0.2"


def test_format_number():
    assert format_number(3.0) == "3"
    assert format_number(0.001) == "0.001"
    assert format_number(1e-20) == "1e-20"
    assert format_number(2.5e300) == "2.5e+300"
    assert format_number(1e16) == "1e+16"
    assert format_number(9999999999999998.0) == "9999999999999998"
    with pytest.raises(ValueError):
        format_number(float("inf"))


def test_negative_number_node_prints_as_negation():
    # The parser never makes a negative Number; a hand-built one prints as what it means.
    expr = ast.BinOp("*", ast.Number(-2.0), ast.Name("a"))
    assert to_text(expr) == "(-2)*a"
    assert parse_expression(to_text(expr)) == ast.BinOp("*", ast.Neg(ast.Number(2.0)), ast.Name("a"))


def test_strings_are_reescaped():
    s = ast.String('a\\b"c\nd\te\'f')
    assert to_text(s) == '"a\\\\b\\"c\\nd\\te\'f"'
    assert parse_expression(to_text(s)) == s


# -- the round-trip property --------------------------------------------------------

_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(lambda n: n not in RESERVED)
_numbers = st.floats(min_value=0, allow_nan=False, allow_infinity=False).map(abs)
_leaves = st.one_of(
    _numbers.map(ast.Number),
    _names.map(ast.Name),
    st.text(max_size=8).map(ast.String),
    st.booleans().map(ast.Bool),
)


def _extend(children):
    return st.one_of(
        children.map(ast.Neg),
        st.tuples(st.sampled_from("+-*/"), children, children).map(lambda t: ast.BinOp(*t)),
        st.lists(children, max_size=3).map(lambda items: ast.ListExpr(tuple(items))),
        st.tuples(
            _names,
            st.lists(children, max_size=3),
            st.lists(st.tuples(_names, children), max_size=2),
        ).map(lambda t: ast.Call(t[0], tuple(t[1]), tuple(ast.Keyword(k, v) for k, v in t[2]))),
    )


expressions = st.recursive(_leaves, _extend, max_leaves=25)

statements = st.one_of(
    st.tuples(_names, expressions).map(lambda t: ast.Assign(*t)),
    st.tuples(_names, st.floats(allow_nan=False, allow_infinity=False)).map(lambda t: ast.Param(*t)),
    st.tuples(st.none() | _names, expressions).map(lambda t: ast.Out(*t)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions)
def test_expression_round_trip(expr):
    text = to_text(expr)
    assert parse_expression(text) == expr, text
    assert to_text(parse_expression(text)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(statements, max_size=6))
def test_program_round_trip(stmts):
    program = ast.Program(tuple(stmts))
    assert parse(to_text(program)) == program
