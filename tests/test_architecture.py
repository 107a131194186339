"""The package's import structure: imports go down the pipeline, never up, never in circles.

The order of the subpackages is written once, in :data:`dynconvert.PIPELINE`; this test walks
every import statement of the package (module level and inside functions) and fails on an
import of a later stage, or on a cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dynconvert

PACKAGE = Path(dynconvert.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every import of a dynconvert module in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` may name a submodule
                submodule = f"{target}.{alias.name}"
                found.append((submodule if submodule in _all_modules() else target, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == "dynconvert"]


def _all_modules() -> set[str]:
    return set(MODULES)


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_subpackage_has_a_place_in_the_pipeline():
    stages = {_stage(m) for m in MODULES} - {""}
    placed = {name for tier in dynconvert.PIPELINE for name in tier}
    assert stages <= placed, f"not in dynconvert.PIPELINE: {sorted(stages - placed)}"


def test_imports_go_down_the_pipeline():
    tier_of = {name: i for i, tier in enumerate(dynconvert.PIPELINE) for name in tier}
    upward = []
    for module, path in MODULES.items():
        stage = _stage(module)
        if not stage:
            continue  # the package root re-exports the public API lazily
        for target, line in _imports(path):
            other = _stage(target)
            if target not in MODULES or other in ("", stage):
                continue
            if tier_of[other] >= tier_of[stage]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {
        module: {target for target, _ in _imports(path) if target in MODULES and target != module}
        for module, path in MODULES.items()
    }
    # A package's __init__ imports its own modules; a module importing its package's
    # __init__ for a name it re-exports would make a trivial cycle: count those too.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
