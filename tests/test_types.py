"""The checker: kinds, the affine rule, names, params, and table-driven built-in calls."""

from __future__ import annotations

import pytest

from tvlang.language import ast
from tvlang.language.builtins import BUILTINS, Arg, Builtin
from tvlang.errors import TvlangError
from tvlang.language.syntax import parse, parse_expression
from tvlang.language.checker import BoundCall, bind_call, check


def checked(text, **kwargs):
    return check(parse(text), source=text, filename="r.tv", **kwargs)


def kinds(text, **kwargs):
    return {o.name: o.kind for o in checked(text, **kwargs).outputs}


def errors(text, **kwargs):
    with pytest.raises(TvlangError) as info:
        checked(text, **kwargs)
    return [e.message for e in info.value.errors]


@pytest.mark.parametrize(
    "expr, kind",
    [
        ("a", "model"),
        ("a - b", "delta"),
        ("0.5*a + 0.5*b", "model"),
        ("a + 0.4*(b - c)", "model"),
        ("0.4*(b - c)", "delta"),
        ("-(a - b)", "delta"),
        ("(a - b)/2", "delta"),
        ("a/2 + b/2", "model"),
        ("0.1*a + 0.2*b + 0.7*c", "model"),  # weights 0.1+0.2+0.7 are 1 only within the tolerance
        ("2*a - b", "model"),
        ("-a + 2*b", "model"),
        ("a - b + c - d", "delta"),
        ("mean(a, b)", "model"),
        ("mean(a - c, b - c)", "delta"),
        ("sum(a - c, b - c)", "delta"),
        ("load('x')", "model"),
        ("load_delta('x')", "delta"),
        ("cos(a, b)*(a - b)", "delta"),
        ("(a - b)/norm(a - b)", "delta"),
        ("a + (b - a)*dot(a - b, a - c)/norm(a - b)", "model"),
        ("a*2 - b", "model"),
    ],
)
def test_output_kinds(expr, kind):
    assert kinds(f"out = {expr}") == {"out": kind}


def test_affine_error_message_and_fix():
    text = "out = pre + 0.4*ft\n"
    with pytest.raises(TvlangError) as info:
        checked(text)
    err = info.value
    assert err.message == "model coefficients sum to 1.4; a model needs 1 and a task vector 0"
    assert err.notes == ("note: scale task vectors, not models: pre + 0.4*(ft - pre)",)
    assert (err.span.start, err.span.end) == (6, 18)
    assert err.filename == "r.tv" and err.source == text


@pytest.mark.parametrize(
    "expr, weight, fix",
    [
        ("pre + 0.4*ft", "1.4", "pre + 0.4*(ft - pre)"),
        ("0.3*ft + pre", "1.3", "0.3*(ft - pre) + pre"),
        ("pre + ft*0.5", "1.5", "pre + (ft - pre)*0.5"),
        ("pre + ft/2", "1.5", "pre + (ft - pre)/2"),
        ("pre - 0.5*ft", "0.5", "pre - 0.5*(ft - pre)"),
        ("pre + 0.4*(ya - am) + 0.7*am", "1.7", "pre + 0.4*(ya - am) + 0.7*(am - pre)"),
        ("mean(a, b) + 0.3*c", "1.3", "mean(a, b) + 0.3*(c - mean(a, b))"),
        ("a + b", "2", None),
        ("0.4*ft", "0.4", None),
        ("2*(a + b)", "4", None),
    ],
)
def test_affine_fixes(expr, weight, fix):
    with pytest.raises(TvlangError) as info:
        checked(f"out = {expr}")
    err = info.value
    assert err.message == f"model coefficients sum to {weight}; a model needs 1 and a task vector 0"
    if fix is None:
        assert "scale task vectors" not in " ".join(err.notes)
    else:
        assert err.notes == (f"note: scale task vectors, not models: {fix}",)
        # The suggested fix is itself a valid recipe.
        assert kinds(f"out = {fix}")["out"] in ("model", "delta")


