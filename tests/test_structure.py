"""The package's imports point one way: config knows nothing of torch or of the other
packages, evaluation does not reach into training, kernels know nothing of the project, and
no module or package imports itself round a cycle (docs/architecture.md draws the layers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qwen_distillation"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from qwen_distillation.training import step`` imports a module, not a name.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "qwen_distillation"}


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


def package_of(module: str) -> str:
    """``qwen_distillation.losses.fused`` -> ``losses``; top-level modules are their own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        # A package's __init__ re-exports its own modules: that is not an edge between packages.
        edges = {package_of(t) for t in targets} - {package_of(module)}
        packages.setdefault(package_of(module), set()).update(edges)
    return packages


# What each package may import from the project. Everything not listed is forbidden.
ALLOWED = {
    "errors": set(),
    "paths": {"errors"},
    "config": {"errors"},
    "kernels": set(),
    "data": {"errors", "paths"},
    "modeling": {"errors", "paths", "config", "data", "kernels"},
    "losses": {"errors", "kernels"},
    "evaluation": {"errors", "paths", "config", "data", "modeling", "losses"},
    "training": {"errors", "paths", "config", "data", "modeling", "losses", "kernels", "evaluation"},
}


def test_no_module_imports_itself_round_a_cycle():
    assert _cycle(import_graph()) is None, f"import cycle: {' -> '.join(_cycle(import_graph()))}"


def test_no_package_imports_itself_round_a_cycle():
    packages = _package_graph(import_graph())
    assert _cycle(packages) is None, f"package cycle: {' -> '.join(_cycle(packages))}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below_them(package):
    graph = import_graph()
    offending = sorted(f"{module} -> {target}" for module, targets in graph.items() if package_of(module) == package
                       for target in targets
                       if package_of(target) != package and package_of(target) not in ALLOWED[package])
    assert not offending, f"{package}/ may import only {sorted(ALLOWED[package])} of the project: {offending}"


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    module = tmp_path / "qwen_distillation" / "config" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from qwen_distillation.training import step\n"
                      "from ..losses import fused\n")
    found = _imports(module, "qwen_distillation.config.x")
    assert {"qwen_distillation.training.step", "qwen_distillation.losses.fused"} <= found
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_importing_the_config_loads_neither_torch_nor_triton():
    code = ("import sys, qwen_distillation.config, qwen_distillation.config.validate; "
            "print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
