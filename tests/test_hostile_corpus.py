"""The hostile-input corpus (issue 18): well over 100 generated files, recipes, paths and
options (tests/hostile_corpus.py), run through the command line in one subprocess.

Every case ends with exit 1 (an error) or 2 (a usage error), one clear message on stderr
and nothing on stdout, no traceback, no raw terminal escape, never torch's advice to load
with ``weights_only=False``, in under 10 s and 1 GiB of resident memory, and every file
and directory of its folder (inputs, unrelated files, an existing output) exactly as it
was, with nothing added (no output, no temporary, no file a pickle or recipe tried to
create).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import hostile_corpus

GIB = 1 << 30


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    manifest = hostile_corpus.build(str(root / "cases"))
    manifest_path, results_path = root / "manifest.json", root / "results.json"
    manifest_path.write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # a leaked warning shows on stderr
    proc = subprocess.run([sys.executable, hostile_corpus.__file__, str(manifest_path), str(results_path)],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout == "", proc.stdout[-2000:]
    return {entry["name"]: entry for entry in json.loads(results_path.read_text())}


def test_the_corpus_is_large_and_covers_every_category():
    names = [name for _, name, _ in hostile_corpus.CASES]
    assert len(names) >= 100 and len(set(names)) == len(names)
    categories = {category for category, _, _ in hostile_corpus.CASES}
    assert categories == {"safetensors header", "sharded index", "pickle", "recipe", "output", "binding",
                          "option", "values"}


@pytest.mark.parametrize("name", [name for _, name, _ in hostile_corpus.CASES])
def test_case(results, name):
    got = results[name]
    where = f"{got['category']}/{name}: tvlang {' '.join(map(str, got['argv']))[:200]}\n{got['stderr'][-3000:]}"
    assert got["code"] in (1, 2), where
    err = got["stderr"]
    assert "Traceback" not in err, where
    assert got["stdout"] == "", where
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and ("error" in lines[0] or lines[0].startswith("usage:")), where
    assert "\x1b" not in err, where
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err, where
    assert "Warning" not in err, where
    assert got["seconds"] < 10, where
    assert got["peak_rss"] < GIB, where
    assert got["after"] == got["before"], where
