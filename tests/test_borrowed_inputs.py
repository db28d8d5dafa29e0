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
from tvlang.testing.synth import module_with

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


def _module(state, dtype=None):
    """A module with a copy of each tensor of ``state`` (floats in ``dtype``, if given)."""
    return module_with({name: tensor.clone() if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
                        for name, tensor in state.items()})


APPLIED = ["pre + ties(a - pre, b - pre, density=0.5) + 0.3*(c - pre)", "pre + 0.4*(a - b) + 0.7*(c - pre)",
           "0.5*a + 0.25*b + 0.25*pre"]  # pre read last: after the result's first step in each chunk


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("recipe", APPLIED)
def test_apply_to_a_module_that_is_also_an_input(recipe, chunked, monkeypatch):
    """The module bound as ``pre`` and written in place: the same values as evaluate gives (its
    tensors are inputs, so no result is computed into them: the chunks of pre read later would
    see it)."""
    if chunked:
        monkeypatch.setattr(chunk_module, "CHUNK_MIN", 16)
        monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 24)
    models = _models()
    module = _module(models["pre"])
    expected = tvlang.compile(recipe).evaluate(models, allow_unused=True)
    bindings = dict(models, pre=module)
    assert tvlang.apply_to(module, recipe, bindings, allow_unused=True) == len(expected)
    state = module.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("recipe", APPLIED)
def test_apply_to_computes_into_the_module(recipe, monkeypatch):
    """In chunks, a result whose module tensor fits (contiguous, its dtype, not an input) is
    computed straight into that tensor, with no result buffer of tvlang's; one that does not (a
    bfloat16 module, of float32 results) gets a buffer and is copied in. The same values."""
    monkeypatch.setattr(chunk_module, "CHUNK_MIN", 16)
    monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 24)
    models = _models()
    expected = tvlang.compile(recipe).evaluate(models, allow_unused=True)
    taken = []
    from tvlang.run.buffers import OutputBuffers

    real = OutputBuffers.take
    monkeypatch.setattr(OutputBuffers, "take",
                        lambda self, numel, dtype: taken.append(numel) or real(self, numel, dtype))
    module = _module(models["pre"])
    memory = {name: tensor.data_ptr() for name, tensor in module.state_dict().items()}
    tvlang.apply_to(module, recipe, models, allow_unused=True)
    state = module.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
        assert state[name].data_ptr() == memory[name]
    assert taken == [], "every tensor of 16 entries or more was computed in the module's own memory"
    half = _module(models["pre"], torch.bfloat16)
    tvlang.apply_to(half, recipe, models, allow_unused=True)
    assert sorted(taken) == sorted(t.numel() for n, t in expected.items() if t.numel() >= 16)
    for name, tensor in expected.items():
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert torch.equal(half.state_dict()[name], want), name


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


def test_apply_to_a_module_of_other_shapes_is_left_as_it_was(monkeypatch):
    """A module tensor of the same size but another shape is an error, and nothing is computed
    into it first."""
    monkeypatch.setattr(chunk_module, "CHUNK_MIN", 16)
    monkeypatch.setattr(chunk_module, "CHUNK_ELEMENTS", 24)
    models = _models()
    module = _module({"embed": torch.zeros(16, 40)})  # the models' embed is 40 x 16
    wrong = r"tensor 'embed' is \[40, 16\] but the module's 'embed' is \[16, 40\]"
    with pytest.raises(tvlang.TvlangError, match=wrong):
        tvlang.apply_to(module, "pre + 0.5*(a - pre)", {k: {"embed": models[k]["embed"]} for k in ("pre", "a")})
    assert torch.equal(module.embed, torch.zeros(16, 40))
