"""In-memory inputs are read in place (no copy) and never changed, nor handed back as results.

``StateDictReader.read`` returns the caller's own tensor (tvlang.io.torch_file): the executor
must then never change one in place (tvlang.run.whole's borrowed slots, the chunked
interpreter's unowned reads) and never return one as a result (tvlang.run.session). Every
recipe below runs on dicts bound directly, with task vectors bound as deltas so that a
kernel gets the caller's tensor itself; the inputs must come out bit for bit as they went
in, and the results must equal those of the same recipe over copies of the inputs, with no
result sharing memory with an input.
"""

import pytest
import torch

import tvlang
from tvlang.run import chunked as chunk_module

SHAPES = {"embed": (40, 16), "layers.0.w": (16, 16), "layers.1.w": (16, 16), "norm": (16,)}


def _models():
    gen = torch.Generator().manual_seed(11)
    models = {}
    for name in ("pre", "a", "b", "c"):
        models[name] = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        models[name]["steps"] = torch.tensor([3])
    for name in ("ta", "tb", "tc"):
        models[name] = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    return models


def _bindings(models):
    return {k: tvlang.delta(v) if k.startswith("t") else v for k, v in models.items()}


RECIPES = [
    # kernels that can hand back their input, or a view of it, with a step after that updates in place
    'pick("layers.*", a, b) + 0.5*(c - pre)',
    'select(ta, "layers.0.*") + tb',
    "sum(ta) + tb",
    "mean(ta) + 2*tb",
    "pre + topk(ta, 1.0) + tb",
    "pre + dare(ta, 0.0, seed=1) + tb",
    "pre + ties(ta) + 0.3*tb",
    "slerp(a, b, 0.0) + 0.1*(c - pre)",
    "nearswap(a, b, 0.0) + 0.1*(c - pre)",
    "pre + schedule(ta, [1, 1]) + tb",
    "a",
    "pre",
    "2*pre - pre",
    # every other kernel on the caller's tensors directly
    "pre + ties(ta, tb, tc, density=0.3)",
    "pre + dare_ties(ta, tb, tc, p=0.5, seed=2)",
    'pre + dare(ta, 0.5, seed=3, rescale_by="l1") + dare_linear(tb, tc, p=0.5)',
    "pre + breadcrumbs(ta, density=0.3, gamma=0.05) + topk(tb, density=0.2)",
    "pre + della(ta, tb, tc, density=0.4, epsilon=0.2, seed=3)",
    "pre + della_linear(ta, tb, density=0.5, epsilon=0.1, seed=6)",
    "pre + ram(ta, tb, tc, epsilon=0.05) + ramplus_tl(ta, tb, epsilon=0.05)",
    "pre + sce(ta, tb, tc, select_topk=0.5)",
    "pre + random_like(ta, seed=4) + lowrank(tb, 2)",
    "pre + multislerp(ta, tb, tc) + karcher(ta, tb)",
    "nuslerp(a, b, 0.4)",
    "model_stock(pre, a, b, c)",
    "arcee_fusion(pre, a)",
    "pre + (1/norm(ta))*ta + cos(ta, tb)*tb + dot(ta, tc)*tc",
    'pre + ties(ta, tb, density=0.3, scope="model") + topk(tc, 0.2, scope="model")',
]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("text", RECIPES)
def test_inputs_are_read_in_place_and_never_changed(text, chunked, monkeypatch):
    if chunked:  # every tensor of 16 entries or more in chunks of 24
        monkeypatch.setattr(chunk_module, "CHUNK_MIN", 16)
        monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 24)
    models = _models()
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in models.items()}
    plan = tvlang.compile(text)
    result = plan.evaluate(_bindings(models), allow_unused=True)
    for key, model in models.items():
        for name, tensor in model.items():
            assert torch.equal(tensor, before[key][name]), (key, name)
    inputs = {t.untyped_storage().data_ptr() for v in models.values() for t in v.values()}
    for name, tensor in result.items():
        assert tensor.untyped_storage().data_ptr() not in inputs, name
    # the same recipe over copies, which no change could reach
    copies = {k: {n: t.clone() for n, t in v.items()} for k, v in before.items()}
    expected = plan.evaluate(_bindings(copies), allow_unused=True)
    assert result.keys() == expected.keys()
    for name in result:
        assert torch.equal(result[name], expected[name]), name


def test_a_result_that_is_an_input_is_a_copy():
    """``a`` alone: the result has the input's values in memory of its own."""
    models = _models()
    result = tvlang.compile("a").evaluate(models, allow_unused=True)
    for name, tensor in result.items():
        assert torch.equal(tensor, models["a"][name])
        assert tensor.data_ptr() != models["a"][name].data_ptr()
        tensor.add_(1)
    assert torch.equal(models["a"]["norm"], _models()["a"]["norm"])


def test_apply_to_a_module_that_is_also_an_input():
    """The module bound as ``pre`` and written in place: the same values as evaluate gives."""
    models = _models()
    module = torch.nn.Module()
    for name, tensor in models["pre"].items():
        parent = module
        *path, last = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_buffer(last, tensor.clone())
    recipe = "pre + ties(a - pre, b - pre, density=0.5) + 0.3*(c - pre)"
    expected = tvlang.compile(recipe).evaluate(models, allow_unused=True)
    bindings = dict(models, pre=module)
    assert tvlang.apply_to(module, recipe, bindings, allow_unused=True) == len(expected)
    state = module.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def same(inputs, ctx):
    """A kernel that hands back its input itself (an operator a user may register)."""
    return inputs[0]


def view_of(inputs, ctx):
    """One that hands back a view of its input."""
    return inputs[0].reshape(-1).view(inputs[0].shape)


@pytest.mark.parametrize("kernel", ["same", "view_of"])
def test_a_kernel_that_returns_its_input_is_not_changed_after(kernel):
    """``3*op(ta)`` scales the call's result in place (``b0 *= 3``): where the kernel gave back
    the caller's tensor, or a view of it, the scaling makes a fresh result instead."""
    from tvlang.language.builtins import Arg, Builtin, register, unregister

    register(Builtin("keep", params=(Arg("d", "delta"),), result="delta", summary="a test's identity",
                     reference="tests/test_borrowed_inputs.py", kernel=f"{__name__}:{kernel}"))
    try:
        models = _models()
        before = {n: t.clone() for n, t in models["ta"].items()}
        result = tvlang.compile("3*keep(ta)").evaluate(_bindings(models), allow_unused=True)
    finally:
        unregister("keep")
    for name, tensor in before.items():
        assert torch.equal(models["ta"][name], tensor), name
        assert torch.equal(result[name], 3 * tensor), name
