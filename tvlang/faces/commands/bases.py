"""``tvlang bases``: cluster task vectors and store one merged basis per cluster."""

from __future__ import annotations

import argparse
import json
import sys

from tvlang.faces.commands.args import UsageError, chunk_bytes, parse_inputs, parse_k
from tvlang.faces.commands.common import executor_options
from tvlang.faces.commands.similarity import add_input_arguments, tensor_progress

HELP = "cluster task vectors and merge each cluster into a basis (Zhang et al.)"

DESCRIPTION = """\
Task vector bases (Zhang et al., "Efficient Model Editing with Task Vector
Bases"): the cosine similarity matrix of the task vectors (one streaming pass),
spectral clustering of max(cos, 0) with k from the largest eigengap of the
normalized graph Laplacian (or --k K), then one merge per cluster through the
evaluator. Writes DIR/basis_<i>.safetensors (task vector files: load them with
load_delta("DIR/basis_0.safetensors")) and DIR/manifest.json (clusters, members,
eigenvalues, k, merge method, storage before and after).

A single-member cluster is stored as its task vector. --include/--exclude only
choose the tensors the similarity is computed on; bases hold every tensor.
Needs the 'bases' extra (scikit-learn): pip install tvlang[bases].
With --executor ray, the similarity pass runs as Ray tasks and each basis is
merged by the Ray executor: the same files (docs/distributed.md).

examples:
  tvlang bases --base pre/ mnist=ft/mnist svhn=ft/svhn eurosat=ft/eurosat resisc=ft/resisc -o bases/
  tvlang bases --base pre/ a=ft/a b=ft/b c=ft/c d=ft/d -o bases/ --k 2 --merge ties --density 0.2
  tvlang bases --base pre/ a=ft/a b=ft/b c=ft/c -o bases/ --include 'encoder.*' --force
  tvlang similarity --against bases/manifest.json new=ft/new
  tvlang bases --base /shared/pre a=/shared/a b=/shared/b c=/shared/c -o /shared/bases --executor ray --address auto
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bases", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", metavar="DIR", help="directory for the bases and manifest.json (required)")
    parser.add_argument("--k", default="auto", metavar="K|auto",
                        help="number of bases, or 'auto' for the largest eigengap (default auto)")
    parser.add_argument("--merge", default="mean", choices=("mean", "ties", "topk"),
                        help="how a cluster's task vectors become one basis (default mean)")
    parser.add_argument("--density", type=float, metavar="D",
                        help="fraction kept per task vector: ties (default 0.2), topk (default 0.05)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--json", action="store_true", help="print the manifest instead of a summary")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(func=run)


def run(args) -> int:
    from tvlang.bases.build import build_bases  # the bases layer imports torch and numpy
    from tvlang.bases.clustering import require_sklearn

    pairs, deltas = parse_inputs(args.inputs)
    if len(pairs) < 2:
        raise UsageError("give at least two task vectors as NAME=PATH")
    if not args.output:
        raise UsageError("give the output directory with -o DIR")
    k = parse_k(args.k)
    if args.density is not None and args.merge == "mean":
        raise UsageError("--density applies to --merge ties or topk, not mean")
    budget = chunk_bytes(args.chunk_mb)
    distributed = executor_options(args)
    require_sklearn()  # fail before the similarity pass, not after
    log = None if args.quiet or args.json else (lambda msg: print(msg, file=sys.stderr))
    with tensor_progress("similarity", args.quiet) as progress:
        manifest = build_bases(args.base, pairs, args.output, k=k, merge=args.merge, density=args.density,
                               include=args.include, exclude=args.exclude, force=args.force, deltas=deltas,
                               chunk_bytes=budget, log=log, progress=progress, **distributed)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    if args.quiet:
        return 0
    storage = manifest["storage"]
    eig = ", ".join(f"{v:.3f}" for v in manifest["eigenvalues"])
    print(f"eigenvalues of the normalized Laplacian: {eig}")
    chosen = "largest eigengap" if manifest["k_requested"] == "auto" else "--k"
    print(f"k = {manifest['k']} ({chosen}; the eigengap suggests {manifest['k_eigengap']})")
    if manifest["k_requested"] == "auto" and manifest["k"] == 1 and len(manifest["inputs"]) > 2:
        print("note: the largest eigengap is the first one, so all task vectors went into one basis;"
              " when they are all nearly unrelated (small cosines everywhere) that is the eigengap"
              " rule's blind spot: pass --k to choose", file=sys.stderr)
    for basis in manifest["bases"]:
        members = ", ".join(m["name"] for m in basis["members"])
        print(f"{args.output.rstrip('/')}/{basis['file']}: {members}")
    print(f"storage: {_size(storage['before_bytes'])} for {len(manifest['inputs'])} task vectors ->"
          f" {_size(storage['after_bytes'])} for {manifest['k']} bases"
          f" (saved {storage['saved_percent']:.2f}%)")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
