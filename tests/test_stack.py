"""Layer surgery in the language: ``load(PATH, layers=[START, END])`` and ``stack(...)``.

The streamed result is compared with a naive eager one (every checkpoint loaded, the stack
built by hand with its renumbered names), and the output directory's config.json carries
the stack's layer count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from tvlang.errors import TvlangError
from tvlang.testing.synth import finetune_like, llama_spec, make_state_dict, write_checkpoint

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("stack")
    spec = {k: v for k, v in llama_spec(8, LAYERS, 16, 12).items() if k != "model.position_ids"}
    base = make_state_dict(spec, seed=0)
    states = {"base": base, "a": finetune_like(base, seed=1, scale=0.1), "b": finetune_like(base, seed=2, scale=0.1)}
    for name, state in states.items():
        write_checkpoint(root / name, state, config={"model_type": "llama", "num_hidden_layers": LAYERS,
                                                     "hidden_size": 8})
    return root, states


def naive_stack(parts: list[tuple[dict[str, torch.Tensor], int, int]]) -> dict[str, torch.Tensor]:
    """Written from the docs: layers in turn, embeddings from the first part, the rest from the last."""
    out = {}
    first, last = parts[0][0], parts[-1][0]
    offset = 0
    for state, start, end in parts:
        for name, tensor in state.items():
            bits = name.split(".")
            if len(bits) > 2 and bits[1] == "layers" and start <= int(bits[2]) < end:
                bits[2] = str(offset + int(bits[2]) - start)
                out[".".join(bits)] = tensor
        offset += end - start
    for name in first:
        if ".layers." not in name:
            out[name] = (first if "embed" in name else last)[name]
    return out


def test_a_stack_streams_as_the_naive_stack(models, tmp_path):
    root, states = models
    recipe = ('a_head = load("a", layers=[0, 3])\n'
              'out = stack(a_head, load("b", layers=[1, 4]))\n')
    (root / "r.tv").write_text(recipe)
    plan = tvlang.compile(recipe, filename=str(root / "r.tv"))
    plan.run({}, str(tmp_path / "out"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = naive_stack([(states["a"], 0, 3), (states["b"], 1, 4)])
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_stacks_merge_layer_by_layer(models):
    root, states = models
    recipe = ('sa = stack(load("a", layers=[0, 2]), load("b", layers=[2, 4]))\n'
              'sb = stack(load("b", layers=[0, 2]), load("a", layers=[2, 4]))\n'
              'base = load("base")\n'
              'out = base + 0.25*(sa - base) + 0.5*(sb - base)\n')
    got = tvlang.compile(recipe, filename=str(root / "r.tv")).evaluate({})
    sa = naive_stack([(states["a"], 0, 2), (states["b"], 2, 4)])
    sb = naive_stack([(states["b"], 0, 2), (states["a"], 2, 4)])
    base = states["base"]
    assert sorted(got) == sorted(base)
    for name in base:
        expected = base[name] + 0.25 * (sa[name] - base[name]) + 0.5 * (sb[name] - base[name])
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)


def test_a_stack_in_chunks_equals_it_whole(models, monkeypatch):
    root, _ = models
    recipe = 'out = slerp(stack(load("a", layers=[0, 2]), load("b", layers=[0, 2])), load("base", layers=[0, 4]), 0.3)'
    whole = tvlang.compile(recipe, filename=str(root / "r.tv")).evaluate({})
    from tvlang.run import chunked

    monkeypatch.setattr(chunked, "CHUNK_MIN", 1)
    streamed = tvlang.compile(recipe, filename=str(root / "r.tv")).evaluate({})
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)


def test_a_range_beyond_the_model_is_an_error_at_the_load(models):
    root, _ = models
    plan = tvlang.compile('out = stack(load("a", layers=[2, 9]))', filename=str(root / "r.tv"))
    with pytest.raises(TvlangError) as caught:
        plan.evaluate({})
    assert caught.value.message.startswith("layers=[2, 9] is beyond the 4 layers of")
    assert caught.value.span is not None and caught.value.span.column == 13  # the part's load


NOT_A_LOAD = "a part of stack is a load(PATH, layers=[START, END]) call"


@pytest.mark.parametrize("recipe, message", [
    ('out = stack(mean(load("a"), load("b")))', NOT_A_LOAD),
    ('x = 0.5*load("a") + 0.5*load("b")\nout = stack(load("a"), x)', NOT_A_LOAD),
    ('out = stack(load("a"), load_delta("d"))', "argument 2 of stack() must be a model, got a task vector"),
    ('out = load("a", layers=[3, 1])', "layers is [START, END], whole numbers with 0 <= START < END"),
    ('out = load("a", layers=[0, 1, 2])', "layers is [START, END]"),
])
def test_what_a_stack_cannot_be_is_an_error_before_any_read(recipe, message):
    with pytest.raises(TvlangError, match=re.escape(message)):
        tvlang.compile(recipe)


def test_explain_says_what_a_stack_takes():
    text = tvlang.compile('out = stack(load("a", layers=[0, 2]), load("b"))').explain()
    assert ('stack(load("a", layers=[0, 2]), load("b")): layers 0-1 of load("a"), then every layer of load("b"), '
            "renumbered from 0; embeddings from the first part") in text


def test_a_stack_merged_with_a_model_of_other_layers_says_so(models):
    root, _ = models
    plan = tvlang.compile('s = stack(load("a", layers=[0, 3]), load("b", layers=[1, 4]))\n'
                          'out = slerp(s, load("base"), 0.5)\n', filename=str(root / "r.tv"))
    with pytest.raises(TvlangError) as caught:
        plan.evaluate({})
    missing = "tensor 'model.layers.4.self_attn.q_proj.weight' is in s but missing from"
    assert caught.value.message == f"{missing} {root}/base"
    assert caught.value.notes[0] == f"s has 6 layers and {root}/base 4: merge models (or stacks) with as many layers"



def layer_counts(recipe: str) -> list[tuple[str, int | None]]:
    from tvlang.language.checker import check
    from tvlang.language.syntax import parse

    return [(o.name, o.layers) for o in check(parse(recipe), source=recipe).outputs]


@pytest.mark.parametrize("recipe, column, message", [
    ('s = stack(load("a", layers=[0, 3]), load("b", layers=[1, 4]))\n'
     'out = slerp(s, stack(load("base", layers=[0, 4])), 0.5)\n', 7,
     "'s' has 6 layers and 'stack(load(\"base\", layers=[0, 4]))' 4"),
    ('out = stack(load("a", layers=[0, 2])) + 0.5*(load("b", layers=[0, 3]) - load("a", layers=[0, 3]))\n', 7,
     "'stack(load(\"a\", layers=[0, 2]))' has 2 layers and '0.5*(load(\"b\", layers=[0, 3]) - load(...' 3"),
])
def test_the_checker_knows_a_stacks_layer_count(recipe, column, message):
    """Counts the recipe gives (ranges, stacks of them) are checked before any file is opened:
    two that differ cannot merge entry by entry."""
    with pytest.raises(TvlangError) as caught:
        tvlang.compile(recipe)
    assert caught.value.message == (f"{message}: merged entry by entry, the layers past the smaller count have "
                                    "no counterpart")
    assert caught.value.span.column == column
    assert caught.value.span.line == recipe.count("\n")


def test_a_layer_count_known_from_the_recipe_or_only_from_the_files():
    assert layer_counts('out = stack(load("orca", layers=[0, 24]), load("platy", layers=[20, 40]))') == [("out", 44)]
    assert layer_counts('out = stack(load("a", layers=[0, 2]), load("b"))') == [("out", None)]  # every layer of b
    assert layer_counts('out = slerp(load("a"), stack(load("b", layers=[0, 3])), 0.5)') == [("out", 3)]
    assert layer_counts('x = load("a", layers=[0, 2])\n'
                        'out = x + 0.5*(stack(load("b", layers=[0, 1]), load("a", layers=[3, 4])) - x)\n'
                        ) == [("out", 2)]
