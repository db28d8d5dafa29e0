"""Command line: ``python -m examples.digits [--quick] [--work DIR] [--out DIR | --update-docs]``.

Trains the digits models, makes every edit with tvlang recipes, and writes
``OUT/digits.md`` (the block between the generated-results markers), the figures under
``OUT/figures/``, and ``WORK/results.json`` with every number. ``OUT`` is ``WORK/report``
unless ``--out`` says otherwise; ``--update-docs`` regenerates the repository's docs/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.digits",
        description="Reproduce the edits of 'Editing Models with Task Arithmetic' on sklearn digits.",
    )
    parser.add_argument("--quick", action="store_true", help="4 tasks, short training, coarse lambdas (a test)")
    parser.add_argument("--work", type=Path, default=REPO / "examples" / "checkpoints" / "digits",
                        help="checkpoints and results.json (default: examples/checkpoints/digits, gitignored)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="where digits.md and figures/ are written (default: WORK/report, so a run never"
                            " rewrites tracked files)")
    where.add_argument("--update-docs", action="store_true",
                       help="write them into the repository's docs/ (regenerates docs/digits.md and its figures)")
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed (default 0)")
    parser.add_argument("--no-figures", action="store_true", help="skip matplotlib")
    return parser


def report_dir(args: argparse.Namespace) -> Path:
    """Where digits.md and the figures go: ``--out``, docs/ with ``--update-docs``, else WORK/report."""
    if args.out is not None:
        return args.out
    return REPO / "docs" if args.update_docs else args.work / "report"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("error: this example needs scikit-learn (pip install 'tvlang[examples]')", file=sys.stderr)
        return 2
    from .experiment import Settings, run_all
    from .report import write_figures, write_markdown

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    args.out = report_dir(args)
    settings = Settings.for_run(args.quick, seed=args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    results = run_all(settings, args.work, log)
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_figures:
        for path in write_figures(results, args.out / "figures"):
            log(f"wrote {path}")
    log(f"wrote {write_markdown(results, args.out)}")
    log(f"wrote {args.work / 'results.json'}")
    log(f"total {results['timings_s']['total']:.1f} s")
    return 0


if __name__ == "__main__":  # python examples/digits/run.py
    sys.path.insert(0, str(REPO))
    from examples.digits.run import main as _main

    raise SystemExit(_main())
