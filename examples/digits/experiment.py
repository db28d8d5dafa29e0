"""The three edits of Ilharco et al. (2023) on the digits tasks, made with tvlang recipes.

Training (pre-training, fine-tuning) is plain PyTorch and writes safetensors model
directories. Every edited model is then built by a tvlang recipe: ``plan.evaluate`` over
in-memory copies of the checkpoints for the lambda sweeps (one compile per recipe,
``plan.with_params(lam=...)`` per point), and ``plan.run(bindings, out=dir)`` over the
checkpoint directories for the models the sweeps select. Accuracies are computed with the
network in :mod:`examples.digits.model`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import tvlang

from .model import DigitsMLP, TrainConfig, accuracy, load_model, model_from_state, save_model, train
from .tasks import ANALOGY_GRID, CONTROL_TASK, EDIT_TASKS, QUICK_EDIT_TASKS, DigitsData, load_data

RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class Settings:
    """Everything that defines one run of the experiment."""

    quick: bool = False
    seed: int = 0
    hidden: int = 256
    pretrain_epochs: int = 40
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    edit_tasks: tuple[str, ...] = EDIT_TASKS
    forget_lambdas: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
    add_lambdas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    analogy_lambdas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(16))
    control_keep: float = 0.95  # forgetting: keep >= 95% of the pre-trained control accuracy
    random_seed: int = 0  # seed of random_like in the random-vector baseline

    @classmethod
    def for_run(cls, quick: bool, seed: int = 0) -> "Settings":
        if not quick:
            return cls(seed=seed)
        return cls(
            quick=True,
            seed=seed,
            pretrain_epochs=12,
            finetune_steps=200,
            edit_tasks=QUICK_EDIT_TASKS,
            forget_lambdas=(0.0, 0.25, 0.5, 0.75, 1.0),
            add_lambdas=(0.0, 0.25, 0.5, 0.75, 1.0),
            analogy_lambdas=(0.0, 0.5, 1.0, 1.5),
        )


# The subpopulation analogy (the paper's Sec. 5 / Appendix E.3, real/sketch x class
# subsets): domain {rot90, rot270} x class half {digits 0-4, digits 5-9}.
SUBPOP_DOMAINS = ("rot90", "rot270")
SUBPOP_HALVES = ("low", "high")  # labels 0-4, labels 5-9


def subpop_task(domain: str, half: str) -> str:
    return f"{domain}_{half}"


def _half_mask(y: torch.Tensor, half: str) -> torch.Tensor:
    return (y >= 5) if half == "high" else (y < 5)


class Evaluator:
    """Accuracy of a state dict on (task, split), with the data built once."""

    def __init__(self, data: DigitsData, hidden: int):
        self.data = data
        self.hidden = hidden
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._nets: dict[tuple[str, ...], DigitsMLP] = {}

    def xy(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (task, split)
        if key not in self._cache:
            if task.endswith("_low") or task.endswith("_high"):
                domain, half = task.rsplit("_", 1)
                x, y = self.data.task_split(domain, split)
                mask = _half_mask(y, half)
                self._cache[key] = (x[mask], y[mask])
            else:
                self._cache[key] = self.data.task_split(task, split)
        return self._cache[key]

    def accuracies(self, model: DigitsMLP, tasks, splits=("val", "test")) -> dict:
        """{split: {task: accuracy}}, each task read out through its own head if it has one."""
        return {
            split: {task: accuracy(model, *self.xy(task, split), task=task) for task in tasks}
            for split in splits
        }

    def model(self, state: dict[str, torch.Tensor]) -> DigitsMLP:
        """The network holding ``state``: one module per architecture, reloaded in place
        (valid until the next call)."""
        key = tuple(sorted(state))
        if key not in self._nets:
            self._nets[key] = model_from_state(state, self.hidden)
        else:
            self._nets[key].load_state_dict(state, strict=True)
        return self._nets[key]


@dataclass
class Workspace:
    """Where checkpoints go, and the in-memory copies bound in the sweeps."""

    root: Path
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.root / ("pre" if name == "pre" else f"ft/{name}")

    def edited(self, name: str) -> Path:
        (self.root / "edited").mkdir(parents=True, exist_ok=True)
        return self.root / "edited" / name

    def bind(self, **names: str) -> dict[str, dict[str, torch.Tensor]]:
        """Bindings for a sweep: recipe name -> the checkpoint's tensors, read once."""
        return {var: self.states[ckpt] for var, ckpt in names.items()}

    def bind_paths(self, **names: str) -> dict[str, str]:
        """Bindings for a final run: recipe name -> the checkpoint directory."""
        return {var: str(self.path(ckpt)) for var, ckpt in names.items()}


