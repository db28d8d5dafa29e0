"""The package's layers, read from its source: no import cycles, and data flows down.

errors <- language <- plan <- run / io / ops <- bases <- faces; ``testing`` may use
anything. ``language`` and ``plan`` import no torch, so checking and compiling a recipe
start fast. The import graph is computed with :mod:`ast`, function-level imports
included (they hide cycles that import time never shows); imports under
``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tvlang"

# Old paths kept for one release: each replaces itself in sys.modules with its new module.
SHIMS = {
    "tvlang.synth": "tvlang.testing.synth",
    "tvlang.bases_build": "tvlang.bases.build",
    "tvlang.evaluate": "tvlang.run.evaluate",
    "tvlang.cli": "tvlang.faces.cli",
    "tvlang.highlight": "tvlang.faces.highlight",
    "tvlang.syntax": "tvlang.language.syntax",
}

# A module's layer is that of the longest name here that it is, or is inside. A module
# may import its own layer and the layers below it, never one above.
LAYERS = {
    "tvlang.errors": 0,
    "tvlang.version": 0,
    "tvlang.language": 1,
    "tvlang.plan": 2,
    "tvlang": 2,  # the package itself: the public API (compile, parse, Plan), over the plan layer
    "tvlang.run": 3,
    "tvlang.io": 3,
    "tvlang.ops": 3,
    "tvlang.bases": 4,
    "tvlang.faces": 5,
    "tvlang.frontends": 5,  # mergekit configs and other front ends: translate into recipes
    "tvlang.__main__": 5,
    "tvlang.testing": 6,
    **{old: 7 for old in SHIMS},  # nothing inside tvlang imports an old path
}

# Kept out of the module top level of the torch-free layers.
HEAVY = ("torch", "numpy", "safetensors", "tvlang.run", "tvlang.io", "tvlang.ops")
TORCH_FREE = ("tvlang.language", "tvlang.plan")

# Imports that go up a layer on purpose, inside named functions only:
# (importer, package it reaches) -> (the functions that may, why).
ALLOWED_UP = {
    ("tvlang.plan.compiler", "tvlang.run"): (
        {"Plan.run", "Plan.stream", "Plan.scalar", "PendingPlan.bound"},  # Plan.evaluate goes through Plan.stream
        # PendingPlan.bound reads a bound file's header (binding_kind) to type the plan.
        "running a plan is the run layer's job: these methods import it when called, so compile() never loads torch",
    ),
    ("tvlang", "tvlang.run"): (
        {"apply_to", "extract_lora"},
        "apply_to writes a result into a torch module's parameters, extract_lora writes an adapter: they"
        " import the run layer when called, so `import tvlang` never loads torch",
    ),
}

# Imports that close a cycle or go up a layer today, each in a file that its owner is
# reworking: (importer, imported module) -> whose file and what would cut it. TODO for
# each owner: delete the entry once the import is gone (test_allow_lists_are_current
# then says so); an entry hides the import from both the cycle and the layer checks.
KNOWN: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    top: bool  # at module level (runs on import), not inside a function
    where: str  # the enclosing class and function names ("Plan.run"), "" at module level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str) -> str | None:
    """The tvlang module ``name`` loads (a name inside a module counts as that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _dynamic(call: ast.Call) -> list[str]:
    """Modules an ``importlib.import_module(...)`` call names: a literal, or every module
    under an f-string's literal prefix (``f"tvlang.faces.commands.{name}"``)."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "import_module" and call.args):
        return []
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = arg.values[0].value
        return [name for name in MODULES if name.startswith(prefix) and name != prefix.rstrip(".")]
    return []


def imports_of(name: str) -> list[Import]:
    """Every import in one module: its own and third-party ones, top-level or not."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, top: bool, scope: tuple[str, ...]) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, top, scope)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            top = False
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = (*scope, node.name)
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import module`` imports that module; ``from module import name`` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        elif isinstance(node, ast.Call):
            targets = _dynamic(node)
        for target in targets:
            found.append(Import(name, target, getattr(node, "lineno", 0), top, ".".join(scope)))
        for child in ast.iter_child_nodes(node):
            visit(child, top, scope)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), True, ())
    return found


ALL_IMPORTS = [imp for name in MODULES for imp in imports_of(name)]


def graph() -> dict[str, dict[str, Import]]:
    """tvlang module -> {tvlang module it imports: the first such import}."""
    edges: dict[str, dict[str, Import]] = {name: {} for name in MODULES}
    for imp in ALL_IMPORTS:
        target = _target(imp.imported) if imp.imported.split(".")[0] == "tvlang" else None
        if target is not None and target != imp.importer:
            edges[imp.importer].setdefault(target, imp)
    return edges


