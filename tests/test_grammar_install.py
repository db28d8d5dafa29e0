"""The wheel ships the grammar inside the package, and an installed wheel parses; where a C
compiler is found it also carries the compiled helper (tests/test_native.py), tagged for
this platform, and loads it.

An editable install reads ``grammar/tvlang.lark`` from the source tree; a wheel
carries it as ``tvlang/tvlang.lark`` (pyproject's force-include). This builds
the wheel, unpacks it, and parses in a fresh Python that sees only the
unpacked wheel (and the environment's dependencies), never the source tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from test_native import COMPILER  # where the install builds the compiled helper
from tvlang.language.syntax import grammar_text

ROOT = Path(__file__).resolve().parent.parent


def test_source_tree_grammar_is_the_one_loaded():
    assert grammar_text() == (ROOT / "grammar" / "tvlang.lark").read_text(encoding="utf-8")


@pytest.mark.slow
def test_wheel_contains_grammar_and_parses(tmp_path):
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (pip install hatchling)")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("tvlang-*.whl")
    compiler = COMPILER
    with zipfile.ZipFile(wheel) as archive:
        assert ("tvlang/ops/libtvnative.so.1" in archive.namelist()) == compiler
        assert wheel.name.endswith("-py3-none-any.whl") != compiler  # a wheel with the helper is platform's
        assert "tvlang/tvlang.lark" in archive.namelist()
        assert archive.read("tvlang/tvlang.lark").decode() == (ROOT / "grammar" / "tvlang.lark").read_text()
        assert not any(name.startswith("grammar/") for name in archive.namelist())
        assert "tvlang/language/parser_tables.json" in archive.namelist()
        unpacked = tmp_path / "unpacked"
        archive.extractall(unpacked)

    probe = f"""
import json, sys
sys.path.insert(0, {str(unpacked)!r})
sys.path = [p for p in sys.path if p != {str(ROOT)!r}]
import tvlang, tvlang.language.syntax
from importlib import resources
program = tvlang.language.syntax.parse("param lm = 0.4\\nout = pre + lm*(ft - pre)\\n")
from tvlang.ops import native
print(json.dumps({{
    "file": tvlang.__file__,
    "helper": None if native.library() is None else native.library()._name,
    "packaged": resources.files("tvlang").joinpath("tvlang.lark").is_file(),
    "statements": len(program.statements),
    "tables": tvlang.language.syntax._load(tvlang.language.syntax.grammar_text()) is not None,
    "tables_lark": json.loads(tvlang.language.syntax.TABLES_FILE.read_text())["lark"],
}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert Path(info["file"]).is_relative_to(unpacked)
    assert info["packaged"] is True
    assert info["statements"] == 2
    import lark

    # the wheel's parser loads its saved tables (where they were saved by this Lark)
    assert info["tables"] is (info["tables_lark"] == lark.__version__)
    if compiler:
        assert Path(info["helper"]) == unpacked / "tvlang" / "ops" / "libtvnative.so.1"
    assert not (unpacked / "grammar").exists()  # so the source-tree fallback could not have been used
