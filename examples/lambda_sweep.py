"""A lambda sweep through the Python API: one compiled plan, re-run with other params.

    python examples/make_checkpoints.py
    python examples/lambda_sweep.py [CHECKPOINTS_DIR]

The task analogy of examples/yelp_analogy.tv builds a Yelp sentiment model
with no Yelp sentiment data. The example checkpoints include the held-out
model that the analogy aims at (t5-yelp-sent), so the sweep can measure how far
each edit lands from it; with real models you would score each edit on
validation data instead. ``plan.with_params`` re-uses the parsed recipe; only
the coefficients change.
"""

from __future__ import annotations

import os
import sys

import torch

import tvlang

RECIPE = """\
param lam = 0.5
out = pre + lam*(yelp_lm - amazon_lm) + lam*(amazon_sent - pre)
"""


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Euclidean distance between two state dicts (float tensors)."""
    total = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point())
    return total ** 0.5


def sweep(checkpoints: str, values=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25)) -> list[tuple[float, float]]:
    from safetensors.torch import load_file

    path = lambda name: os.path.join(checkpoints, name)  # noqa: E731
    bindings = {"pre": path("t5-base"), "yelp_lm": path("t5-yelp-lm"),
                "amazon_lm": path("t5-amazon-lm"), "amazon_sent": path("t5-amazon-sent")}
    target = load_file(os.path.join(path("t5-yelp-sent"), "model.safetensors"))
    plan = tvlang.compile(RECIPE)
    rows = []
    for lam in values:
        edited = plan.with_params(lam=lam).evaluate(bindings)
        rows.append((lam, distance(edited, target)))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    checkpoints = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
    print("lam   distance to t5-yelp-sent")
    for lam, dist in sweep(checkpoints):
        print(f"{lam:<5} {dist:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
