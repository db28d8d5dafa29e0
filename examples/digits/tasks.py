"""The digits tasks: scikit-learn's bundled 8x8 digits under fixed image transformations.

Every task shares the same ten labels and the same images; a task differs only in the
fixed transformation applied to each image (a rotation, a flip, an intensity inversion,
a fixed pixel permutation, ...). The train/validation/test split is made once, on image
indices, so a test image of one task is a test image of every task.

>>> data = load_data(seed=0)
>>> sorted(data.split_sizes().items())
[('test', 360), ('train', 1077), ('val', 360)]
>>> x, y = data.task_split("plain", "val")
>>> tuple(x.shape), tuple(y.shape), float(x.min()) >= 0.0, float(x.max()) <= 1.0
((360, 64), (360,), True, True)
>>> bool((data.task_split("rot180", "val")[0][0].view(8, 8) == x[0].view(8, 8).flip(0, 1)).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = [
    "ANALOGY_GRID",
    "CONTROL_TASK",
    "EDIT_TASKS",
    "QUICK_EDIT_TASKS",
    "TRANSFORMS",
    "DigitsData",
    "load_data",
]

Image = np.ndarray  # (n, 8, 8) float32 in [0, 1]


def _shift(images: Image) -> Image:
    # Translate two pixels right and one down, filling with background (zeros).
    out = np.zeros_like(images)
    out[:, 1:, 2:] = images[:, :-1, :-2]
    return out


# A fixed permutation of the 64 pixels, drawn once from its own seed so that it does not
# depend on the experiment's seed: the task is the same task in every run.
_PERMUTATION = np.random.default_rng(1234).permutation(64)


def _permute(images: Image) -> Image:
    flat = images.reshape(len(images), 64)[:, _PERMUTATION]
    return flat.reshape(-1, 8, 8)


def _rot(k: int) -> Callable[[Image], Image]:
    return lambda images: np.rot90(images, k=k, axes=(1, 2))


def _invert(images: Image) -> Image:
    return 1.0 - images


def _compose(*fs: Callable[[Image], Image]) -> Callable[[Image], Image]:
    def composed(images: Image) -> Image:
        for f in fs:
            images = f(images)
        return images

    return composed


TRANSFORMS: dict[str, Callable[[Image], Image]] = {
    "plain": lambda images: images,
    "rot90": _rot(1),
    "rot180": _rot(2),
    "rot270": _rot(3),
    "hflip": lambda images: images[:, :, ::-1],
    "vflip": lambda images: images[:, ::-1, :],
    "transpose": lambda images: np.transpose(images, (0, 2, 1)),
    "invert": _invert,
    "shift": _shift,
    "permute": _permute,
    "rot90_invert": _compose(_rot(1), _invert),
    "rot270_invert": _compose(_rot(3), _invert),
}

# The pre-training task, and the control task of the forgetting experiment.
CONTROL_TASK = "plain"

# The tasks of the negation and addition experiments (eight, as in the paper).
EDIT_TASKS = ("rot90", "rot180", "hflip", "vflip", "transpose", "invert", "shift", "permute")
QUICK_EDIT_TASKS = ("rot90", "hflip", "invert", "permute")

# The analogy grid: rotation {90, 270} x intensity {normal, inverted}. No cell is the
# pre-training distribution, so every task vector in the analogy is a real fine-tune.
# ANALOGY_GRID[(rotation, intensity)] = task name.
ANALOGY_GRID = {
    ("rot90", "normal"): "rot90",
    ("rot90", "inverted"): "rot90_invert",
    ("rot270", "normal"): "rot270",
    ("rot270", "inverted"): "rot270_invert",
}


@dataclass
class DigitsData:
    """The digits images (n, 8, 8) in [0, 1], labels, and split indices."""

    images: Image
    labels: np.ndarray
    splits: dict[str, np.ndarray]

    def split_sizes(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.splits.items()}

    def task_split(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (n, 64) float32 and labels (n,) int64 of one task on one split."""
        idx = self.splits[split]
        images = TRANSFORMS[task](self.images[idx])
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32).reshape(len(idx), 64))
        y = torch.from_numpy(self.labels[idx].astype(np.int64))
        return x, y


def load_data(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> DigitsData:
    """Load the bundled digits (offline) and split them, stratified by label."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    all_idx = np.arange(len(labels))
    rest, test = train_test_split(
        all_idx, test_size=test_fraction, random_state=seed, stratify=labels
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        random_state=seed,
        stratify=labels[rest],
    )
    return DigitsData(images, labels, {"train": train, "val": val, "test": test})
