"""``tvlang run``: compute a recipe's outputs over real checkpoints."""

from __future__ import annotations

import argparse
import sys

from tvlang.faces.commands.args import (
    DTYPE_NAMES,  # noqa: F401  (tests/test_data_errors.py reads it from here)
    UsageError,
    bindings_from_args,
    check_dtype,
    parse_outputs,
    parse_params,
    parse_size,
)
from tvlang.faces.commands.common import (
    add_executor_arguments,
    add_recipe_arguments,
    executor_options,
    locked_path,
    mergekit_config,
    recipe_source,
)
from tvlang.faces.commands.json_output import emit
from tvlang.plan.compiler import compile as compile_recipe

HELP = "run a recipe over checkpoints and write the result"

DESCRIPTION = """\
Run a recipe (or one expression with -e) over checkpoints, tensor by tensor,
and write each output as safetensors. An output path ending in .safetensors is
one file; any other path is a model directory (sharded above --shard-size, with
the base model's config and tokenizer files copied, and a README.md model card
for a model: the recipe, the inputs, the params; --no-model-card leaves it out).

An output path ending in .pt, .pth or .bin is one PyTorch state dict file
(torch.save of the tensors; torch.load(path, weights_only=True) reads it). It is
built whole in memory before it is saved (a torch.save file cannot be streamed),
holds no metadata (bind a task vector saved so as delta:PATH), and needs the
local executor.

A bound file whose metadata says it is a tvlang task vector (every Delta that
tvlang writes) is a task vector; prefix a path with delta: to say so yourself.

examples:
  tvlang run recipe.tv -o merged/
  tvlang run -e "pre + 0.4*(ft - pre)" --bind pre=base/ --bind ft=ft/ -o out/
  tvlang run -e "ft - pre" --bind pre=base/ --bind ft=ft/ -o tau.safetensors
  tvlang run -e "pre + 0.4*(ft - pre)" --bind pre=base/ --bind ft=ft/ -o merged.pt
  tvlang run -e "pre + 0.4*(yelp_lm - amazon_lm) + 0.7*amazon_sent" \\
      --bind pre=t5/ --bind yelp_lm=yelp/ --bind amazon_lm=amazon/ \\
      --bind amazon_sent=delta:amazon_sent.safetensors -o yelp_sent/
  tvlang run recipe.tv -o forget=a/ -o multitask=b/     (several outs)
  tvlang run recipe.tv -o merged/ --json     (a JSON report on stdout: docs/cli-json.md)
  tvlang run recipe.tv --locked -o merged/     (inputs as in recipe.tv.lock: see tvlang lock)
  tvlang run merge.yml -o merged/     (a mergekit config: see tvlang import)
  tvlang run recipe.tv -o /shared/merged/ --shard-size 2GB --executor ray --address auto
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser, "bind a free name to a checkpoint: NAME=PATH or NAME=delta:PATH (repeatable)")
    parser.add_argument("-o", "--out", action="append", default=[], metavar="PATH|NAME=PATH",
                        help="where to write: one path, or NAME=PATH for each output of a recipe with several;"
                             " .safetensors: one file, .pt/.pth/.bin: a torch.save state dict (built in memory),"
                             " else a model directory")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None,
                        help="compute dtype (default float32; a mergekit config's dtype: float64 sets float64)")
    parser.add_argument("--out-dtype", default=None,
                        help="output dtype (default: the base model's; a mergekit config's out_dtype or dtype)")
    parser.add_argument("--shard-size", default="5GB", help="shard model directories above this size (default 5GB)")
    parser.add_argument("--missing", default="error", choices=("error", "base", "skip"),
                        help="a tensor missing from some inputs: error (default), take the base's, or skip it")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--no-model-card", dest="model_card", action="store_false",
                        help="write no README.md model card into a model output directory")
    parser.add_argument("--locked", action="store_true",
                        help="check the inputs against RECIPE.lock (tvlang lock) first; refuse any difference")
    add_executor_arguments(parser, ray_help="one task per output shard on a Ray cluster, the same bytes",
                           fails="the run fails, naming its shard")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--json", action="store_true",
                        help="print the run's report (outputs, inputs' name matching, passes, bytes, seconds) as one"
                             " JSON object on stdout instead of the summary line; errors too (docs/cli-json.md)")
    parser.set_defaults(func=run)


def compile_from_args(args: argparse.Namespace):
    """(plan, bindings) from RECIPE/-e, --bind and --set."""
    text, filename = recipe_source(args)
    kinds, bindings = bindings_from_args(args.bind)
    params = parse_params(args.set)
    plan = compile_recipe(text, filename=filename, sources=kinds, **params)
    check_bindings_used(plan, list(kinds))
    return plan, bindings


def check_bindings_used(plan, bound: list[str]) -> None:
    """A usage error for a ``--bind`` the recipe does not use (most often a misspelling).

    Names the recipe reads but that were not bound are the checker's business
    (it reports them, with a suggestion, before this runs).
    """
    unused = plan.unused_bindings(bound)
    if not unused:
        return
    name = unused[0]
    used = list(plan.checked.sources)
    hint = plan.binding_hint(name)
    reads = ", ".join(used) or "no bound names"
    raise UsageError(f"--bind {name}: the recipe does not use '{name}'{hint} (it reads {reads})")


def run(args: argparse.Namespace) -> int:
    out = parse_outputs(args.out)
    shard_size = parse_size(args.shard_size)
    check_dtype("--dtype", args.dtype)
    check_dtype("--out-dtype", args.out_dtype)
    config = mergekit_config(args)
    defaults = config.options if config is not None else {}
    dtype = args.dtype or defaults.get("dtype", "float32")
    out_dtype = args.out_dtype or defaults.get("out_dtype")
    plan, bindings = compile_from_args(args)
    summary = plan.run(bindings, out, device=args.device, dtype=dtype, out_dtype=out_dtype,
                       shard_size=shard_size, force=args.force, missing=args.missing, progress=not args.quiet,
                       lock=locked_path(args), model_card=args.model_card, **executor_options(args))
    if args.json:
        emit(summary.to_dict())
    elif not args.quiet:
        print(summary.line(), file=sys.stderr)
    return 0
