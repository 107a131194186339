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


# The dependencies a user may lack: imported where used, so the rest works without them.
OPTIONAL_DEPENDENCIES = (
    "onnx",
    "onnxruntime",
    "onnxscript",
    "matplotlib",
    "tensorboard",
    "huggingface_hub",
)
OPTIONAL_MARK = "# optional dependency"
# Required modules imported inside a function on purpose, each with the reason.
KEPT_LAZY = {
    # timm takes seconds to import, and `import dynconvert` loads the layers.
    ("layers/conv2d_same.py", "timm.layers"),
    ("layers/std_conv.py", "timm.layers"),
}


def _imports_in_functions(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    found = []
    for function in (n for n in ast.walk(tree) if isinstance(n, functions)):
        found += [n for n in ast.walk(function) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return list({id(n): n for n in found}.values())  # a nested function is walked twice


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return ["." * node.level + (node.module or "")]


def test_imports_inside_functions_are_optional_dependencies_only():
    """Everything else is imported at the top of its module, where a reader sees it."""
    wrong = []
    for path in MODULES.values():
        where = path.relative_to(PACKAGE).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in _imports_in_functions(ast.parse("\n".join(lines))):
            for name in _imported(node):
                line = lines[node.lineno - 1]
                if name.split(".")[0] in OPTIONAL_DEPENDENCIES:
                    if OPTIONAL_MARK not in line:
                        wrong.append(f"{where}:{node.lineno} lacks {OPTIONAL_MARK!r}: {line}")
                elif (where, name) not in KEPT_LAZY:
                    wrong.append(f"{where}:{node.lineno} imports {name} in a function")
    assert not wrong, "move these imports to the top of the module:\n" + "\n".join(wrong)
