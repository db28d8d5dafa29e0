#!/usr/bin/env bash
# The main job on a generated example: the design card's task analogy,
#   out yelp_sent = pre + lm*(yelp_lm - amazon_lm) + sent*amazon_sent
# run over small checkpoints that examples/make_checkpoints.py writes (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python examples/make_checkpoints.py examples/checkpoints
tvlang check examples/yelp_analogy.tv
tvlang explain examples/yelp_analogy.tv
tvlang run examples/yelp_analogy.tv -o out/yelp_sent --force
python - <<'PY'
from safetensors import safe_open
with safe_open("out/yelp_sent/model.safetensors", "pt") as f:
    meta = f.metadata()
    print(f"out/yelp_sent: {len(list(f.keys()))} tensors, kind={meta['tvlang.kind']}, params={meta['tvlang.params']}")
PY