def find_cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:  # a shortest way back to the first module, inside the component
        start = min(component)
        paths = {start: [start]}
        queue = [start]
        while queue:
            node = queue.pop(0)
            for succ in sorted(edges[node]):
                if succ == start:
                    cycles.append(paths[node] + [start])
                    queue = []
                    break
                if succ in component and succ not in paths:
                    paths[succ] = paths[node] + [succ]
                    queue.append(succ)
    return cycles


def _at(imp: Import) -> str:
    where = f"in {imp.where}" if imp.where and not imp.top else "at top level"
    return f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line}, {where}"


def describe(cycle: list[str], edges) -> str:
    return "\n".join(f"  {a} imports {b} ({_at(edges[a][b])})" for a, b in zip(cycle, cycle[1:]))


def layer(name: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or (prefix != "tvlang" and name.startswith(prefix + ".")):
            return LAYERS[prefix]
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {Path(__file__).name}")


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _allowed_up(imp: Import, target: str) -> bool:
    return any(
        imp.importer == importer and _inside(target, package) and imp.where in functions
        for (importer, package), (functions, _why) in ALLOWED_UP.items()
    )


def test_no_import_cycles():
    edges = {a: {b: imp for b, imp in succ.items() if (a, b) not in KNOWN} for a, succ in graph().items()}
    cycles = find_cycles(edges)
    report = "\n\n".join(f"cycle {' -> '.join(c)}:\n{describe(c, edges)}" for c in cycles)
    assert not cycles, "tvlang has import cycles (function-level imports count):\n\n" + report


def test_layers_import_only_downward():
    wrong = []
    for imp in ALL_IMPORTS:
        target = _target(imp.imported) if _inside(imp.imported, "tvlang") else None
        if target is None or layer(target) <= layer(imp.importer):
            continue
        if _allowed_up(imp, target) or (imp.importer, target) in KNOWN:
            continue
        wrong.append(f"  {imp.importer} imports {target} ({_at(imp)}):"
                     f" layer {layer(imp.importer)} reaches up to layer {layer(target)}")
    assert not wrong, (
        "imports against the layers (errors <- language <- plan <- run/io/ops <- bases <- faces):\n"
        + "\n".join(wrong)
    )


def test_language_and_plan_import_nothing_heavy_at_top_level():
    wrong = [
        f"  {imp.importer} imports {imp.imported} ({_at(imp)})"
        for imp in ALL_IMPORTS
        if imp.top
        and any(_inside(imp.importer, p) for p in TORCH_FREE)
        and any(_inside(imp.imported, h) for h in HEAVY)
    ]
    assert not wrong, "the language and plan layers must import without torch:\n" + "\n".join(wrong)


def test_allow_lists_are_current():
    edges = graph()
    stale = [pair for pair in KNOWN if pair[1] not in edges.get(pair[0], {})]
    stale += [
        (importer, package, function)
        for (importer, package), (functions, _why) in ALLOWED_UP.items()
        for function in functions
        if not any(imp.importer == importer and _inside(imp.imported, package) and imp.where == function
                   for imp in ALL_IMPORTS)
    ]
    assert not stale, f"these allowed imports no longer exist; delete their entries: {stale}"


def test_the_graph_sees_function_level_and_dynamic_imports(tmp_path, monkeypatch):
    source = (
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "from tvlang.errors import TvlangError\n"
        "if TYPE_CHECKING:\n"
        "    from tvlang.run.evaluate import Session\n"
        "class Plan:\n"
        "    def run(self):\n"
        "        from tvlang.run import evaluate\n"
        "        return importlib.import_module('tvlang.io')\n"
        "def commands(name):\n"
        "    return importlib.import_module(f'tvlang.faces.commands.{name}')\n"
    )
    (tmp_path / "probe.py").write_text(source)
    monkeypatch.setitem(MODULES, "tvlang.probe", tmp_path / "probe.py")
    found = {(imp.imported, imp.top, imp.where) for imp in imports_of("tvlang.probe")}
    assert ("tvlang.errors", True, "") in found
    assert ("tvlang.run.evaluate", False, "Plan.run") in found
    assert ("tvlang.io", False, "Plan.run") in found
    assert ("tvlang.faces.commands.check", False, "commands") in found
    assert not any(imported == "tvlang.run.evaluate" and where == "" for imported, _, where in found)


def test_compile_and_check_import_no_torch():
    code = (
        "import sys, tvlang\n"
        "plan = tvlang.compile('out = pre + 0.4*(ft - pre)')\n"
        "plan.explain()\n"
        "from tvlang.faces.cli import main\n"
        "assert main(['check', 'examples/yelp_analogy.tv']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'safetensors'))\n"
        "print(' '.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"compile() or `tvlang check` imported: {result.stdout.strip()}"


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_old_paths_are_the_new_modules(old):
    assert importlib.import_module(old) is importlib.import_module(SHIMS[old])


def test_bases_similarity_exists():
    import tvlang.bases

    assert callable(tvlang.bases.similarity)
