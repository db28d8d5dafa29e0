"""``tvlang similarity``: the cosine similarity matrix of task vectors, in one pass."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from tvlang.errors import TvlangError
from tvlang.faces.commands.args import UsageError, chunk_bytes, parse_inputs
from tvlang.faces.commands.common import add_executor_arguments, executor_options
from tvlang.faces.commands.report_file import add_out_argument

HELP = "cosine similarity matrix of task vectors (one streaming pass)"

DESCRIPTION = """\
Cosine similarity of task vectors, computed in one pass over all checkpoints,
tensor by tensor (memory: the N x N matrix plus one chunk per input).

Each NAME=PATH is a fine-tuned model (its task vector is PATH - PRE, so --base
is needed) or a task vector file written by tvlang (metadata tvlang.kind =
delta), used as it is; NAME=lora:DIR is a PEFT LoRA adapter, read as a task
vector over the base's names (docs/adapters.md). Without --base every input must
be a task vector.
Integer tensors are skipped; --include/--exclude choose tensors by glob (the
paper uses the encoder only: --include 'encoder.*'). A zero task vector has
cosine 0 with everything, itself included.

With --against DIR/manifest.json (from 'tvlang bases'), prints the cosine of
each new task vector with each stored basis instead: the basis to negate is the
most similar one; the bases above --threshold are the ones to add for an
out-of-distribution task.

examples:
  tvlang similarity --base pre/ mnist=ft/mnist svhn=ft/svhn eurosat=ft/eurosat
  tvlang similarity --base pre/ a=ft/a b=ft/b --include 'encoder.*' --json
  tvlang similarity a=tv/a.safetensors b=tv/b.safetensors      # task vector files: no --base
  tvlang similarity --base pre/ a=ft/a b=ft/b c=ft/c --plot sim.png
  tvlang similarity --against bases/manifest.json gtsrb=ft/gtsrb --threshold 0.3
  tvlang similarity --base /shared/pre a=/shared/a b=/shared/b --executor ray --address auto
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "similarity", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help='print {"names": [...], "cosine": [[...]], "norms": [...]} instead of a table')
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also draw a heatmap, rows ordered by cluster (needs the 'bases' extra)")
    parser.add_argument("--against", metavar="MANIFEST",
                        help="compare each input with the stored bases of this manifest (or bases directory)")
    parser.add_argument("--threshold", type=float, metavar="T",
                        help="with --against: list the bases whose cosine is at least T")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress indicator, and only the table (no '# ...' summary lines)")
    add_out_argument(parser, "the table (or its --json object)")
    parser.set_defaults(func=run)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``similarity`` and ``bases`` share."""
    parser.add_argument("inputs", nargs="*", metavar="NAME=PATH",
                        help="a fine-tuned model or a task vector file, named (repeat for each);"
                             " NAME=delta:PATH marks a task vector file that lacks tvlang metadata,"
                             " NAME=lora:DIR a PEFT LoRA adapter")
    parser.add_argument("--base", metavar="PRE", help="the pretrained model the task vectors are relative to")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="only tensors whose name matches (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="skip tensors whose name matches (repeatable)")
    parser.add_argument("--chunk-mb", type=float, default=64.0, metavar="MB",
                        help="memory for the chunks of all inputs together (default 64)")
    add_executor_arguments(parser, ray_help="the similarity matrix as partial sums over ranges of tensors, one"
                                            " Ray task each, the same matrix", fails="the command fails")


@contextlib.contextmanager
def tensor_progress(label: str, quiet: bool):
    """A tqdm bar of the tensors done (``tvlang.run.progress.TensorBar``) on a terminal, unless
    ``quiet``: the callback to pass as ``progress=``, or None; the bar is cleared on leaving."""
    if quiet:
        yield None
        return
    from tvlang.run.progress import tensor_bar  # the run layer imports torch

    bar = tensor_bar(label)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def run(args) -> int:
    pairs, deltas = parse_inputs(args.inputs)
    if not pairs:
        raise UsageError("give at least one task vector as NAME=PATH")
    if args.threshold is not None and not args.against:
        raise UsageError("--threshold needs --against MANIFEST")
    distributed = executor_options(args)
    if args.against:
        return _run_against(args, pairs, deltas, distributed)

    from tvlang.bases.gram import similarity  # the bases layer imports torch

    with tensor_progress("similarity", args.quiet) as progress:
        sim = similarity(pairs, base=args.base, include=args.include, exclude=args.exclude, deltas=deltas,
                         chunk_bytes=chunk_bytes(args.chunk_mb), progress=progress, **distributed)
    if args.plot:
        plot_heatmap(sim, args.plot)
    if args.json:
        print(json.dumps(sim.to_dict()))
    else:
        print(sim.format_table())
        if args.quiet:
            return 0
        print(f"# {len(sim.tensors)} tensors, {sim.elements} parameters per task vector;"
              f" norms: " + ", ".join(f"{n} {v:.4g}" for n, v in zip(sim.names, sim.norms)))
        if args.plot:
            print(f"# heatmap written to {args.plot}")
    return 0


def _run_against(args, pairs, deltas, distributed: dict) -> int:
    from tvlang.bases.build import against_bases  # the bases layer imports torch

    with tensor_progress("similarity", args.quiet) as progress:
        result = against_bases(args.against, pairs, base=args.base,
                               include=args.include or None, exclude=args.exclude or None, deltas=deltas,
                               chunk_bytes=chunk_bytes(args.chunk_mb), progress=progress, **distributed)
    if args.json:
        data = result.to_dict()
        if args.threshold is not None:
            data["threshold"] = args.threshold
            data["above"] = result.above(args.threshold)
        print(json.dumps(data))
        return 0
    print(result.format_table())
    for name, row, above in zip(result.names, result.cosine, result.above(args.threshold or 0.0)):
        best = int(row.argmax())
        members = ", ".join(result.members[best])
        print(f"# {name}: most similar basis {result.bases[best]} (cosine {row[best]:.3f}; members {members})")
        if args.threshold is not None:
            chosen = ", ".join(above) if above else "none"
            print(f"# {name}: bases with cosine >= {args.threshold:g}: {chosen}")
    return 0


def plot_heatmap(sim, path: str) -> None:
    """A labelled heatmap of the cosine matrix, rows and columns grouped by cluster."""
    try:
        import matplotlib
    except ImportError:
        raise TvlangError("--plot needs matplotlib; install the 'bases' extra: pip install tvlang[bases]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tvlang.bases.clustering import cluster  # numpy

    order = list(range(len(sim.names)))
    title = "task vector cosine similarity"
    if len(sim.names) > 2:
        try:
            result = cluster(sim.cosine, "auto")
            order = result.order()
            title += f"\n(ordered by {result.k} spectral clusters)"
        except TvlangError:  # scikit-learn missing: keep the input order
            print("tvlang similarity: scikit-learn is not installed; heatmap in input order", file=sys.stderr)
    cos = sim.cosine[order][:, order]
    labels = [sim.names[i] for i in order]
    n = len(labels)
    size = max(4.0, 0.45 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(cos, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(cos[i, j]) > 0.6 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        plt.close(fig)
        raise TvlangError(f"cannot write plot '{path}': directory '{directory}' does not exist")
    fig.savefig(path, dpi=120)
    plt.close(fig)
