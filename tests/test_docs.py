"""Every code block in docs/*.md and README.md runs.

The convention (also in docs/index.md), by the fence's language tag:

- ```python   executed; the blocks of one file run in order in one namespace
               (later blocks see earlier names), in a fresh directory that holds
               ``examples/`` (the recipes, with example checkpoints generated in
               ``examples/checkpoints/``); use ``assert`` to state results.
- ```pycon    a doctest transcript (``>>>`` lines and their output), run in the
               same namespace as the file's python blocks (ELLIPSIS on).
- ```console  lines starting with ``$ tvlang ...`` run through ``tvlang.faces.cli.main``;
               the lines after a command, up to the next ``$``, are its expected
               stdout+stderr when given. ``$ tvlang repl ...`` followed by ``tv> ``
               (and ``... ``) lines is a REPL transcript: those lines are its
               input, the other lines its output. ``$ python examples/X.py ARGS``
               runs that script (in this process; its stdout, then its stderr).
               Other ``$`` lines (pip, git, cd) are not run.
               Exit status 0 is required unless the shown output has "error:".
- ```tvlang   parsed and checked (undefined names are free models); ```tvlang error
               must fail the checker instead.
- anything else (```text, ```json, ```bash, ...) and any block whose info string
  has ``no-run`` (```python no-run) is not run: for snippets that need real
  large models or show signatures. A block with no tag at all is an error
  (test_every_block_is_tagged): say which kind it is.

Comparing output: ``...`` matches any text (across lines), numbers match
within a relative 1e-4 (absolute 1e-6), trailing spaces are ignored.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import math
import re
import runpy
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tvlang.errors import TvlangError
from tvlang.faces.cli import COMMANDS, build_parser, main
from tvlang.language.checker import check
from tvlang.language.syntax import parse

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + ([ROOT / "README.md"] if (ROOT / "README.md").exists() else [])

# Files whose blocks are not run yet, with why. Each is a TODO for the file's owner.
SKIP_FILES: dict[str, str] = {}
# Single blocks not run yet: (file name, first line of the block) -> why.
SKIP_BLOCKS: dict[tuple[str, str], str] = {}

# Fences with no language tag run nowhere, so a page must not have any: tag each block
# (```tvlang, ```console, ... or ```text when it is not meant to run). TODO for each
# file's owner: these pages still have untagged blocks (several are runnable
# ```tvlang or ```console blocks in disguise); remove an entry once its page is tagged.
UNTAGGED_TODO: set[str] = set()

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")
NUMBER = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    flags: tuple[str, ...]
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence = match.group("fence")
        words = match.group("info").strip().split()
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(match.group("indent")):])
            index += 1
        index += 1
        lang = words[0].lower() if words else ""
        found.append(Block(path, start + 1, lang, tuple(words[1:]), "\n".join(body) + "\n"))
    return found


# -- comparing shown output ------------------------------------------------------------------


def matches(expected: str, actual: str) -> bool:
    """``expected`` with ``...`` wildcards and approximate numbers, against ``actual``."""
    expected = "\n".join(line.rstrip() for line in expected.strip("\n").splitlines())
    actual = "\n".join(line.rstrip() for line in actual.strip("\n").splitlines())
    pattern: list[str] = []
    numbers: list[str] = []
    for i, part in enumerate(expected.split("...")):
        if i:
            pattern.append(r".*?")
        position = 0
        for number in NUMBER.finditer(part):
            pattern.append(re.escape(part[position:number.start()]))
            pattern.append(f"({NUMBER.pattern})")
            numbers.append(number.group())
            position = number.end()
        pattern.append(re.escape(part[position:]))
    found = re.fullmatch("".join(pattern), actual, re.DOTALL)
    if not found:
        return False
    for want, got in zip(numbers, found.groups()):
        a, b = float(want), float(got)
        if not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6):
            return False
    return True


def test_matches_convention():
    assert matches("wrote 48 tensors (0.2 MiB) to out/ in ...",
                   "wrote 48 tensors (0.2 MiB) to out/ in 0.18 s (1 MiB/s)")
    assert matches("Scalar: 0.5", "Scalar: 0.50000001")
    assert not matches("Scalar: 0.5", "Scalar: 0.51")
    assert not matches("Delta: 48 tensors", "Model: 48 tensors")
    assert matches("a\n...\nz", "a\nb\nc\nz")


# -- running blocks ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def example_tree(tmp_path_factory):
    """examples/ with its recipes and scripts, and checkpoints generated in it."""
    root = tmp_path_factory.mktemp("docs_examples")
    target = root / "examples"
    # Everything but generated checkpoints (other pages use examples/digits, examples/bases).
    shutil.copytree(ROOT / "examples", target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("checkpoints", "__pycache__", "*.pyc"))
    spec = runpy.run_path(str(target / "make_checkpoints.py"))
    assert spec["main"](["--out", str(target / "checkpoints"), "-q"]) == 0
    return root


@pytest.fixture
def workdir(example_tree, tmp_path, monkeypatch):
    shutil.copytree(example_tree / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TVLANG_HISTORY", str(tmp_path / ".tvlang_history"))
    monkeypatch.setenv("TVLANG_CACHE_DIR", str(tmp_path / ".tvlang-cache"))  # the lockfile's hash cache
    # hf: references resolve offline, from ./hub-cache (docs/hub.md builds one there). huggingface_hub
    # reads its environment at import, so its constants are set as well.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def run_cli(argv: list[str], stdin: str | None = None) -> tuple[int, str]:
    buffer = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                code = main(argv)
            except SystemExit as exc:  # --help, argparse usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin = old_stdin
    return code, buffer.getvalue()


def run_script(argv: list[str]) -> tuple[int, str]:
    """``python SCRIPT ARGS`` in this process (no second torch import), as ``__main__``;
    its stdout, then its stderr."""
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(argv[0], run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
    return code, out.getvalue() + err.getvalue()  # as a shell shows `2>&1` of a buffered pipe


def run_console(block: Block) -> None:
    commands: list[tuple[str, list[str], list[str]]] = []  # (command, input lines, shown lines)
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], [], []))
        elif commands and commands[-1][0].startswith("tvlang repl") and (
                line.startswith("tv> ") or line.startswith("... ")):
            commands[-1][1].append(line[4:])
        elif commands:
            commands[-1][2].append(line)
    for command, inputs, shown in commands:
        while command.endswith("\\"):
            command = command[:-1]
        argv = shlex.split(command)
        if argv[0] == "tvlang":
            code, output = run_cli(argv[1:], "\n".join(inputs) + "\n" if inputs else None)
        elif argv[0] == "python" and len(argv) > 1 and argv[1].startswith("examples/"):
            if argv[1] == "examples/make_checkpoints.py":
                continue  # the fixture already generated them
            code, output = run_script(argv[1:])
        else:
            continue
        expected = "\n".join(shown).strip("\n")
        wants_error = "error:" in expected
        assert (code != 0) == wants_error or (not expected and code == 0), (
            f"{block.where}: `{command}` exited {code}; output:\n{output}")
        if expected:
            assert matches(expected, output), (
                f"{block.where}: `{command}` printed\n{output}\nbut the docs show\n{expected}")


def run_tvlang(block: Block) -> None:
    try:
        check(parse(block.text, block.where), source=block.text, filename=block.where)
    except TvlangError as exc:
        if "error" in block.flags:
            return
        raise AssertionError(f"{block.where}: the recipe does not check:\n{exc.render()}") from None
    assert "error" not in block.flags, f"{block.where}: marked ```tvlang error but it checks"


def run_python(block: Block, namespace: dict) -> dict:
    script = Path(f"doc_block_{block.line}.py")
    script.write_text(block.text, encoding="utf-8")
    try:
        return runpy.run_path(str(script), init_globals=namespace, run_name=f"docs:{block.where}")
    finally:
        script.unlink()


def run_pycon(block: Block, namespace: dict) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.text, namespace, block.where, str(block.path), block.line)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=out.write, clear_globs=False)
    namespace.update(test.globs)  # DocTest works on a copy; later blocks see these names
    assert runner.failures == 0, f"{block.where}:\n{out.getvalue()}"


def runnable(block: Block) -> bool:
    if "no-run" in block.flags:
        return False
    if (block.path.name, block.text.splitlines()[0] if block.text.strip() else "") in SKIP_BLOCKS:
        return False
    return block.lang in ("python", "pycon", "console", "tvlang")


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_doc_blocks_run(path, workdir):
    if path.name in SKIP_FILES:
        pytest.skip(f"TODO: {path.name}: {SKIP_FILES[path.name]}")
    namespace: dict = {}
    for block in blocks_of(path):
        if not runnable(block):
            continue
        if block.lang == "python":
            namespace = run_python(block, namespace)
        elif block.lang == "pycon":
            run_pycon(block, namespace)
        elif block.lang == "console":
            run_console(block)
        elif block.lang == "tvlang":
            run_tvlang(block)


def test_the_docs_i_own_have_runnable_blocks():
    for name in ("index.md", "cookbook.md", "api.md", "recipes-in-repos.md"):
        path = ROOT / "docs" / name
        assert path.exists(), name
        assert sum(runnable(b) for b in blocks_of(path)) >= 1, name


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_every_block_is_tagged(path):
    if path.name in UNTAGGED_TODO:
        pytest.skip(f"TODO: {path.name} has code blocks without a language tag")
    untagged = [b.where for b in blocks_of(path) if not b.lang]
    assert not untagged, f"tag these blocks (```text if they are not meant to run): {untagged}"


def test_index_links_every_doc():
    index = (ROOT / "docs" / "index.md").read_text()
    for path in (ROOT / "docs").glob("*.md"):
        if path.name != "index.md":
            assert f"({path.name})" in index, f"docs/index.md does not link {path.name}"


def test_every_command_help_says_what_it_does_with_an_example():
    """`tvlang --help` and each subcommand's help: a description and an `examples:` section."""
    code, top = run_cli(["--help"])
    assert code == 0 and "examples:\n  tvlang " in top
    registered = build_parser()._subparsers._group_actions[0].choices
    assert sorted(registered) == sorted(COMMANDS)
    for name in COMMANDS:
        code, text = run_cli([name, "--help"])
        assert code == 0, name
        assert f"examples:\n  tvlang {name}" in text, f"`tvlang {name} --help` has no examples"
        description = text.split("\n\n")[1]
        assert len(description.split()) >= 5, f"`tvlang {name} --help` does not say what it does"