def test_affine_rule_applies_to_statements_and_arguments_not_subexpressions():
    # (a + b) has weight 2, but the whole is a model
    assert kinds("out = (a + b)/2") == {"out": "model"}
    assert errors("x = a + b\nout = x/2") == ["model coefficients sum to 2; a model needs 1 and a task vector 0"]
    assert errors("out = mean(a + b)") == [
        "argument 1 of mean(): model coefficients sum to 2; a model needs 1 and a task vector 0"
    ]


def test_vector_arithmetic_errors():
    assert errors("out = a*b") == ["'*' scales by a number; a model and a model cannot be multiplied"]
    assert errors("out = (a - b)*(a - c)") == [
        "'*' scales by a number; a task vector and a task vector cannot be multiplied"
    ]
    assert errors("out = a + 1") == ["cannot add a number and a model"]
    assert errors("out = 1 - (a - b)") == ["cannot subtract a number and a task vector"]
    assert errors("out = 1/a") == ["cannot divide by a model; '/' divides by a number"]
    assert errors("out = a/0") == ["division by zero"]
    assert errors("param z = 0\nout = a/(2*z)") == ["division by zero"]
    assert errors("out = a*norm(a - b)") == [
        "the coefficient of a model must be known before the run, but this number is computed from weights"
    ]
    assert errors("out = 1e300*1e300*(a - b)") == ["number out of range"]


def test_outputs_are_models_or_task_vectors():
    assert errors("out = norm(a - b)") == ["an output must be a model or a task vector, got a number"]
    assert errors("param p = 1\nout x = 2*p") == ["an output must be a model or a task vector, got a number"]
    assert kinds("n = norm(a - b)\nout = (a - b)/n") == {"out": "delta"}


def test_strings_bools_and_lists_only_as_arguments():
    assert errors("out = 'x'") == ["a string can only be an argument of a built-in function"]
    assert errors("out = [1]") == ["a list can only be an argument of a built-in function"]
    assert errors("out = a + true") == ["'+' cannot be applied to true/false"]
    assert errors("out = -'x'") == ["cannot negate a string"]


def test_lenient_free_names_are_models():
    assert checked("out = pre + 0.5*(ft - pre)").sources == {"pre": "model", "ft": "model"}
    assert errors("out = pre + tau") == ["model coefficients sum to 2; a model needs 1 and a task vector 0"]


def test_strict_sources():
    sources = {"pre": "model", "tau": "delta", "unused": "model"}
    program = checked("out = pre + 0.5*tau", sources=sources)
    assert program.sources == {"pre": "model", "tau": "delta"}
    assert errors("out = pre + 0.5*tua", sources=sources) == ["unknown name 'tua'; did you mean 'tau'?"]
    assert errors("out = pre + q", sources={"pre": "model"}) == ["unknown name 'q'"]


def test_unknown_name_suggests_defined_names_and_params():
    text = "param lm = 0.4\namazon_sent = s - pre\nout = pre + lmm*amazon_snt"
    assert errors(text, sources={"s": "model", "pre": "model"}) == [
        "unknown name 'lmm'; did you mean 'lm'?",
        "unknown name 'amazon_snt'; did you mean 'amazon_sent'?",
    ]


def test_program_fields():
    text = "param lm = 0.4\nparam k = 2\ntau = ft - pre\nout merged = pre + lm*tau\nout t = k*tau\n"
    program = checked(text, params={"lm": 0.25})
    assert program.params == {"lm": 0.25, "k": 2.0}
    assert list(program.env) == ["tau", "merged", "t"]
    assert program.env["tau"] == parse_expression("ft - pre")
    assert [(o.name, o.kind) for o in program.outputs] == [("merged", "model"), ("t", "delta")]
    assert program.outputs[0].span.line == 4
    assert program.sources == {"ft": "model", "pre": "model"}
    assert program.source == text and program.filename == "r.tv"


def test_param_overrides_affect_constants():
    # With lm = 1 the weight is 1 + 0 (fine); the override is used in the affine arithmetic.
    text = "param w = 0.5\nout = w*a + (1 - w)*b"
    assert kinds(text, params={"w": 0.9}) == {"out": "model"}
    assert errors("param w = 0.5\nout = w*a + 0.5*b", params={"w": 0.9}) == [
        "model coefficients sum to 1.4; a model needs 1 and a task vector 0"
    ]