def _read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def compile_recipe(name_or_text: str, **params: float):
    """Compile a recipe file from ``recipes/`` (by file name) or a recipe text."""
    path = RECIPES / name_or_text
    if name_or_text.endswith(".tv") and path.exists():
        return tvlang.compile(path.read_text(), filename=str(path), **params)
    return tvlang.compile(name_or_text, **params)


# -- training ------------------------------------------------------------------------------


def train_all(settings: Settings, data: DigitsData, work: Workspace, log: Callable[[str], None]) -> dict:
    """Pre-train, fine-tune every task, write every checkpoint. Returns per-model info."""
    torch.manual_seed(settings.seed)
    pre = DigitsMLP(settings.hidden)
    x, y = data.task_split(CONTROL_TASK, "train")
    pre_config = TrainConfig(
        epochs=settings.pretrain_epochs, lr=2e-3, weight_decay=0.01, freeze_head=False, jitter=1, noise=0.05
    )
    train(pre, x, y, pre_config, seed=settings.seed)
    save_model(pre, work.path("pre"), task=CONTROL_TASK)
    log(f"pre-trained on {CONTROL_TASK}: {len(x)} images, {settings.pretrain_epochs} epochs")

    evaluator = Evaluator(data, settings.hidden)
    tasks = list(settings.edit_tasks)
    for name in ("rot90", "rot270", "rot90_invert", "rot270_invert"):  # the inversion analogy grid
        if name not in tasks:
            tasks.append(name)
    tasks += [subpop_task(d, h) for d in SUBPOP_DOMAINS for h in SUBPOP_HALVES]

    pre_state = {k: v.clone() for k, v in pre.state_dict().items()}
    info = {}
    for index, task in enumerate(tasks):
        model = DigitsMLP(settings.hidden)
        model.load_state_dict(pre_state)
        x, y = evaluator.xy(task, "train")
        steps_per_epoch = -(-len(x) // 64)
        epochs = max(1, round(settings.finetune_steps / steps_per_epoch))
        config = TrainConfig(epochs=epochs, lr=settings.finetune_lr, freeze_head=True)
        train(model, x, y, config, seed=settings.seed * 1000 + 100 + index)
        save_model(model, work.path(task), task=task)
        # The head is frozen: its task vector is exactly zero (checked, not assumed).
        if not (torch.equal(model.head.weight, pre.head.weight) and torch.equal(model.head.bias, pre.head.bias)):
            raise RuntimeError(f"fine-tuning {task} changed the frozen head")
        info[task] = {"train_images": len(x), "epochs": epochs, "steps": epochs * steps_per_epoch}
    log(f"fine-tuned {len(tasks)} models ({settings.finetune_steps} steps each, head frozen)")

    work.states["pre"] = _read_checkpoint(work.path("pre"))
    for task in tasks:
        work.states[task] = _read_checkpoint(work.path(task))
    return {"tasks": tasks, "finetune": info}


def _check_written(out: Path, ev: Evaluator, expected: dict[str, float]) -> None:
    """The checkpoint ``plan.run`` wrote gives the test accuracies ``plan.evaluate`` gave."""
    model = load_model(out)
    for task, want in expected.items():
        got = accuracy(model, *ev.xy(task, "test"), task=task)
        if abs(got - want) > 1e-9:
            raise RuntimeError(f"{out}: test accuracy on {task} is {got}, plan.evaluate gave {want}")


def train_multihead(settings: Settings, data: DigitsData, work: Workspace, pre_dir: Path,
                    log: Callable[[str], None]) -> dict:
    """The addition experiment's second setting: one frozen head per task, as in the paper.

    The pre-trained backbone and plain-digits head are the ones above; each edit task gets
    its own classification layer, initialized at random (seeded) and never trained, and
    each task is fine-tuned through its own head. Every checkpoint holds every head.
    """
    pre_single = load_model(pre_dir)
    torch.manual_seed(settings.seed + 77)
    pre = DigitsMLP(settings.hidden, task_heads=settings.edit_tasks)
    missing = pre.load_state_dict(pre_single.state_dict(), strict=False)
    if missing.unexpected_keys or any(not k.startswith("heads.") for k in missing.missing_keys):
        raise RuntimeError(f"cannot extend the pre-trained model: {missing}")
    save_model(pre, work.path("pre"), task=CONTROL_TASK)
    pre_state = {k: v.clone() for k, v in pre.state_dict().items()}
    info = {}
    for index, task in enumerate(settings.edit_tasks):
        model = DigitsMLP(settings.hidden, task_heads=settings.edit_tasks)
        model.load_state_dict(pre_state)
        x, y = data.task_split(task, "train")
        steps_per_epoch = -(-len(x) // 64)
        epochs = max(1, round(settings.finetune_steps / steps_per_epoch))
        config = TrainConfig(epochs=epochs, lr=settings.finetune_lr, freeze_head=True)
        train(model, x, y, config, seed=settings.seed * 1000 + 500 + index, task=task)
        save_model(model, work.path(task), task=task)
        state = model.state_dict()
        if any(not torch.equal(state[k], pre_state[k]) for k in state if not k.startswith("body.")):
            raise RuntimeError(f"fine-tuning {task} changed a frozen head")
        info[task] = {"train_images": len(x), "epochs": epochs}
    work.states["pre"] = _read_checkpoint(work.path("pre"))
    for task in settings.edit_tasks:
        work.states[task] = _read_checkpoint(work.path(task))
    log(f"one head per task: fine-tuned {len(settings.edit_tasks)} more models")
    return info


# -- forgetting via negation (Sec. 3, Table 1, Figure 9) -------------------------------------


def _select_forget(curve: list[dict], pre_control: float, keep: float) -> dict:
    """The paper's rule on validation data: among the lambdas whose control accuracy stays at
    least ``keep`` of the pre-trained model's, the lowest target accuracy (ties: largest lam)."""
    allowed = [p for p in curve if p["val"]["control"] >= keep * pre_control]
    return min(allowed, key=lambda p: (p["val"]["target"], -p["lam"]))


def forgetting(settings: Settings, ev: Evaluator, work: Workspace) -> dict:
    neg_plan = compile_recipe("forget.tv")
    rand_plan = compile_recipe("forget_random.tv", seed=float(settings.random_seed))
    results = {}
    for task in settings.edit_tasks:
        tasks = {"target": task, "control": CONTROL_TASK}

        def point(plan, lam):
            state = plan.with_params(lam=lam).evaluate(work.bind(pre="pre", ft=task))
            acc = ev.accuracies(ev.model(state), tasks.values())
            return {
                "lam": lam,
                **{split: {role: acc[split][t] for role, t in tasks.items()} for split in acc},
            }

        pre_acc = point(neg_plan, 0.0)
        ft_acc = ev.accuracies(ev.model(work.states[task]), tasks.values())
        neg_curve = [point(neg_plan, lam) for lam in settings.forget_lambdas]
        rand_curve = [point(rand_plan, lam) for lam in settings.forget_lambdas]
        neg = _select_forget(neg_curve, pre_acc["val"]["control"], settings.control_keep)
        rand = _select_forget(rand_curve, pre_acc["val"]["control"], settings.control_keep)
        rand_same_lam = next(p for p in rand_curve if p["lam"] == neg["lam"])
        # The selected edit, written as a checkpoint from the checkpoint directories.
        out = work.edited(f"forget_{task}")
        neg_plan.with_params(lam=neg["lam"]).run(work.bind_paths(pre="pre", ft=task), out=str(out), force=True)
        _check_written(out, ev, {task: neg["test"]["target"]})
        results[task] = {
            "pretrained": {s: {r: pre_acc[s][r] for r in tasks} for s in ("val", "test")},
            "finetuned": {s: {r: ft_acc[s][t] for r, t in tasks.items()} for s in ("val", "test")},
            "negation": neg,
            "random": rand,
            "random_at_negation_lam": rand_same_lam,
            "negation_curve": neg_curve,
            "random_curve": rand_curve,
            "checkpoint": str(out),
        }
    return results


# -- learning via addition (Sec. 4, Figures 2 and 3) -----------------------------------------


def addition_recipe(subset: tuple[str, ...]) -> str:
    terms = " + ".join(f"({task} - pre)" for task in subset)
    return f"param lam = 0.3\nout = pre + lam*({terms})\n"


def addition(settings: Settings, ev: Evaluator, work: Workspace) -> dict:
    tasks = settings.edit_tasks
    ft = {
        task: ev.accuracies(ev.model(work.states[task]), [task]) for task in tasks
    }
    ft_acc = {split: {t: ft[t][split][t] for t in tasks} for split in ("val", "test")}
    pre_acc = ev.accuracies(ev.model(work.states["pre"]), tasks)

    def normalized(acc: dict, split: str, over) -> float:
        return sum(acc[split][t] / ft_acc[split][t] for t in over) / len(over)

    subsets = []
    for size in range(1, len(tasks) + 1):
        for subset in itertools.combinations(tasks, size):
            plan = compile_recipe(addition_recipe(subset))
            bindings = work.bind(pre="pre", **{t: t for t in subset})
            # The sweep scores the subset's tasks on validation; the chosen model is then
            # tested on every task.
            curve = []
            for lam in settings.add_lambdas:
                if lam == 0.0:
                    acc = pre_acc  # lam = 0 is the pre-trained model for every subset
                else:
                    state = plan.with_params(lam=lam).evaluate(bindings)
                    acc = ev.accuracies(ev.model(state), subset, splits=("val",))
                curve.append({"lam": lam, "val_subset": normalized(acc, "val", subset)})
            best = max(curve, key=lambda p: (p["val_subset"], -p["lam"]))
            if best["lam"] == 0.0:
                acc = pre_acc
            else:
                state = plan.with_params(lam=best["lam"]).evaluate(bindings)
                acc = ev.accuracies(ev.model(state), tasks, splits=("test",))
            subsets.append(
                {
                    "tasks": list(subset),
                    "lam": best["lam"],
                    "test_acc": acc["test"],
                    "test_normalized_subset": normalized(acc, "test", subset),
                    "test_normalized_all": normalized(acc, "test", tasks),
                    "val_normalized_subset": best["val_subset"],
                    "val_curve": [[p["lam"], p["val_subset"]] for p in curve],
                }
            )
    # The model of all task vectors, written to disk from the checkpoint directories.
    everything = subsets[-1]
    out = work.edited("add_all")
    compile_recipe(addition_recipe(tasks), lam=everything["lam"]).run(
        work.bind_paths(pre="pre", **{t: t for t in tasks}), out=str(out), force=True
    )
    _check_written(out, ev, everything["test_acc"])
    return {
        "tasks": list(tasks),
        "finetuned": ft_acc,
        "pretrained": pre_acc,
        "pretrained_normalized_all": normalized(pre_acc, "test", tasks),
        "subsets": subsets,
        "checkpoint": str(out),
    }


# -- task analogies (Sec. 5) ----------------------------------------------------------------


def _analogy_grid(kind: str) -> dict[tuple[str, str], str]:
    if kind == "subpopulation":
        return {(d, h): subpop_task(d, h) for d in SUBPOP_DOMAINS for h in SUBPOP_HALVES}
    return dict(ANALOGY_GRID)


def analogies(settings: Settings, ev: Evaluator, work: Workspace, kind: str) -> dict:
    """Every cell of the 2x2 grid as the target D = C + (B - A), where C shares D's row,
    B shares D's column, and A is the opposite corner."""
    grid = _analogy_grid(kind)
    rows = sorted({r for r, _ in grid}, key=[r for r, _ in grid].index)
    cols = sorted({c for _, c in grid}, key=[c for _, c in grid].index)
    plan = compile_recipe("analogy.tv")
    only_c = compile_recipe("param lam = 1.0\nout = pre + lam*(c - pre)")
    targets = []
    for (r, c), target in grid.items():
        other_r = next(x for x in rows if x != r)
        other_c = next(x for x in cols if x != c)
        a, b, cc = grid[(other_r, other_c)], grid[(other_r, c)], grid[(r, other_c)]
        roles = {"target": target, "control": CONTROL_TASK}

        def sweep(p, bindings):
            curve = []
            for lam in settings.analogy_lambdas:
                acc = ev.accuracies(ev.model(p.with_params(lam=lam).evaluate(bindings)), roles.values())
                curve.append({"lam": lam, **{s: {k: acc[s][t] for k, t in roles.items()} for s in acc}})
            # lam is picked on the target's validation split (as the paper's lambda search).
            return max(curve, key=lambda q: (q["val"]["target"], -q["lam"])), curve

        best, curve = sweep(plan, work.bind(pre="pre", a=a, b=b, c=cc))
        aux, _ = sweep(only_c, work.bind(pre="pre", c=cc))
        pre_acc = ev.accuracies(ev.model(work.states["pre"]), roles.values())
        ft_acc = ev.accuracies(ev.model(work.states[target]), roles.values())
        out = work.edited(f"analogy_{target}")
        plan.with_params(lam=best["lam"]).run(work.bind_paths(pre="pre", a=a, b=b, c=cc), out=str(out), force=True)
        _check_written(out, ev, {target: best["test"]["target"]})
        targets.append(
            {
                "target": target,
                "a": a,
                "b": b,
                "c": cc,
                "pretrained": {k: pre_acc["test"][t] for k, t in roles.items()},
                "finetuned": {k: ft_acc["test"][t] for k, t in roles.items()},
                "aux_only": {"lam": aux["lam"], **aux["test"]},
                "analogy": {"lam": best["lam"], **best["test"]},
                "curve": curve,
                "checkpoint": str(out),
            }
        )
    return {"kind": kind, "rows": rows, "cols": cols, "targets": targets}


# -- the whole run --------------------------------------------------------------------------


def run_all(settings: Settings, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(1)  # small tensors; also deterministic and kind to shared machines
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = load_data(seed=settings.seed)
    work = Workspace(Path(workdir))
    ev = Evaluator(data, settings.hidden)

    t = time.perf_counter()
    trained = train_all(settings, data, work, log)
    timings["training"] = time.perf_counter() - t

    t = time.perf_counter()
    forget = forgetting(settings, ev, work)
    timings["forgetting"] = time.perf_counter() - t
    log(f"forgetting: {len(settings.edit_tasks)} tasks x {len(settings.forget_lambdas)} lambdas x 2")

    t = time.perf_counter()
    add = addition(settings, ev, work)
    timings["addition"] = time.perf_counter() - t
    log(f"addition: {len(add['subsets'])} subsets x {len(settings.add_lambdas)} lambdas")

    t = time.perf_counter()
    work_heads = Workspace(Path(workdir) / "per_task_heads")
    trained["per_task_heads"] = train_multihead(settings, data, work_heads, work.path("pre"), log)
    add_heads = addition(settings, ev, work_heads)
    timings["addition, one head per task"] = time.perf_counter() - t
    log(f"addition with one head per task: {len(add_heads['subsets'])} subsets")

    t = time.perf_counter()
    analogy = {kind: analogies(settings, ev, work, kind) for kind in ("subpopulation", "inversion")}
    timings["analogies"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    log("analogies: done")

    return {
        "settings": asdict(settings),
        "splits": data.split_sizes(),
        "trained": trained,
        "forgetting": forget,
        "addition": add,
        "addition_per_task_heads": add_heads,
        "analogy": analogy,
        "timings_s": timings,
        "tvlang_version": tvlang.__version__,
        "torch_version": torch.__version__,
    }
