"""The package's layers, as doc/architecture.md draws them, hold in the code: no import cycle between
irmiddleware's modules, the lower layers never import the higher ones, nothing outside `_router.py`
reaches into a `Router`'s private state, and no test imports a private module of
`irmiddleware.testing`. Read from the source with `ast` (module-level imports: an import inside a
function is a deliberate late one, such as the CLI's)."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "irmiddleware"

# Layer -> packages it must never import (module-level). Lower layers know nothing of higher ones.
FORBIDDEN = {
    "irmiddleware._native": ("irmiddleware._router", "irmiddleware.proxy", "irmiddleware.hooks"),
    "irmiddleware._router": ("irmiddleware.proxy", "irmiddleware.hooks", "irmiddleware.testing"),
    "irmiddleware.http11": ("irmiddleware.proxy", "irmiddleware.testing", "irmiddleware.bench"),
    "irmiddleware.proxy": (
        "irmiddleware.testing",
        "irmiddleware.bench",
        "irmiddleware.sim",
        "irmiddleware.serve",
    ),
    "irmiddleware.adapters": ("irmiddleware.proxy", "irmiddleware.testing"),
    "irmiddleware.hooks": ("irmiddleware.proxy", "irmiddleware.adapters", "irmiddleware.testing"),
    "irmiddleware.sim": ("irmiddleware.proxy", "irmiddleware.testing", "irmiddleware.bench"),
    "irmiddleware.testing": ("irmiddleware.proxy", "irmiddleware.bench", "irmiddleware.sim"),
    "irmiddleware.bench": ("irmiddleware.proxy", "irmiddleware.testing"),
}


@functools.cache
def parsed(path: Path) -> ast.Module:
    """The syntax tree of a source file, parsed once per session (the checks below read every
    file, most of them several times)."""
    return ast.parse(path.read_text())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The irmiddleware modules `path` imports at module level (`from a import b` counts as
    `a.b` when that is a module, else as `a`)."""
    tree = parsed(path)
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("irmiddleware"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if not base.startswith("irmiddleware"):
                continue
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(path, known) if m != name} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    for start in sorted(edges):
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for target in sorted(edges.get(node, ())):
                if target == start:
                    return [*trail, start]
                if target not in trail and target not in done:
                    stack.append((target, [*trail, target]))
        done.add(start)
    return None


def test_no_import_cycle() -> None:
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The checker proves it can fail: the cycle _config ↔ _admission_config had once.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(layer: str) -> None:
    offending = {
        (name, target)
        for name, targets in graph().items()
        if name == layer or name.startswith(layer + ".")
        for target in targets
        for banned in FORBIDDEN[layer]
        if target == banned or target.startswith(banned + ".")
    }
    assert not offending


def private_router_uses(tree: ast.AST) -> list[str]:
    """Attribute reads like `router._table` or `self.router._ids_by_slot` (a Router private used
    from outside)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if "router" in name.lower():
                found.append(f"{name}.{node.attr}")
    return found


def test_nothing_outside_the_router_uses_its_privates() -> None:
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "plugins").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    uses = {
        str(path.relative_to(ROOT)): private_router_uses(parsed(path))
        for path in sources
        if path != PACKAGE / "_router.py"
    }
    assert {path: found for path, found in uses.items() if found} == {}
    assert private_router_uses(ast.parse("self.router._table.acquire(1)")) == ["router._table"]


def test_no_test_imports_a_private_testing_module() -> None:
    offending = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(parsed(path)):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            offending += [
                f"{path.name}: {name}" for name in names if name.startswith("irmiddleware.testing._")
            ]
    assert offending == []