def test_param_override_errors():
    assert errors("param lm = 0.4\nout = a", params={"lam": 1.0}) == [
        "the recipe has no param 'lam' to set; did you mean 'lm'?"
    ]
    assert errors("out = a", params={"x": 1.0}) == ["the recipe has no param 'x' to set"]
    assert errors("param lm = 0.4\nout = a", params={"lm": "big"}) == [
        "param 'lm' must be set to a finite number, got 'big'"
    ]


def test_redefinitions_and_outputs():
    assert errors("x = a\nx = b\nout = x") == ["'x' is already defined on line 1"]
    assert errors("param p = 1\nparam p = 2\nout = a") == ["'p' is already defined on line 1"]
    assert errors("out m = a\nout m = b") == ["'m' is already defined on line 1"]
    assert errors("out = a\nout = b") == [
        "a recipe has at most one bare 'out'; name the outputs: out a = ..., out b = ..."
    ]
    assert errors("x = a - b") == ["the recipe has no output; add a line such as: out = pre + 0.4*(ft - pre)"]
    assert errors("norm = a\nout = a") == ["'norm' is a built-in function; choose another name for this value"]
    assert errors("out = x\nx = a") == ["'x' is used before it is defined on line 2"]
    # a named output is a name later statements can use
    assert kinds("out m = a - b\nout = c + m") == {"m": "delta", "out": "model"}


def test_all_independent_errors_are_collected_in_order():
    text = "x = a*b\ny = q + 1\nout = 0.4*c + d\nout = e"
    with pytest.raises(TvlangError) as info:
        checked(text)
    errs = info.value.errors
    assert [(e.line, e.message.split(";")[0]) for e in errs] == [
        (1, "'*' scales by a number"),
        (2, "cannot add a number and a model"),
        (3, "model coefficients sum to 1.4"),
        (4, "a recipe has at most one bare 'out'"),
    ]
    assert all(e.source == text and e.filename == "r.tv" for e in errs)
    assert info.value.render().count("error:") == 4


def test_builtin_call_errors():
    assert errors("out = meen(a)") == ["unknown function 'meen'; did you mean 'mean'?"]
    assert errors("x = a - b\nout = x(a)") == ["'x' is not a function"]
    assert errors("out = a + norm") == ["'norm' is a built-in function, not a value; call it: norm(...)"]
    assert errors("out = mean()") == ["mean() takes at least 1 argument, got 0"]
    assert errors("out = (a - b)*norm(a, b)") == ["norm() takes 1 argument, got 2"]
    assert errors("out = (a - b)*dot(a - b)") == ["dot() is missing argument 'b'"]
    assert errors("out = (a - b)*dot(a - b, x=a)") == [
        "dot() has no argument 'x'",
        "dot() is missing argument 'b'",
    ]
    assert errors("out = (a - b)*dot(a=a - b, b=a - c, a=a)") == ["duplicate keyword argument 'a' in dot()"]
    assert errors("out = sum(a - c, b)") == ["argument 2 of sum() must be a task vector, got a model"]
    assert errors("out = mean(a, b - c)") == [
        "the arguments of mean() must be all models or all task vectors, got a model (argument 1) "
        "and a task vector (argument 2)"
    ]
    assert errors("out = load(path)") == ["argument 'path' of load() must be a string in quotes"]
    assert errors("out = (a - b)*norm('x')") == [
        "argument 'x' of norm() must be a model or a task vector, got a string"
    ]
    assert errors("out = (a - b)*norm(2)") == ["argument 'x' of norm() must be a model or a task vector, got a number"]


def test_sum_of_models_suggests_mean():
    with pytest.raises(TvlangError) as info:
        checked("out = sum(a, b - a)")
    assert info.value.message == "argument 1 of sum() must be a task vector, got a model"
    assert "use mean(a, b) to average models" in info.value.notes[0]


# -- a made-up operator row: the checker is table-driven -------------------------------

FAKE = Builtin(
    "fakemerge",
    variadic=Arg("deltas", "delta"),
    min_variadic=2,
    options=(
        Arg("density", "scalar", 0.2),
        Arg("method", "string", "sum", choices=("sum", "mean")),
        Arg("rescale", "bool", True),
        Arg("schedule", "list", None),
        Arg("seed", "int", 0),
        Arg("scale", "scalar", -1),
        Arg("strength", "scalar"),
    ),
    result="delta",
)
PAIR = Builtin("fakepair", params=(Arg("a", "model"), Arg("b", "model")), options=(Arg("t", "scalar", 0.5),))


