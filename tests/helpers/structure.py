"""What a module of mlpool imports, read from its source (no import runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import mlpool


def child_side(name: str) -> bool:
    """What a worker or the template may load of mlpool: its own package, the wire, the errors."""
    return name == "errors" or name.startswith(("_worker.", "_wire."))


def mlpool_imports(module: str) -> set[str]:
    """The mlpool modules ``module`` imports (any depth), read from the source."""
    package = Path(mlpool.__file__).parent
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((package / (name.replace(".", "/") + ".py")).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlpool."):
                todo.append(node.module.split(".", 1)[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("mlpool.")]
    return seen
