"""The dependency order the README states (section "Layout") holds for every
import in ksmbench/, function-level imports included, and no two modules or
packages import each other, directly or round a loop.

The order is read from the README itself, so the sentence there and the code
cannot drift apart.  Modules the sentence does not name are placed by
:data:`PLACED`, each next to the README's Layout table row that owns it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ksmbench"

#: top-level modules the README's dependency sentence does not name:
#: name -> (unit it belongs to, or None for a leaf; the unit's rank relative
#: to a named layer: "<layer>+" just above it, "<layer>" the same unit)
PLACED = {
    "__init__": (None, None),                   # the version string
    "waiting": (None, None),                    # bounded waits: kernel/ and sources/ use them
    "formats": (None, None),                    # KTAP/JUnit from run directories; needs only errors
    "progress": ("runner", "runner"),           # table row: runner.py, results.py, progress.py
    "pytest_plugin": ("pytest_plugin", "report+"),  # table row between report/ and cli.py
}


@dataclass(frozen=True)
class Import:
    importer: str   # dotted module name
    imported: str   # dotted module name (a module or package of the tree)
    line: int


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """dotted module name -> file; a package is named by its __init__.py."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(root: Path, package: str) -> list[Import]:
    """Every import of a module of ``package`` by one of its modules, at any
    depth of the syntax tree (function bodies, try/except, TYPE_CHECKING)."""
    modules = modules_of(root, package)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from . import x` imports the module x when there is one
                targets = [f"{module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] != package:
                    continue
                resolved = resolve(target)
                if resolved and resolved != name:
                    found.append(Import(name, resolved, node.lineno))
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def cycles_at_every_level(imports: list[Import], package: str) -> list[tuple[str, list[str]]]:
    """Cycles between modules, and between the children (modules and
    subpackages) of every package: a loop through two subpackages counts even
    when no single module loop exists."""
    found = []
    module_edges: dict[str, set[str]] = {}
    for i in imports:
        module_edges.setdefault(i.importer, set()).add(i.imported)
    found += [("modules", c) for c in cycles(module_edges)]
    packages = {i.importer for i in imports} | {i.imported for i in imports}
    packages = {p.rpartition(".")[0] for p in packages if "." in p} | {package}
    for parent in sorted(packages):
        def child(name: str) -> str | None:
            if name == parent:
                return f"{parent} (its __init__)"
            if not name.startswith(parent + "."):
                return None
            return parent + "." + name[len(parent) + 1:].split(".")[0]
        edges: dict[str, set[str]] = {}
        for i in imports:
            a, b = child(i.importer), child(i.imported)
            if a and b and a != b:
                edges.setdefault(a, set()).add(b)
        found += [(f"children of {parent}", c) for c in cycles(edges)
                  if not any(c == m for _, m in found)]
    return found


# -- the README's statement ---------------------------------------------------------------

def readme_layers(readme: str) -> tuple[list[list[str]], set[str]]:
    """(layers from the bottom up, leaves) from the README's Layout section."""
    layout = readme.split("## Layout", 1)[1]
    sentence = re.search(r"Dependencies point one way:(.*?)\.\s*\n", layout, re.S)
    assert sentence, "README Layout: no 'Dependencies point one way: ...' sentence"
    layers = [[name.strip(" `\n") for name in group.split(",")]
              for group in sentence.group(1).split("←")]
    leaves_text = re.search(r"\n(`[^\n]*?(?:\n[^\n]*?)*?) are leaves", layout)
    assert leaves_text, "README Layout: no '... are leaves' sentence"
    leaves = set(re.findall(r"`(\w+)`", leaves_text.group(1)))
    return layers, leaves


@dataclass(frozen=True)
class Placement:
    unit: str | None    # None: a leaf
    rank: float


def placements(layers: list[list[str]], leaves: set[str], names: set[str]) -> dict[str, Placement]:
    rank = {name: float(i) for i, group in enumerate(layers) for name in group}
    placed = {}
    for name in names:
        if name in leaves:
            placed[name] = Placement(None, -1.0)
        elif name in rank:
            placed[name] = Placement(name, rank[name])
        elif name in PLACED:
            unit, where = PLACED[name]
            if unit is None:
                placed[name] = Placement(None, -1.0)
            else:
                placed[name] = Placement(unit, rank[where.rstrip("+")] + (0.5 if where.endswith("+") else 0))
    return placed


