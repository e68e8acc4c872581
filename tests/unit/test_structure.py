"""The shape of the code: small modules, imports that run one way, a worker's side apart.

The package is split by the process each part runs in (see docs/design.md):
``_worker`` runs in a worker or the template, ``_wire`` on both sides, and
neither imports anything of the API process's side (``_api``, ``_engine``,
``_processes``), not even inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mlpool

SOURCE = Path(mlpool.__file__).resolve().parent
MAX_LINES = 500


PARENT_SIDE = ("mlpool._api", "mlpool._engine", "mlpool._processes")
WORKER_SIDE = ("_worker", "_wire")


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own)."""
    found = {}
    for path in SOURCE.rglob("*.py"):
        parts = ("mlpool", *path.relative_to(SOURCE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _all_imports(path: Path) -> set[str]:
    """Every mlpool module ``path`` names in an import, wherever the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlpool"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mlpool")}
    return found


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


def test_the_package_is_split_by_side():
    packages = {name.split(".")[1] for name in _modules() if name.count(".") >= 1}
    assert {"_api", "_engine", "_processes", "_shared", "_wire", "_worker"} <= packages
    public = sorted(name for name in _modules() if name.count(".") == 1 and not name.split(".")[1].startswith("_"))
    assert public == ["mlpool.errors", "mlpool.fastapi", "mlpool.prometheus"]
    flat = sorted(name for name in _modules() if name.count(".") == 1 and name.split(".")[1].startswith("_"))
    sides = ["_api", "_engine", "_processes", "_shared", "_wire", "_worker"]
    assert flat == [f"mlpool.{side}" for side in sides]


def test_a_worker_s_side_imports_nothing_of_the_api_process_s_side():
    wrong = {
        name: sorted(dep for dep in _all_imports(path) if dep.startswith(PARENT_SIDE))
        for name, path in _modules().items()
        if name.split(".")[1:2] and name.split(".")[1] in WORKER_SIDE
    }
    assert {name: deps for name, deps in wrong.items() if deps} == {}


def test_the_side_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from mlpool._engine.jobs import Job\n")
    assert _all_imports(module) == {"mlpool._engine.jobs"} and _imports(module) == set()
