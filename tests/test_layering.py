"""The package's layering rules, read from the source (every import, including
those under ``TYPE_CHECKING`` and inside functions): ``core/`` imports nothing
from ``chain/``, and ``config/`` nothing from ``chain/`` (docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "midway"


def _module_name(path: Path) -> str:
    parts = ["midway", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
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


def test_every_module_imports() -> None:
    for path in MODULES:
        importlib.import_module(_module_name(path))
