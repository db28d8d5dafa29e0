"""The digits network, its training loops, and its checkpoints.

A small MLP: a backbone ``body`` (two hidden layers) and a linear classification
``head``. The head is trained during pre-training and then frozen for every fine-tune,
as the paper freezes CLIP's zero-shot head, so all task vectors live in the backbone and
every model shares one output layer.

>>> torch.manual_seed(0) and None
>>> model = DigitsMLP(hidden=16)
>>> [name for name, _ in model.named_parameters()]
['body.0.weight', 'body.0.bias', 'body.2.weight', 'body.2.bias', 'head.weight', 'head.bias']
>>> tuple(model(torch.zeros(3, 64)).shape)
(3, 10)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DigitsMLP",
    "TrainConfig",
    "accuracy",
    "load_model",
    "model_from_state",
    "save_model",
    "train",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class DigitsMLP(nn.Module):
    """The backbone ``body``, the shared ``head``, and optionally one head per task.

    With ``task_heads``, ``forward(x, task)`` reads out through ``heads[task]`` (the
    paper's setting: every task has its own frozen classification layer); a task without a
    head of its own, or no task, uses the shared ``head``.
    """

    def __init__(self, hidden: int = 256, inputs: int = 64, classes: int = 10, task_heads=()):
        super().__init__()
        self.hidden = hidden
        self.body = nn.Sequential(
            nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, classes)
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, classes) for task in task_heads})

    @property
    def task_heads(self) -> list[str]:
        return list(self.heads)

    def readout(self, task: str | None) -> nn.Linear:
        return self.heads[task] if task is not None and task in self.heads else self.head

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        return self.readout(task)(self.body(x))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)
    freeze_head: bool = True
    # Pre-training only: random translations of up to this many pixels, and pixel noise,
    # so that the pre-trained model is a little more general than "plain digits".
    jitter: int = 0
    noise: float = 0.0


def _augment(x: torch.Tensor, jitter: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    if jitter:
        images = x.view(-1, 8, 8)
        shifts = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
        images = torch.roll(images, shifts=(shifts[0], shifts[1]), dims=(1, 2))
        x = images.reshape(-1, 64)
    if noise:
        x = (x + noise * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)
    return x


def train(
    model: DigitsMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    seed: int,
    task: str | None = None,
) -> DigitsMLP:
    """Train in place with AdamW and a cosine schedule; deterministic given ``seed``.

    ``task`` picks the readout (see :class:`DigitsMLP`); heads are frozen when
    ``config.freeze_head``, and the heads of other tasks never change.
    """
    gen = torch.Generator().manual_seed(seed)
    readout = model.readout(task)
    for p in list(model.head.parameters()) + list(model.heads.parameters()):
        p.requires_grad_(False)
    for p in readout.parameters():
        p.requires_grad_(not config.freeze_head)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x) / config.batch_size)
    total = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            xb = _augment(x[idx], config.jitter, config.noise, gen)
            loss = loss_fn(model(xb, task), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: DigitsMLP, x: torch.Tensor, y: torch.Tensor, task: str | None = None) -> float:
    model.eval()
    return float((model(x, task).argmax(dim=1) == y).float().mean())


def model_from_state(state: dict[str, torch.Tensor], hidden: int) -> DigitsMLP:
    """A network holding ``state`` (a dict of tensors, e.g. from ``plan.evaluate``);
    its per-task heads are read off the tensor names (``heads.<task>.weight``)."""
    heads = [k[len("heads.") : -len(".weight")] for k in state if k.startswith("heads.") and k.endswith(".weight")]
    model = DigitsMLP(hidden=hidden, task_heads=heads)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model.eval()
    return model


def save_model(model: DigitsMLP, directory: str | os.PathLike, *, task: str) -> Path:
    """Write ``directory/model.safetensors`` and a small ``config.json``.

    Uses tvlang's checkpoint writer (``tvlang.testing.synth.write_checkpoint``) when present.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "digits.task": task}
    config = {"model_type": "tvlang-digits-mlp", "hidden": model.hidden, "task": task,
              "task_heads": model.task_heads}
    try:  # tvlang's checkpoint writer (streaming, temporary name then rename)
        from tvlang.testing.synth import write_checkpoint
    except ImportError:  # an older tvlang: plain safetensors
        write_checkpoint = None
    if write_checkpoint is not None:
        write_checkpoint(directory, state, metadata=metadata, config=config, force=True)
    else:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / WEIGHTS_NAME), metadata=metadata)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_model(directory: str | os.PathLike) -> DigitsMLP:
    """Load a model directory written by :func:`save_model` (or by ``plan.run``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    state = load_file(str(directory / WEIGHTS_NAME))
    return model_from_state(state, hidden=int(config["hidden"]))
