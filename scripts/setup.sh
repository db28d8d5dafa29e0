#!/usr/bin/env bash
# Set up .venv with tvlang and everything its tests, examples and benchmarks use.
# torch is pinned to the CPU build first, so no extra resolves a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install --quiet --disable-pip-version-check "torch==2.13.0"
pip install --quiet --disable-pip-version-check -e ".[test,bases,examples,real,progress,mergekit,ray,hub]" "mergekit==0.1.5"
