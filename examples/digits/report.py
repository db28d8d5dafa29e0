"""Markdown tables and matplotlib figures from the results of :func:`run_all`.

Everything here is generated: the block between the markers in ``docs/digits.md`` is
replaced on every run, never edited by hand.
"""

from __future__ import annotations

import statistics
from pathlib import Path

BEGIN = "<!-- BEGIN GENERATED RESULTS (python -m examples.digits --update-docs) -->"
END = "<!-- END GENERATED RESULTS -->"
FIGURES = "figures"


def pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# -- markdown ------------------------------------------------------------------------------


def markdown(results: dict, figure_prefix: str = FIGURES) -> str:
    s = results["settings"]
    t = results["timings_s"]
    lines = [
        BEGIN,
        "",
        f"Run: `{'python -m examples.digits --quick' if s['quick'] else 'python -m examples.digits'}`"
        f" (seed {s['seed']}), tvlang {results['tvlang_version']}, torch {results['torch_version']}.",
        f"Splits (images per task): train {results['splits']['train']}, validation "
        f"{results['splits']['val']}, test {results['splits']['test']}. MLP 64-{s['hidden']}-{s['hidden']}-10, "
        f"pre-trained {s['pretrain_epochs']} epochs on plain digits, each task fine-tuned for about "
        f"{s['finetune_steps']} AdamW steps (lr {s['finetune_lr']}) with the head frozen. "
        "All accuracies below are on the test split; every lambda was chosen on the validation split.",
        "",
    ]
    lines += _forgetting_md(results["forgetting"], s, figure_prefix)
    lines += _addition_md(results["addition"], s, figure_prefix)
    if "addition_per_task_heads" in results:
        lines += _addition_heads_md(results["addition_per_task_heads"], results["addition"], figure_prefix)
    lines += _analogy_md(results["analogy"], s, figure_prefix)
    lines += ["### Timings", ""]
    lines += _table(
        ["stage", "seconds"],
        [[name, f"{seconds:.1f}"] for name, seconds in t.items()],
    )
    lines += ["", END]
    return "\n".join(lines) + "\n"


def _forgetting_md(forget: dict, s: dict, fig: str) -> list[str]:
    lines = [
        "### Forgetting via negation (the paper's Table 1 and Figure 9)",
        "",
        "`pre - lam*(ft - pre)` against `pre - lam*random_like(ft - pre, seed=0)`. Target: the task's "
        "test images (lower is better); control: plain digits (higher is better). lam is the one "
        "with the lowest validation target accuracy among those keeping the validation control "
        f"accuracy at least {pct(s['control_keep'])}% of the pre-trained model's "
        f"(lam in {{{s['forget_lambdas'][0]}, ..., {s['forget_lambdas'][-1]}}}).",
        "",
    ]
    header = [
        "task",
        "pre-trained T / C",
        "fine-tuned T / C",
        "negative task vector T / C (lam)",
        "random vector T / C (lam)",
        "random, negation's lam T / C",
    ]
    rows, cols = [], {k: [] for k in ("pre", "ft", "neg", "rand", "rand_same")}
    for task, r in forget.items():
        pre, ft = r["pretrained"]["test"], r["finetuned"]["test"]
        neg, rand, same = r["negation"], r["random"], r["random_at_negation_lam"]
        entries = {
            "pre": (pre["target"], pre["control"]),
            "ft": (ft["target"], ft["control"]),
            "neg": (neg["test"]["target"], neg["test"]["control"]),
            "rand": (rand["test"]["target"], rand["test"]["control"]),
            "rand_same": (same["test"]["target"], same["test"]["control"]),
        }
        for k, v in entries.items():
            cols[k].append(v)
        rows.append(
            [
                task,
                f"{pct(pre['target'])} / {pct(pre['control'])}",
                f"{pct(ft['target'])} / {pct(ft['control'])}",
                f"{pct(neg['test']['target'])} / {pct(neg['test']['control'])} ({neg['lam']:g})",
                f"{pct(rand['test']['target'])} / {pct(rand['test']['control'])} ({rand['lam']:g})",
                f"{pct(same['test']['target'])} / {pct(same['test']['control'])}",
            ]
        )

    def mean(k: str) -> str:
        return " / ".join(pct(statistics.mean(v[i] for v in cols[k])) for i in (0, 1))

    rows.append(["**average**"] + [f"**{mean(k)}**" for k in ("pre", "ft", "neg", "rand", "rand_same")])
    lines += _table(header, rows)
    lines += ["", f"![forgetting curves]({fig}/digits_forgetting.png)", ""]
    return lines


