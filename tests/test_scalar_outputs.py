"""Whole-model scalars in plans: a reduction over a call that needs whole-model scalars
of its own waits for them.

Values are compared with the same merge over one tensor that holds the whole model (a
model-scope threshold is a tensor-scope one there).
"""

from __future__ import annotations

import torch

import tvlang


def _models(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"layer.0.w": (6, 5), "layer.0.b": (5,), "layer.1.w": (4, 6), "head": (7,)}
    models = {}
    for name in ("pre", "a", "b"):
        sd = {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}
        sd["steps"] = torch.tensor([3, 1], dtype=torch.int64)
        models[name] = sd
    return models


MODELS = _models()


def _whole_model_as_one_tensor(models):
    """Each model as one flat tensor, so a per-tensor merge sees the whole model."""
    names = [n for n, t in models["pre"].items() if t.is_floating_point()]
    return {key: {"all": torch.cat([sd[n].flatten() for n in names])} for key, sd in models.items()}


def test_a_vector_scaled_by_a_norm_of_a_model_scope_merge():
    # The merge needs its thresholds before the norm over it can run: three levels of work.
    text = 't = ties(a - pre, b - pre, density=0.4, scope="model")\nout = pre + t/norm(t)\n'
    plan = tvlang.compile(text)
    levels = [[task.name for task in tasks] for tasks, _ in plan.schedule.levels]
    assert levels == [["r0", "r1"], ["r2"]]  # the two thresholds, then the norm; named in pass order
    assert plan.schedule.passes == 4
    result = plan.evaluate(MODELS)
    flat = _whole_model_as_one_tensor(MODELS)
    merged = tvlang.compile("ties(a - pre, b - pre, density=0.4)").evaluate(flat)["all"]
    expected = flat["pre"]["all"] + merged / torch.linalg.vector_norm(merged.double()).float()
    got = torch.cat([result[n].flatten() for n in MODELS["pre"] if MODELS["pre"][n].is_floating_point()])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
