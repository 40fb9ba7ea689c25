"""The package's shape (README, "Module map"): small modules and classes, imports downward."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "niftidrop"
# "About 400" and "about 250" lines (README, "Module map"): a little room, not a loophole.
MODULE_LINES = 420
CLASS_LINES = 260
# The package's facade: it re-exports the API (lazily), and nothing may import it back.
FACADE = "__init__"


def modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed, by name (`api`, `__init__`, ...)."""
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def imported_modules(tree: ast.Module, known: set[str]) -> Iterator[str]:
    """The package's modules that `tree` imports anywhere (in functions too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "niftidrop":
                    yield parts[1] if len(parts) > 1 else FACADE
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "niftidrop":
                continue
            if len(parts) > 1:
                yield parts[1]
                continue
            for alias in node.names:  # `from niftidrop import x`: a module or the facade's
                yield alias.name if alias.name in known else FACADE


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    parsed = modules()
    known = set(parsed)
    return {name: set(imported_modules(tree, known)) - {name} for name, tree in parsed.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `[a, b, ..., a]`, or None if the graph has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph.get(name, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def module_map() -> list[list[str]]:
    """The README's module map: the modules named in each row's first cell, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Code layout") :]
    section = section[: section.index("\n## ", 1)]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [re.findall(r"`(\w+)\.py`", cell) for cell in rows]


class TestSizes:
    @pytest.mark.parametrize("name", sorted(modules()))
    def test_module_is_small(self, name: str) -> None:
        """No module of the package is over about 400 lines."""
        lines = len((PACKAGE / f"{name}.py").read_text().splitlines())
        assert lines <= MODULE_LINES, f"{name}.py has {lines} lines"

    def test_classes_are_small(self) -> None:
        """No class of the package is over about 250 lines."""
        large = [
            f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in modules().items()
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > CLASS_LINES
        ]
        assert not large


class TestImports:
    def test_imports_flow_downward(self) -> None:
        """No module imports one that imports it back, directly or through others."""
        assert find_cycle(import_graph()) is None

    def test_nothing_imports_the_facade(self) -> None:
        """Modules import each other, never the package's `__init__`."""
        importers = sorted(name for name, targets in import_graph().items() if FACADE in targets)
        assert importers == []


class TestModuleMap:
    def test_names_every_module_once(self) -> None:
        """The README's module map names each module of the package, once."""
        named = [name for row in module_map() for name in row]
        assert sorted(named) == sorted(modules())

    def test_lists_modules_below_what_they_import(self) -> None:
        """Read top to bottom, the map is the import order: a module imports only
        modules in its own row or above it."""
        row_of = {name: number for number, row in enumerate(module_map()) for name in row}
        upward = sorted(
            f"{name} imports {target}"
            for name, targets in import_graph().items()
            for target in targets
            if row_of[target] > row_of[name]
        )
        assert upward == []


class TestCycleFinder:
    def test_finds_a_cycle_through_others(self) -> None:
        """A cycle a -> b -> c -> a is found and named."""
        assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]

    def test_a_tree_has_none(self) -> None:
        """A diamond (two paths to one module) is not a cycle."""
        assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None

    def test_reads_imports_in_functions(self) -> None:
        """A lazy import inside a function counts, and `from niftidrop import x` of a
        module names that module."""
        tree = ast.parse(
            "def f():\n    from niftidrop import api, __version__\n    import niftidrop.cli\n"
        )
        assert sorted(imported_modules(tree, {"api", "cli"})) == [FACADE, "api", "cli"]