def _addition_md(add: dict, s: dict, fig: str) -> list[str]:
    tasks = add["tasks"]
    lines = [
        "### Learning via addition (the paper's Figures 2 and 3)",
        "",
        "`pre + lam*((t1 - pre) + (t2 - pre) + ...)` for every non-empty subset of the "
        f"{len(tasks)} tasks ({len(add['subsets'])} recipes), one lam per subset "
        f"(in {{{s['add_lambdas'][0]}, ..., {s['add_lambdas'][-1]}}}) chosen on the validation "
        "normalized accuracy of the subset's tasks. Normalized accuracy = accuracy of the edited "
        "model on a task / accuracy of the model fine-tuned on that task. *Subset tasks*: averaged "
        "over the tasks whose vectors were added (the paper's Figure 16); *all tasks*: averaged over "
        f"all {len(tasks)} tasks (the paper's Figure 3).",
        "",
    ]
    lines += _size_table(add)
    lines += ["", "Accuracy (%) per task: pre-trained, fine-tuned, and the sum of all task vectors:", ""]
    lines += _per_task_table(add)
    lines += [
        "",
        f"![pairs]({fig}/digits_addition_pairs.png)",
        "",
        f"![subsets]({fig}/digits_addition_subsets.png)",
        "",
    ]
    return lines


def _addition_heads_md(add: dict, shared: dict, fig: str) -> list[str]:
    pairs = statistics.mean(x["test_normalized_subset"] for x in add["subsets"] if len(x["tasks"]) == 2)
    pairs_shared = statistics.mean(x["test_normalized_subset"] for x in shared["subsets"] if len(x["tasks"]) == 2)
    lines = [
        "**The same experiment with one frozen head per task** (the paper's setting: each task reads "
        "out through its own classification layer). The pre-trained backbone is the one above; each "
        "task gets its own randomly initialized head, frozen, so the pre-trained model is at chance on "
        "every task; each task is fine-tuned through its own head, and evaluated through it. Pairs: "
        f"{pct(pairs)}% normalized accuracy on their two tasks here, {pct(pairs_shared)}% with the "
        "shared head.",
        "",
    ]
    lines += _size_table(add)
    lines += [""]
    lines += _per_task_table(add)
    lines += ["", f"![pairs, one head per task]({fig}/digits_addition_pairs_heads.png)", ""]
    return lines


def _size_table(add: dict) -> list[str]:
    tasks = add["tasks"]
    rows = [
        [
            "0 (pre-trained)",
            "1",
            "-",
            pct(add["pretrained_normalized_all"]),
            pct(add["pretrained_normalized_all"]),
            "-",
        ]
    ]
    for k in range(1, len(tasks) + 1):
        group = [x for x in add["subsets"] if len(x["tasks"]) == k]
        rows.append(
            [
                str(k),
                str(len(group)),
                pct(statistics.mean(x["test_normalized_subset"] for x in group)),
                pct(statistics.mean(x["test_normalized_all"] for x in group)),
                pct(max(x["test_normalized_all"] for x in group)),
                f"{statistics.mean(x['lam'] for x in group):.2f}",
            ]
        )
    return _table(
        [
            "task vectors added",
            "subsets",
            "normalized acc., subset tasks (mean)",
            "normalized acc., all tasks (mean)",
            "all tasks (best subset)",
            "mean lam",
        ],
        rows,
    )


def _per_task_table(add: dict) -> list[str]:
    tasks = add["tasks"]
    everything = add["subsets"][-1]
    return _table(
        ["", *tasks],
        [
            ["pre-trained", *(pct(add["pretrained"]["test"][t]) for t in tasks)],
            ["fine-tuned on the task", *(pct(add["finetuned"]["test"][t]) for t in tasks)],
            [f"sum of all (lam {everything['lam']:g})", *(pct(everything["test_acc"][t]) for t in tasks)],
        ],
    )


