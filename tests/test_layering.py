"""The package's layering rules, read from the source (every import, including
those under ``TYPE_CHECKING`` and inside functions): ``core/`` imports nothing
from ``chain/``, ``config/`` nothing from ``chain/``, and no module imports
itself through others (no import cycle; docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "midway"


def _module_name(path: Path) -> str:
    parts = ["midway", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _import_nodes(path: Path) -> list[ast.Import | ast.ImportFrom]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def _from_target(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of what ``from X import ...`` imports from."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names."""
    package = _package_of(path)
    found: set[str] = set()
    for node in _import_nodes(path):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        else:
            target = _from_target(node, package)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("layer", ["core", "config"])
def test_a_lower_layer_imports_nothing_from_the_chain(layer: str) -> None:
    offending = {
        _module_name(path): sorted(i for i in _imports(path) if i.startswith("midway.chain"))
        for path in MODULES if _module_name(path).startswith(f"midway.{layer}")
    }
    assert {m: i for m, i in offending.items() if i} == {}


def _package_imports(path: Path) -> set[str]:
    """What ``path`` imports from the package, but from its own subpackage
    (``midway.core`` for ``core/relay.py``; a module of the root: but itself)."""
    name = _module_name(path)
    if path.parent == PACKAGE:
        return {i for i in _imports(path) if i.startswith("midway.") and i != name}
    own = ".".join(name.split(".")[:2])
    return {i for i in _imports(path) if (i == "midway" or i.startswith("midway."))
            and i != own and not i.startswith(own + ".")}


def test_core_imports_only_errors_and_addresses_from_the_package() -> None:
    allowed = ("midway.errors", "midway.config.addresses")
    offending = {
        _module_name(path): sorted(i for i in _package_imports(path)
                                   if not any(i == a or i.startswith(a + ".") for a in allowed))
        for path in MODULES if _module_name(path).startswith("midway.core")
    }
    assert {m: i for m, i in offending.items() if i} == {}


def test_only_the_runtime_and_the_control_layer_import_the_admin_server() -> None:
    importers = {
        _module_name(path) for path in MODULES
        if any(i.startswith("midway.admin") for i in _package_imports(path))
    }
    assert {m for m in importers if m != "midway.runtime"
            and not m.startswith("midway.control")} == set()


def test_every_module_imports() -> None:
    for path in MODULES:
        importlib.import_module(_module_name(path))


# Cycles known and being removed elsewhere: each entry is one strongly connected
# set of modules.  The test fails on any other cycle, and on an entry that is no
# longer found (delete it then).
KNOWN_CYCLES: set[frozenset[str]] = set()
"""Cycles tolerated for now (none: the control layer took the admin server out of
the runtime and owns the log setup, which ended the last two)."""


def _owner(name: str, modules: set[str]) -> str | None:
    """The package module that defines ``name`` (a module, or a name in one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports.  ``from P import m`` of a
    submodule depends on ``m``, and on ``P`` unless ``P`` is the importer's own
    package or an ancestor of it (already importing, whatever ``P`` holds);
    ``from P import name`` of anything else depends on ``P``, ancestors included:
    the root's ``__version__`` was such an edge into the whole API."""
    modules = {_module_name(path) for path in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        name, package = _module_name(path), _package_of(path)
        ancestors = {".".join(package.split(".")[:i]) for i in range(1, package.count(".") + 2)}
        found: set[str | None] = set()
        for node in _import_nodes(path):
            if isinstance(node, ast.Import):
                found.update(_owner(alias.name, modules) for alias in node.names)
                continue
            target = _from_target(node, package)
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
                    if target not in ancestors:
                        found.add(_owner(target, modules))
                else:
                    found.add(_owner(target, modules))
        graph[name] = {m for m in found if m is not None and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected sets of more than one module (Tarjan's algorithm,
    iterative): each holds at least one import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    members = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        members.add(member)
                        if member == node:
                            break
                    if len(members) > 1:
                        found.add(frozenset(members))
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert _cycles(graph) == {frozenset("abc"), frozenset("ef")}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == set()


def test_the_graph_sees_an_import_of_the_package_root() -> None:
    # ``from .. import __version__`` closed a cycle through midway/__init__.py.
    graph = _import_graph()
    assert "midway._public" in graph["midway"] and "midway.api" in graph["midway._public"]
    assert "midway._version" in graph["midway.cli"] and "midway" not in graph["midway.cli"]


def test_no_import_cycle() -> None:
    found = _cycles(_import_graph())
    new = sorted(sorted(c) for c in found - KNOWN_CYCLES)
    assert not new, f"import cycles among: {new}"
    gone = sorted(sorted(c) for c in KNOWN_CYCLES - found)
    assert not gone, f"no longer a cycle, delete its KNOWN_CYCLES entry: {gone}"
