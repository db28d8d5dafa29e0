"""``tvlang show``: what an output says about how it was made, from its safetensors metadata."""

from __future__ import annotations

import argparse
import json
import sys

from tvlang.errors import TvlangError
from tvlang.faces.commands.args import UsageError
from tvlang.faces.commands.report_file import add_out_argument
from tvlang.language import ast
from tvlang.language.printer import format_signed
from tvlang.plan.compiler import parse_recipe

HELP = "print an output's recipe, inputs, params and the tvlang that wrote it (from its metadata)"

DESCRIPTION = """\
Print what a tvlang output records about how it was made: the recipe, its
inputs (Hub references pinned to their commits, local paths relative to the
recipe file), the param values, the files' sha256 when the run was locked, and
the tvlang version that wrote it. Reads only the safetensors header (a model
directory's weights file, or the first shard of a sharded one), never weights.

--recipe prints the recipe text exactly as it ran, to re-run it; a param the
run set with --set is said on stderr, as the --set to give again.

examples:
  tvlang show merged/
  tvlang show merged/ --json
  tvlang show merged/ --recipe > again.tv
  tvlang show tau.safetensors
"""

KEYS = ("tvlang.recipe", "tvlang.params", "tvlang.inputs", "tvlang.output", "tvlang.kind", "tvlang.version")


def register(subparsers) -> None:
    parser = subparsers.add_parser("show", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", metavar="OUT",
                        help="an output tvlang wrote: a model directory or a .safetensors file")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--json", action="store_true", help="print everything as one JSON object")
    what.add_argument("--recipe", action="store_true", help="print only the recipe text, exactly as it ran")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no note on stderr (--recipe's note of the params it ran with)")
    add_out_argument(parser, "what it prints")
    parser.set_defaults(func=run)


def provenance(path: str) -> dict:
    """What the output at ``path`` records: recipe, params, inputs, lock hashes, output name, kind, version."""
    from tvlang.io import open_reader  # the io layer imports torch; only the header is read

    with open_reader(path) as reader:
        metadata = dict(reader.metadata)
    missing = [key for key in KEYS if key not in metadata]
    if missing:
        raise TvlangError(f"{path}: no tvlang metadata ({missing[0]} is missing): it was not written by tvlang,"
                          " or its metadata was removed")
    try:
        params = json.loads(metadata["tvlang.params"])
        inputs = json.loads(metadata["tvlang.inputs"])
        lock = json.loads(metadata["tvlang.lock"]) if "tvlang.lock" in metadata else None
    except ValueError as exc:
        raise TvlangError(f"{path}: its tvlang metadata is not valid JSON ({exc})") from None
    version = metadata["tvlang.version"]
    return {"output": metadata["tvlang.output"], "kind": metadata["tvlang.kind"], "recipe": metadata["tvlang.recipe"],
            "params": params, "inputs": inputs, "lock": lock, "tvlang_version": version,
            "producer": f"tvlang {version}"}


def set_params(recipe: str, params: dict[str, float]) -> list[str]:
    """``NAME=VALUE`` for each param whose value in ``params`` is not the recipe's own (it was set with --set).

    >>> set_params("param lam = 0.5\\nout = pre + lam*(ft - pre)\\n", {"lam": 0.3})
    ['lam=0.3']
    >>> set_params("param lam = 0.5\\nout = pre + lam*(ft - pre)\\n", {"lam": 0.5})
    []
    """
    try:
        program = parse_recipe(recipe)
    except TvlangError:
        return [f"{name}={format_signed(value)}" for name, value in sorted(params.items())]
    declared = {s.name: s.value for s in program.statements if isinstance(s, ast.Param)}
    return [f"{name}={format_signed(value)}" for name, value in sorted(params.items()) if declared.get(name) != value]



def run(args: argparse.Namespace) -> int:
    if not args.output:
        raise UsageError("give an output path (a model directory or a .safetensors file)")
    info = provenance(args.output)
    if args.recipe:
        sys.stdout.write(info["recipe"])
        changed = set_params(info["recipe"], info["params"])
        if changed and not args.quiet:
            flags = " ".join(f"--set {item}" for item in changed)
            print(f"note: this output was made with {flags}; run the recipe with the same", file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    kind = "a model" if info["kind"] == "model" else "a task vector"
    print(f"output:   {info['output']} ({kind})")
    print(f"producer: {info['producer']}")
    params = ", ".join(f"{name} = {format_signed(value)}" for name, value in sorted(info["params"].items()))
    print(f"params:   {params or '(none)'}")
    print("inputs:")
    width = max((len(name) for name in info["inputs"]), default=0)
    for name, where in sorted(info["inputs"].items()):
        print(f"  {name.ljust(width)}  {where}")
        for file, digest in sorted((info["lock"] or {}).get(name, {}).items()):
            print(f"  {' ' * width}    {file}  sha256 {digest}")
    if info["lock"] is None:
        print("  (not locked: no file hashes recorded)")
    print("recipe:")
    for line in info["recipe"].rstrip("\n").splitlines():
        print(f"  {line}".rstrip())
    return 0