@pytest.fixture
def fake_rows(monkeypatch):
    monkeypatch.setitem(BUILTINS, "fakemerge", FAKE)
    monkeypatch.setitem(BUILTINS, "fakepair", PAIR)


def test_bind_call_fills_defaults(fake_rows):
    bound = bind_call(parse_expression("fakemerge(a - p, b - p, strength=2, method='mean')"))
    assert isinstance(bound, BoundCall) and bound.builtin is FAKE
    assert bound.varargs == (parse_expression("a - p"), parse_expression("b - p"))
    assert bound.args == {
        "strength": ast.Number(2.0),
        "method": ast.String("mean"),
        "density": ast.Number(0.2),
        "rescale": ast.Bool(True),
        "seed": ast.Number(0.0),
        "scale": ast.Neg(ast.Number(1.0)),
    }
    assert "schedule" not in bound.args  # default None: absent
    pair = bind_call(parse_expression("fakepair(x, y, 0.3)"))
    assert pair.args == {"a": ast.Name("x"), "b": ast.Name("y"), "t": ast.Number(0.3)}
    assert pair.varargs == ()


def test_bind_call_errors(fake_rows):
    with pytest.raises(TvlangError, match="fakepair\\(\\) takes 2 to 3 arguments, got 4"):
        bind_call(parse_expression("fakepair(x, y, 0.3, 4)"))
    with pytest.raises(TvlangError, match="unknown function 'fakepar'; did you mean 'fakepair'"):
        bind_call(parse_expression("fakepar(x, y)"))


def test_table_driven_options(fake_rows):
    good = "param d = 0.1\nout = p + fakemerge(a - p, b - p, density=2*d, strength=1, schedule=[0, d, 1], seed=3)"
    assert kinds(good) == {"out": "model"}
    base = "out = p + fakemerge(a - p, b - p, strength=1, "
    assert errors(base + "method='sun')") == [
        "argument 'method' of fakemerge() must be one of 'sum', 'mean', got 'sun'; did you mean 'sum'?"
    ]
    assert errors(base + "density=norm(a - p))") == [
        "argument 'density' of fakemerge() must be a number known before the run (a literal, a param, "
        "or arithmetic on them); this one is computed from weights"
    ]
    assert errors(base + "density=a)") == ["argument 'density' of fakemerge() must be a number, got a model"]
    assert errors(base + "rescale=1)") == ["argument 'rescale' of fakemerge() must be true or false"]
    assert errors(base + "schedule=1)") == [
        "argument 'schedule' of fakemerge() must be a list of numbers, like [0.2, 0.5, 1]"
    ]
    assert errors(base + "schedule=[1, a])") == [
        "item of argument 'schedule' of fakemerge() must be a number, got a model"
    ]
    assert errors(base + "seed=1.5)") == ["argument 'seed' of fakemerge() must be a whole number"]
    assert errors(base + "densty=0.3)") == ["fakemerge() has no argument 'densty'; did you mean 'density'?"]
    assert errors("out = p + fakemerge(a - p, b - p)") == ["fakemerge() is missing argument 'strength'"]
    assert errors("out = p + fakemerge(a - p, strength=1)") == ["fakemerge() takes at least 2 arguments, got 1"]
    assert errors("out = fakepair(x, y - x)") == [
        "argument 'b' of fakepair() must be a model, got a task vector"
    ]
    assert kinds("out = fakepair(x, y, t=0.3)") == {"out": "model"}  # result "same" of two models


def test_deep_programmatic_ast_is_checked_without_recursion():
    expr: ast.Expr = ast.Name("a")
    for _ in range(5000):
        expr = ast.Neg(expr)
    program = ast.Program((ast.Out(None, expr),))
    assert check(program, source="").outputs[0].kind == "model"  # -(-a), 2500 times
    with pytest.raises(TvlangError, match="model coefficients sum to -1"):
        check(ast.Program((ast.Out(None, ast.Neg(expr)),)), source="")
