"""The shape of the code: every module imports, no import loops, and imports run only one way.

Layers (docs/ARCHITECTURE.md): ``models`` imports nothing of the project; ``distill`` and ``streaming``
import ``models`` only, never each other; only ``app`` imports ``streaming`` and ``distill``; nothing
imports the entry point ``app/cli.py``. Inside
``distill``: ``world`` (the simulator the product uses) imports only itself, ``data`` neither ``stages``
nor ``eval``, ``eval`` not ``stages``. Imports are read with ``ast`` (absolute and relative, at any
depth, ``TYPE_CHECKING`` ones included), so the check needs no import machinery and sees lazy imports too.

    python -m pytest -q tests/test_structure.py
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "streaming", "distill", "app")  # folders; import names are worldloop.<folder>
OLD_NAMES = set(PACKAGES)  # the top-level import names before the worldloop namespace
OTHER_CODE = ("tests", "benchmarks", "assets")  # not part of the package; may import any layer

# Which top-level layers each layer may import (itself included).
LAYERS = {
    "models": {"models"},
    "streaming": {"streaming", "models"},
    "distill": {"distill", "models"},
    "app": {"app", "streaming", "distill", "models"},
}
# The entry point loads the command modules by name (importlib), so an import of it from the package is a
# loop the graph cannot see: none may import it.
ENTRY_POINT = "worldloop.app.cli"
# Inside distill: what each subpackage may not import.
DISTILL_FORBIDDEN = {
    "world": {"data", "stages", "eval"},
    "data": {"stages", "eval"},
    "eval": {"stages"},
}


def module_files() -> dict[str, Path]:
    """Every module of the package: ``worldloop.models.dit`` → models/dit.py (packages as ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(("worldloop", *parts))] = path
    return modules


def imported_names(path: Path, module: str | None) -> Iterator[tuple[str, int]]:
    """(absolute dotted name, line) of every import in a file; ``from a import b`` yields ``a.b`` (a module or
    a name in ``a``; the caller decides). Relative imports are resolved against ``module``."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                assert module is not None, f"{path}:{node.lineno}: a relative import outside the package"
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def project_edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module → {project module it imports: line}."""
    edges: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        targets = edges.setdefault(module, {})
        for name, line in imported_names(path, module):
            while name and name not in modules:  # ``from pkg import name``: the module that holds it
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.setdefault(name, line)
    return edges


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None (depth-first search, colouring)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def layer(module: str) -> str:
    return module.split(".")[1]


def test_no_import_cycles() -> None:
    cycle = find_cycle(project_edges(module_files()))
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_imports_run_one_way() -> None:
    wrong = []
    for module, targets in project_edges(module_files()).items():
        for target, line in targets.items():
            if layer(target) not in LAYERS[layer(module)] or target == ENTRY_POINT:
                wrong.append(f"{module}:{line} imports {target}")
            parts, target_parts = module.split("."), target.split(".")
            if parts[1] == target_parts[1] == "distill" and len(parts) > 3 and len(target_parts) > 3:
                if target_parts[2] in DISTILL_FORBIDDEN.get(parts[2], ()):
                    wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_only_worldloop_import_names() -> None:
    """No code imports the folders by their bare names (``import models``): they are ``worldloop.models``."""
    files = [p for d in (*PACKAGES, *OTHER_CODE) for p in sorted((REPO / d).rglob("*.py"))]
    modules = {path: name for name, path in module_files().items()}
    old = [f"{path.relative_to(REPO)}:{line} imports {name}"
           for path in files for name, line in imported_names(path, modules.get(path))
           if name.split(".")[0] in OLD_NAMES]
    assert not old, "bare import names (use worldloop.<package>):\n" + "\n".join(old)


def test_every_package_is_packaged() -> None:
    """Each folder with an ``__init__.py`` is listed in pyproject.toml's packages: the wheel carries it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in module_files().items() if path.name == "__init__.py"}
    assert folders <= listed, f"not in pyproject.toml's packages: {sorted(folders - listed)}"


@pytest.mark.parametrize("module", sorted(module_files()))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_the_check_sees_a_cycle_and_a_wrong_way_import(tmp_path: Path) -> None:
    """The checks themselves: a two-module loop and a models → streaming import are found."""
    (tmp_path / "a.py").write_text("from worldloop.models import b\n")
    (tmp_path / "b.py").write_text("from . import a\nimport worldloop.streaming.engine\n")
    modules = {"worldloop.models.a": tmp_path / "a.py", "worldloop.models.b": tmp_path / "b.py",
               "worldloop.streaming.engine": tmp_path / "a.py"}
    edges = project_edges(modules)
    assert edges["worldloop.models.b"] == {"worldloop.models.a": 1, "worldloop.streaming.engine": 2}
    assert find_cycle(edges) == ["worldloop.models.a", "worldloop.models.b", "worldloop.models.a"]
