"""Make the small checkpoints and task vector bases the recipes in this folder use.

    python examples/bases/make_demo.py        # -> examples/checkpoints/bases-demo/

Writes a Llama-shaped pretrained model and seven "fine-tuned" models whose task
vectors share planted directions, named after the paper's vision tasks:
digits (mnist, svhn), satellite images (eurosat, resisc45), scenes (dtd,
sun397), and gtsrb (traffic signs: mostly the digits direction), which is kept
out of the bases as the out-of-distribution target. Then it runs

    tvlang bases --base pre.safetensors mnist=... sun397=... -o bases/

so that bases/basis_0 is the digits basis, basis_1 satellite, basis_2 scenes
(bases are numbered by their first member, in the order given).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from tvlang.testing.synth import llama_spec, make_state_dict, write_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = os.path.join(HERE, "..", "checkpoints", "bases-demo")

# task -> (skill direction, weight); every task also gets its own noise.
TASKS = {
    "mnist": ("digits", 1.0),
    "svhn": ("digits", 1.0),
    "eurosat": ("satellite", 1.0),
    "resisc45": ("satellite", 1.0),
    "dtd": ("scenes", 1.0),
    "sun397": ("scenes", 1.0),
}
TARGET = {"gtsrb": ("digits", 0.7)}
SCALE = 0.01   # size of a skill direction per entry
NOISE = 0.006  # size of a task's own part


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator per (seed, tensor name): a direction does not depend on tensor order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))


def make(root: str) -> dict[str, str]:
    spec = llama_spec(hidden=32, layers=2, vocab=64, intermediate=88)
    pre = make_state_dict(spec, seed=0)
    os.makedirs(os.path.join(root, "ft"), exist_ok=True)
    write_checkpoint(os.path.join(root, "pre.safetensors"), pre, force=True)
    skills = {s: 1000 + i for i, s in enumerate(("digits", "satellite", "scenes"))}
    paths = {}
    for index, (task, (skill, weight)) in enumerate({**TASKS, **TARGET}.items()):
        ft = {}
        for name, tensor in pre.items():
            if tensor.dtype.is_floating_point:
                shape = tuple(tensor.shape)
                direction = torch.randn(shape, generator=_generator(skills[skill], name))
                own = torch.randn(shape, generator=_generator(2000 + index, name))
                ft[name] = tensor + SCALE * weight * direction + NOISE * own
            else:
                ft[name] = tensor.clone()
        paths[task] = write_checkpoint(os.path.join(root, "ft", f"{task}.safetensors"), ft, force=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where to write (default examples/checkpoints/bases-demo)")
    args = parser.parse_args(argv)
    root = os.path.normpath(args.root)
    paths = make(root)
    from tvlang.faces.cli import main as tvlang_main

    command = ["bases", "--base", os.path.join(root, "pre.safetensors"),
               *[f"{task}={paths[task]}" for task in TASKS], "-o", os.path.join(root, "bases"), "--force"]
    print("running: tvlang " + " ".join(command))
    return tvlang_main(command)


if __name__ == "__main__":
    sys.exit(main())
