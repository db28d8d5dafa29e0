"""``tvlang extract-lora``: a task-vector expression written as a PEFT LoRA adapter."""

from __future__ import annotations

import argparse
import sys

from tvlang.faces.commands.args import UsageError
from tvlang.faces.commands.common import add_recipe_arguments
from tvlang.faces.commands.run import compile_from_args

HELP = "write a task vector as a PEFT LoRA adapter (rank-r factors per matrix)"

DESCRIPTION = """\
Compute a task-vector expression (a recipe's Delta output, or -e EXPR) tensor by
tensor and write it as a PEFT LoRA adapter directory (adapter_config.json and
adapter_model.safetensors) that PeftModel.from_pretrained loads: each matrix as the
rank-r factors of its truncated SVD (one SVD at a time), lora_alpha = r (scale 1).
Other float tensors (norms, biases) are saved whole as modules_to_save, or left out
with --other skip. It reports how much of the task vector's squared norm the adapter
keeps (the kept squared singular values over the squared Frobenius norm), overall and
per tensor with --per-tensor, so that you can choose r. See docs/adapters.md.

examples:
  tvlang extract-lora -e "ft - pre" --bind pre=base/ --bind ft=finetuned/ --rank 16 -o adapters/ft
  tvlang extract-lora -e "ties(a, b, c, density=0.5)" --bind pre=base/ --bind a=lora:adapters/a \\
      --bind b=lora:adapters/b --bind c=lora:adapters/c --rank 32 -o adapters/abc
  tvlang extract-lora recipe.tv --output tau --rank 64 -o adapters/tau --per-tensor
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("extract-lora", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser, "bind a free name: NAME=PATH, NAME=delta:PATH or NAME=lora:DIR (repeatable)")
    parser.add_argument("--rank", type=int, required=True, metavar="R", help="the rank of every adapted matrix")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="the adapter directory to write")
    parser.add_argument("--output", metavar="NAME", help="the recipe output to extract (when it has several)")
    parser.add_argument("--other", choices=("save", "skip"), default="save",
                        help="tensors that are not matrices: save them whole as modules_to_save (default), or skip")
    parser.add_argument("--fan-in-fan-out", action="store_true",
                        help="the base stores (in, out) weights (GPT-2's Conv1D): write transposed factors")
    parser.add_argument("--base-name", metavar="ID", help="base_model_name_or_path in adapter_config.json"
                        " (default: the base model's path)")
    parser.add_argument("--missing", default="error", choices=("error", "base", "skip"),
                        help="a tensor missing from some inputs: error (default), or leave it out")
    parser.add_argument("--per-tensor", action="store_true", help="print the share kept by each tensor")
    parser.add_argument("--force", action="store_true", help="replace an existing adapter directory")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.rank < 1:
        raise UsageError(f"--rank expects a positive integer, got {args.rank}")
    from tvlang.run.extract import extract_lora  # the run layer imports torch

    plan, bindings = compile_from_args(args)
    result = extract_lora(plan, bindings, args.out, rank=args.rank, output=args.output, other=args.other,
                          base_name=args.base_name, fan_in_fan_out=args.fan_in_fan_out, force=args.force,
                          missing=args.missing)
    if not args.quiet:
        print("\n".join(result.lines(per_tensor=args.per_tensor)), file=sys.stderr)
    return 0