def layer_violations(imports: list[Import], placed: dict[str, Placement], package: str) -> list[str]:
    def top(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    bad = []
    for i in imports:
        a, b = placed[top(i.importer)], placed[top(i.imported)]
        if a.unit is None:
            ok = b.unit is None
            why = "a leaf may import only leaves"
        elif b.unit is None or a.unit == b.unit:
            ok = True
        elif b.rank == a.rank:
            ok, why = False, "layers of the same rank do not import each other"
        else:
            ok, why = b.rank < a.rank, "dependencies point down the README's order"
        if not ok:
            bad.append(f"{i.importer} (line {i.line}) imports {i.imported}: {why}")
    return bad


# -- the tests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return imports_of(ROOT, PACKAGE)


@pytest.fixture(scope="module")
def placed() -> dict[str, Placement]:
    layers, leaves = readme_layers((ROOT / "README.md").read_text())
    names = {name.split(".")[1] if "." in name else "__init__"
             for name in modules_of(ROOT, PACKAGE)}
    return placements(layers, leaves, names)


def test_every_top_level_module_has_a_place_in_the_order(placed):
    names = {name.split(".")[1] if "." in name else "__init__" for name in modules_of(ROOT, PACKAGE)}
    unplaced = sorted(names - set(placed))
    assert not unplaced, (f"not in the README's dependency order nor in PLACED: {unplaced}; "
                          "name them in README 'Layout' (or PLACED, next to their table row)")


def test_imports_follow_the_readme_order(imports, placed):
    assert not layer_violations(imports, placed, PACKAGE)


def test_no_import_cycles_between_modules_or_packages(imports):
    found = cycles_at_every_level(imports, PACKAGE)
    assert not found, "\n".join(f"{level}: {' <-> '.join(c)}" for level, c in found)


def test_function_level_imports_are_seen(imports):
    """The walk reaches into function bodies: cli.main imports the tunables
    module inside the function, and that import is in the graph."""
    cli = (ROOT / PACKAGE / "cli.py").read_text()
    assert re.search(r"\n    +from \.kernel\.tunables import", cli)
    assert any(i.importer == "ksmbench.cli" and i.imported == "ksmbench.kernel.tunables"
               for i in imports)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_fail_on_a_hidden_cycle_and_an_upward_import(tmp_path):
    """A cycle hidden behind a function-level import, and a kernel module that
    reaches up into the CLI, are both reported (the checks can fail)."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/errors.py": "",
        "pkg/cli.py": "from .kernel import probe\n",
        "pkg/kernel/__init__.py": "",
        "pkg/kernel/probe.py": "def f():\n    from ..cli import main\n",
        "pkg/bench/__init__.py": "",
        "pkg/bench/a.py": "from . import b\n",
        "pkg/bench/b.py": "def g():\n    if True:\n        from .a import x\n",
    })
    found = imports_of(tmp_path, "pkg")
    loops = cycles_at_every_level(found, "pkg")
    assert ("modules", ["pkg.bench.a", "pkg.bench.b"]) in loops
    assert any(sorted(c) == ["pkg.cli", "pkg.kernel"] for _, c in loops)
    placed = placements([["kernel"], ["bench"], ["cli"]], {"errors"},
                        {"__init__", "errors", "cli", "kernel", "bench"})
    bad = layer_violations(found, placed, "pkg")
    assert bad == ["pkg.kernel.probe (line 2) imports pkg.cli: dependencies point down "
                   "the README's order"]


def test_the_readme_sentence_is_what_the_test_reads():
    layers, leaves = readme_layers((ROOT / "README.md").read_text())
    assert layers[0] == ["kernel"] and layers[-1] == ["cli"]
    assert {"selftests", "bench"} in [set(g) for g in layers]
    assert {"savings", "compare"} in [set(g) for g in layers]
    assert {"errors", "metrics", "observation", "results", "console"} <= leaves
