#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite. The tests run even when the
# lint fails, so one run reports both; the script fails if either does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
status=0
ruff check tvlang tests || status=$?
python -m pytest -q -p no:cacheprovider "$@" || status=$?
exit "$status"