def _analogy_md(analogy: dict, s: dict, fig: str) -> list[str]:
    lines = [
        "### Task analogies (the paper's Section 5)",
        "",
        "Every cell D of a 2x2 grid is the target once: `pre + lam*((c - pre) + (b - pre) - (a - pre))` "
        "(`recipes/analogy.tv`) with C in D's row, B in D's column and A the opposite corner; no "
        "training data of D is used to build the edit, and lam "
        f"(in {{{s['analogy_lambdas'][0]}, ..., {s['analogy_lambdas'][-1]}}}) is chosen on D's "
        "validation split. *C only* is `pre + lam*(c - pre)`, the auxiliary task alone (the paper's "
        "'fine-tuned on the auxiliary task' baseline). Control: plain digits.",
        "",
    ]
    titles = {
        "subpopulation": "Subpopulations: domain {rot90, rot270} x labels {0-4 (low), 5-9 (high)}; a cell's "
        "model is fine-tuned only on its domain's images of its labels, and tested on them.",
        "inversion": "Transforms: rotation {90, 270} x intensity {normal, inverted}, all ten labels.",
    }
    for kind, block in analogy.items():
        lines += [f"**{titles[kind]}**", ""]
        rows = []
        acc = {k: [] for k in ("pre", "aux", "ana", "ft", "ctrl")}
        for r in block["targets"]:
            acc["pre"].append(r["pretrained"]["target"])
            acc["aux"].append(r["aux_only"]["target"])
            acc["ana"].append(r["analogy"]["target"])
            acc["ft"].append(r["finetuned"]["target"])
            acc["ctrl"].append(r["analogy"]["control"])
            rows.append(
                [
                    f"{r['target']} = {r['c']} + ({r['b']} - {r['a']})",
                    pct(r["pretrained"]["target"]),
                    f"{pct(r['aux_only']['target'])} ({r['aux_only']['lam']:g})",
                    f"{pct(r['analogy']['target'])} ({r['analogy']['lam']:g})",
                    pct(r["finetuned"]["target"]),
                    f"{pct(r['pretrained']['control'])} -> {pct(r['analogy']['control'])}",
                ]
            )
        rows.append(
            ["**average**"]
            + [f"**{pct(statistics.mean(acc[k]))}**" for k in ("pre", "aux", "ana", "ft")]
            + [f"**-> {pct(statistics.mean(acc['ctrl']))}**"]
        )
        lines += _table(
            ["target D = C + (B - A)", "pre-trained", "C only (lam)", "analogy (lam)", "fine-tuned on D", "control: pre -> analogy"],
            rows,
        )
        lines.append("")
    lines += [f"![analogies]({fig}/digits_analogies.png)", ""]
    return lines


def write_markdown(results: dict, docs: Path) -> Path:
    """Replace the generated block of ``docs/digits.md`` (created if missing)."""
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / "digits.md"
    block = markdown(results)
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            text = head + block.rstrip("\n") + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        text = "# Task arithmetic on digits\n\n" + block
    path.write_text(text)
    return path


# -- figures -------------------------------------------------------------------------------


