"""The shape of the code (issue #14): small modules, imports that run one way."""

from __future__ import annotations

import ast
from pathlib import Path

import mlpool

SOURCE = Path(mlpool.__file__).resolve().parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    return {("mlpool." + path.stem if path.stem != "__init__" else "mlpool"): path for path in SOURCE.glob("*.py")}


def _imports(path: Path) -> set[str]:
    """The mlpool modules ``path`` imports when it is imported (module level:
    not those under TYPE_CHECKING, nor those a function imports when called)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlpool"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mlpool")}
    return found


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycle_among_the_modules():
    graph = {name: _imports(path) for name, path in _modules().items()}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        state[name] = "done"
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_a_cycle(tmp_path):
    """The check above can fail: two modules that import each other are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from mlpool.b import x\n")
    b.write_text("import mlpool.a\n")
    assert _imports(a) == {"mlpool.b"} and _imports(b) == {"mlpool.a"}
