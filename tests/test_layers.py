"""The package's layers stay acyclic: no module imports, even inside a function, a module that imports it back.

A cycle hidden by a function-level import works until the import order changes, then fails as a half-initialised
module; this walks every import statement of src/encdiff, so a new one shows here first."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "encdiff"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    child = f"{target}.{alias.name}"
                    graph[name] |= {child} if child in modules else ({target} if target in modules else set())
            elif isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):  # a package's __init__ re-exporting its own modules
                continue
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_sees_function_level_imports_and_finds_a_planted_cycle():
    graph = import_graph()
    assert "encdiff.pipeline" in graph["encdiff.training.diffusion"]
    assert "encdiff.featurenet" in graph["encdiff.evaluate"]  # imported inside a function
    planted = {**graph, "encdiff.schedules": graph["encdiff.schedules"] | {"encdiff.samplers"}}
    cycle = find_cycle(planted)
    assert cycle is not None and {"encdiff.samplers", "encdiff.schedules"} <= set(cycle)


def test_no_module_imports_back_into_a_module_that_imports_it():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)