def write_figures(results: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    paths = [
        _forgetting_figure(plt, results, directory / "digits_forgetting.png"),
        _pairs_figure(plt, results["addition"], directory / "digits_addition_pairs.png", "shared head"),
        _subsets_figure(plt, results, directory / "digits_addition_subsets.png"),
    ]
    if "addition_per_task_heads" in results:
        paths.append(
            _pairs_figure(plt, results["addition_per_task_heads"], directory / "digits_addition_pairs_heads.png",
                          "one head per task")
        )
    paths += [
        _analogy_figure(plt, results, directory / "digits_analogies.png"),
    ]
    return paths


def _forgetting_figure(plt, results: dict, path: Path) -> Path:
    forget = results["forgetting"]
    keep = results["settings"]["control_keep"]
    n = len(forget)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (task, r) in zip(axes.flat, forget.items()):
        for curve, label, color in (
            (r["negation_curve"], "negative task vector", "tab:red"),
            (r["random_curve"], "random vector", "tab:gray"),
        ):
            xs = [100 * p["test"]["control"] for p in curve]
            ys = [100 * p["test"]["target"] for p in curve]
            ax.plot(xs, ys, "-o", ms=2.5, color=color, label=label)
        sel = r["negation"]
        ax.plot(100 * sel["test"]["control"], 100 * sel["test"]["target"], "*", ms=11, color="black",
                label=f"chosen lam={sel['lam']:g}")
        ax.axvline(100 * keep * r["pretrained"]["test"]["control"], ls=":", color="tab:blue", lw=1)
        ax.set_title(task)
        ax.set_xlabel("control acc. (plain) %")
        ax.set_ylabel("target acc. %")
        ax.invert_xaxis()
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Forgetting via negation: lam from 0 (pre-trained) upward; dotted: 95% of pre-trained control")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pairs_figure(plt, add: dict, path: Path, setting: str) -> Path:
    tasks = add["tasks"]
    ft = add["finetuned"]["test"]
    index = {tuple(sorted(x["tasks"])): x for x in add["subsets"]}
    matrix = []
    for row in tasks:
        line = []
        for col in tasks:
            entry = index[tuple(sorted({row, col}))]
            line.append(entry["test_acc"][row] / ft[row])
        matrix.append(line)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(tasks), 0.6 + 0.7 * len(tasks)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for i, line in enumerate(matrix):
        for j, v in enumerate(line):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("task vector added to the row's")
    ax.set_ylabel("normalized accuracy on")
    ax.set_title(f"Adding pairs of task vectors, {setting} (diagonal: one vector)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _subsets_figure(plt, results: dict, path: Path) -> Path:
    variants = [("shared head", results["addition"], "tab:blue")]
    if "addition_per_task_heads" in results:
        variants.append(("one head per task", results["addition_per_task_heads"], "tab:orange"))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in (
        (axes[0], "test_normalized_all", "averaged over all tasks (Fig. 3)"),
        (axes[1], "test_normalized_subset", "averaged over the added tasks (Fig. 16)"),
    ):
        for offset, (label, add, color) in enumerate(variants):
            n = len(add["tasks"])
            shift = 0.12 * offset
            xs = [len(x["tasks"]) for x in add["subsets"]]
            ys = [x[key] for x in add["subsets"]]
            ax.scatter([x + shift for x in xs], ys, s=8, alpha=0.45, color=color)
            means = [statistics.mean(y for x, y in zip(xs, ys) if x == k) for k in range(1, n + 1)]
            if key == "test_normalized_all":
                ax.scatter([shift], [add["pretrained_normalized_all"]], s=12, color=color)
                ax.plot([k + shift for k in range(0, n + 1)], [add["pretrained_normalized_all"], *means], "-",
                        color=color, label=label)
            else:
                ax.plot([k + shift for k in range(1, n + 1)], means, "-", color=color, label=label)
        ax.axhline(1.0, ls="--", color="gray", lw=1)
        ax.set_xlabel("number of task vectors added")
        ax.set_ylabel("normalized accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _analogy_figure(plt, results: dict, path: Path) -> Path:
    blocks = results["analogy"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 3.6), squeeze=False)
    labels = ("pre-trained", "C only", "analogy", "fine-tuned on D")
    colors = ("tab:gray", "tab:orange", "tab:green", "tab:blue")
    for ax, (kind, block) in zip(axes.flat, blocks.items()):
        targets = block["targets"]
        width = 0.2
        for i, (label, color) in enumerate(zip(labels, colors)):
            values = []
            for r in targets:
                values.append(
                    {
                        "pre-trained": r["pretrained"]["target"],
                        "C only": r["aux_only"]["target"],
                        "analogy": r["analogy"]["target"],
                        "fine-tuned on D": r["finetuned"]["target"],
                    }[label]
                )
            ax.bar([j + (i - 1.5) * width for j in range(len(targets))], [100 * v for v in values], width,
                   label=label, color=color)
        ax.set_xticks(range(len(targets)), [r["target"] for r in targets], rotation=20)
        ax.set_ylabel("target test accuracy %")
        ax.set_title(f"{kind} analogy")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
