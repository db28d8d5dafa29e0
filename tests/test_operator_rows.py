"""One operator = one row: an operator added from this module alone works everywhere, and
every table of operators is a view of the rows.

The toy operator ``double(d) = 2*d`` is one row, one kernel and one chunk form, all in this
file; registering the row is the only step. The pipeline (compile, check, explain, run,
evaluate, chunked programs) then finds it through the row and nothing else.
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import load_file, save_file

import tvlang
from tvlang.errors import TvlangError
from tvlang.faces.cli import main
from tvlang.language.builtins import BUILTINS, REQUIRED, Arg, Builtin, register, resolve, unregister
from tvlang.ops.chunks import ChunkKernel
from tvlang.ops.registry import CHUNKED, ELEMENTWISE, KERNELS, MULTIPASS

# -- the toy operator: a kernel, a chunk form and a row ------------------------------------

CALLS = {"kernel": 0, "pieces": 0}


def double(inputs: list[torch.Tensor], ctx) -> torch.Tensor:
    """The kernel: twice its input."""
    CALLS["kernel"] += 1
    return torch.mul(inputs[0], 2.0)


class _DoublePieces(ChunkKernel):
    def apply(self, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        CALLS["pieces"] += 1
        torch.mul(pieces[0], 2.0, out=out)


def double_chunks(ctx, numel: int, n_inputs: int, dtype: torch.dtype) -> ChunkKernel:
    """The chunk form: twice each piece."""
    return _DoublePieces()


DOUBLE = Builtin(
    "double",
    params=(Arg("d", "delta"),),
    result="delta",
    summary="twice a task vector (a test's own operator)",
    reference="tests/test_operator_rows.py",
    kernel=f"{__name__}:double",
    chunk_form=f"{__name__}:double_chunks",
    elementwise=True,
)


@pytest.fixture
def toy():
    """``double`` registered for one test (``DOUBLE`` by default, or a variant), then removed."""
    registered: list[str] = []

    def add(row: Builtin = DOUBLE) -> Builtin:
        register(row)
        registered.append(row.name)
        return row

    CALLS.update(kernel=0, pieces=0)
    yield add
    unregister(*registered)


VIEWS = {"KERNELS": KERNELS, "CHUNKED": CHUNKED, "ELEMENTWISE": ELEMENTWISE, "MULTIPASS": MULTIPASS}


NAMES = ["model.embed.weight", "model.layers.0.mlp.weight", "model.norm.weight"]


def _models(shapes=((6, 4), (5, 5), (7,))):
    g = torch.Generator().manual_seed(5)
    pre = {n: torch.randn(s, generator=g) for n, s in zip(NAMES, shapes)}
    ft = {n: pre[n] + torch.randn(s, generator=g) for n, s in zip(NAMES, shapes)}
    return pre, ft


# -- the toy operator through every face of the pipeline -------------------------------------

def test_a_registered_row_is_usable_from_a_recipe(toy, tmp_path):
    toy()
    pre, ft = _models()
    recipe = "pre + 0.5*double(ft - pre)"
    out = tvlang.compile(recipe).evaluate({"pre": pre, "ft": ft})
    for n in NAMES:
        assert torch.allclose(out[n], pre[n] + 0.5 * 2.0 * (ft[n] - pre[n]), atol=1e-6), n
    assert CALLS["kernel"] == len(NAMES)  # whole tensors: one kernel call per tensor

    save_file(pre, tmp_path / "pre.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    tvlang.compile(recipe).run({"pre": tmp_path / "pre.safetensors", "ft": tmp_path / "ft.safetensors"},
                               out=tmp_path / "out.safetensors")
    written = load_file(tmp_path / "out.safetensors")
    assert all(torch.allclose(written[n], out[n]) for n in NAMES)


def test_check_and_explain_know_the_row(toy, capsys):
    toy()
    binds = ["--bind", "pre=model", "--bind", "ft=model"]
    assert main(["check", "-e", "pre + double(ft - pre)", *binds]) == 0
    assert main(["check", "-e", "pre + double(ft)", *binds]) == 1
    assert "argument 'd' of double() must be a task vector, got a model" in capsys.readouterr().err
    assert main(["explain", "-e", "pre + double(ft - pre)"]) == 0
    assert "= double(b" in capsys.readouterr().out


def test_an_unregistered_row_is_gone(capsys):
    register(DOUBLE)
    unregister("double")
    assert "double" not in BUILTINS and all("double" not in view for view in VIEWS.values())
    assert main(["check", "-e", "pre + double(ft - pre)"]) == 1
    assert "unknown function 'double'" in capsys.readouterr().err


def _chunk_in(monkeypatch, elements: int) -> None:
    """Programs over tensors of 7 entries or more run in chunks of ``elements`` entries."""
    from tvlang.run import chunked

    monkeypatch.setattr(chunked, "CHUNK_MIN", 7)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", elements)


def test_the_chunk_form_runs_in_chunked_programs(toy, monkeypatch):
    toy()
    pre, ft = _models()
    recipe = "pre + double(ft - pre)"
    whole = tvlang.compile(recipe).evaluate({"pre": pre, "ft": ft})
    assert CALLS["pieces"] == 0
    _chunk_in(monkeypatch, 8)
    chunked = tvlang.compile(recipe).evaluate({"pre": pre, "ft": ft})
    assert CALLS["pieces"] == sum(-(-pre[n].numel() // 8) for n in NAMES)  # every piece of every tensor
    assert all(torch.equal(chunked[n], whole[n]) for n in NAMES)


def test_an_elementwise_row_without_chunk_form_runs_its_kernel_on_pieces(toy, monkeypatch):
    toy(dataclasses.replace(DOUBLE, chunk_form=None))
    assert "double" in ELEMENTWISE and "double" not in CHUNKED
    pre, ft = _models()
    _chunk_in(monkeypatch, 8)
    out = tvlang.compile("pre + double(ft - pre)").evaluate({"pre": pre, "ft": ft})
    assert CALLS["kernel"] == sum(-(-pre[n].numel() // 8) for n in NAMES)
    assert all(torch.allclose(out[n], pre[n] + 2.0 * (ft[n] - pre[n]), atol=1e-6) for n in NAMES)


def test_options_and_their_checks_come_from_the_row(toy):
    row = toy(dataclasses.replace(DOUBLE, options=(Arg("by", "scalar", 2.0, range=(0.0, 4.0)),),
                                  kernel=f"{__name__}:times", chunk_form=None))
    assert row.complete({}) == {"by": 2.0}
    pre, ft = _models()
    out = tvlang.compile("pre + double(ft - pre, by=3)").evaluate({"pre": pre, "ft": ft})
    assert torch.allclose(out[NAMES[0]], pre[NAMES[0]] + 3.0 * (ft[NAMES[0]] - pre[NAMES[0]]), atol=1e-6)
    with pytest.raises(TvlangError, match=r"double: option 'by' must be in \[0, 4\], got 5"):
        tvlang.compile("pre + double(ft - pre, by=5)").explain()


def times(inputs: list[torch.Tensor], ctx, *, by: float) -> torch.Tensor:
    return torch.mul(inputs[0], by)


# -- every table is a view of the rows --------------------------------------------------------

def test_every_row_is_whole():
    assert len(BUILTINS) >= 19
    for row in BUILTINS.values():
        assert row.problems() == [], row.name


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_derived_views_name_only_rows(view):
    names = set(VIEWS[view])
    assert names, f"{view} is empty"
    assert names <= set(BUILTINS), f"{view} names what is not a row: {sorted(names - set(BUILTINS))}"
    if isinstance(VIEWS[view], Mapping):
        for name in names:
            assert callable(VIEWS[view][name]), f"{view}[{name!r}] resolves to nothing callable"


def test_every_reference_of_every_row_resolves():
    for row in BUILTINS.values():
        for reference in (row.kernel, row.chunk_form):
            if reference is not None:
                assert callable(resolve(reference)), f"{row.name}: {reference}"
        if row.reductions is not None:
            everything = {arg.name: arg.default for arg in row.constant_args()} | {"density": 0.5, "scope": "model"}
            for reduction in row.reductions(row.complete(everything), 2):
                assert callable(resolve(reduction.reducer)), f"{row.name}: {reduction.reducer}"
                assert set(reduction.inputs) <= {0, 1}


def test_views_agree_with_the_rows():
    tensor = {n for n, r in BUILTINS.items() if r.stage == "tensor"}
    assert set(KERNELS) == tensor
    assert set(CHUNKED) == {n for n, r in BUILTINS.items() if r.chunk_form is not None}
    assert set(MULTIPASS) <= set(CHUNKED)
    assert set(ELEMENTWISE) >= {"mean", "sum", "select", "pick", "schedule", "ram"}
    assert set(MULTIPASS) == {"ties", "topk", "breadcrumbs", "multislerp", "karcher", "nuslerp", "slerp", "model_stock",
                              "random_like", "sce", "ramplus_tl", "arcee_fusion"}
    assert set(CHUNKED) >= {"dare", "dare_ties", "dare_linear", "ties", "topk", "breadcrumbs"}
    assert {n for n, r in BUILTINS.items() if r.reductions is not None} == {"ties", "topk"}


def test_views_follow_registration(toy):
    before = {name: set(view) for name, view in VIEWS.items()}
    toy()
    assert {name: set(view) - before[name] for name, view in VIEWS.items()} == {
        "KERNELS": {"double"}, "CHUNKED": {"double"}, "ELEMENTWISE": {"double"}, "MULTIPASS": set(),
    }
    assert KERNELS["double"] is double


# -- a row that lacks a part is refused ---------------------------------------------------------

TENSOR = dict(params=(Arg("d", "delta"),), result="delta", summary="toy", kernel="tests.toy:kernel")
BAD_ROWS = [
    (dict(TENSOR, kernel=None), "a 'tensor' built-in needs a kernel"),
    (dict(TENSOR, kernel="toy.kernel"), "kernel 'toy.kernel' is not a 'module:attr' reference"),
    (dict(TENSOR, chunk_form="chunks"), "chunk_form 'chunks' is not a 'module:attr' reference"),
    (dict(TENSOR, summary=""), "no summary"),
    (dict(TENSOR, multipass=True), "multipass describes a chunk form, and there is none"),
    (dict(TENSOR, stage="reduce", result="scalar", elementwise=True), "elementwise is only for 'tensor' built-ins"),
    (dict(TENSOR, stage="source", result="model"), "a 'source' built-in has no kernel"),
    (dict(TENSOR, stage="lazy"), "stage 'lazy' is not one of"),
    (dict(TENSOR, result="tensor"), "result 'tensor' is not one of"),
    (dict(TENSOR, options=(Arg("p", "scalar", 2.0, range=(0.0, 1.0)),)),
     "argument 'p': the default: option 'p' must be in [0, 1], got 2"),
    (dict(TENSOR, options=(Arg("how", "string", "x", ("a", "b")),)),
     "argument 'how': the default: option 'how' must be one of 'a', 'b', got 'x'"),
    (dict(TENSOR, options=(Arg("w", "list", (), "a doc passed as choices"),)), "argument 'w': choices are for strings"),
    (dict(TENSOR, options=(Arg("n", "number"),)), "argument 'n': kind 'number' is not one of"),
    (dict(TENSOR, options=(Arg("d", "scalar"),)), "argument 'd' appears twice"),
    (dict(TENSOR, kind_hints=(("scalar", "use a vector"),)), "kind hint for 'scalar'"),
]


@pytest.mark.parametrize("fields, problem", BAD_ROWS, ids=[p for _, p in BAD_ROWS])
def test_register_refuses_a_row_that_is_not_whole(fields, problem):
    row = Builtin("toy", **fields)
    assert any(problem in p for p in row.problems()), row.problems()
    with pytest.raises(ValueError, match="built-in 'toy'"):
        register(row)
    assert "toy" not in BUILTINS


def test_register_refuses_a_name_twice(toy):
    toy()
    with pytest.raises(ValueError, match="registered twice"):
        register(DOUBLE)


# -- defaults are written once: in the row ------------------------------------------------------

def _own(function):
    return getattr(function, "__wrapped__", function)


@pytest.mark.parametrize("name", sorted(n for n in KERNELS if n in BUILTINS))
def test_kernels_and_chunk_forms_write_no_defaults(name):
    forms = [KERNELS[name]] + ([CHUNKED[name]] if name in CHUNKED else [])
    for form in forms:
        defaults = {p.name: p.default for p in inspect.signature(_own(form)).parameters.values()
                    if p.default is not inspect.Parameter.empty}
        assert defaults == {}, f"{name}: defaults belong in the row, not in {form.__qualname__}{defaults}"


def test_a_kernel_called_directly_takes_the_row_defaults():
    from tvlang.ops.context import TensorContext

    a, b = torch.randn(40), torch.randn(40)
    ctx = TensorContext("w")
    row = BUILTINS["ties"]
    assert torch.equal(KERNELS["ties"]([a, b], ctx), KERNELS["ties"]([a, b], ctx, **row.complete({})))
    assert row.complete({})["density"] == 0.2
    with pytest.raises(TypeError, match="unknown options"):
        KERNELS["ties"]([a, b], ctx, densty=0.2)
    with pytest.raises(TvlangError, match="option 'seed' must be an integer") as info:
        KERNELS["dare"]([a], ctx, p=0.5, seed=0.5)
    assert info.value.tensor == "w"
    required = [arg.name for arg in BUILTINS["dare"].constant_args() if arg.default is REQUIRED]
    assert required == ["p"]


def test_the_table_is_complete_on_import_without_torch_or_kernels():
    code = ("import sys, tvlang.language.builtins as b\n"
            "print(len(b.BUILTINS), 'torch' in sys.modules, any(m.startswith('tvlang.ops') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(BUILTINS)), "False", "False"]
