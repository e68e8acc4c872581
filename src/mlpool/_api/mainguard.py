"""Refusing, at once and in one sentence, a pool created where spawned processes re-create it.

Spawned workers (and the model template) import the main script again, as
``__mp_main__``. A pool created at the top level of that script, outside
``if __name__ == "__main__":``, would then be created again in every child;
Python refuses that deep inside multiprocessing, after the parent waited for
workers that never load. :func:`check_main_guard` sees it before anything
starts: in the parent (the script's own top-level statement that led here is
outside the guard) and in a child importing the script (the bootstrapping
flag multiprocessing itself checks).
"""

from __future__ import annotations

import ast
import functools
import multiprocessing
import os
import sys
import types

_ADVICE = (
    'create the pool under `if __name__ == "__main__":` (or in a function called from there): worker '
    "processes are spawned and import the main script again, which would create the pool again"
)


def check_main_guard() -> None:
    """Raise RuntimeError if the pool being created is outside the
    main script's ``if __name__ == "__main__":`` block, or inside a spawned
    child importing that script. Scripts only: ``python -c``, a REPL or a
    notebook have no main file for children to import."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(f"MLPool was created while a worker process was importing the main script: {_ADVICE}")
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path or not path.endswith(".py"):
        return
    path = os.path.abspath(path)
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "<module>" and frame.f_globals is main.__dict__:
            break
        frame = frame.f_back
    # Not reached from the script's own top-level code (a thread, an imported
    # app, code exec'd in the script's namespace): nothing to point at.
    if frame is None or os.path.abspath(frame.f_code.co_filename) != path:
        return
    line = frame.f_lineno
    guarded = _guarded_lines(path)
    if guarded is None or line in guarded:
        return
    raise RuntimeError(f"MLPool was created at the top level of {path}, line {line}: {_ADVICE}")


@functools.lru_cache(maxsize=8)
def _guarded_lines(path: str) -> frozenset[int] | None:
    """The lines of ``path`` inside an ``if __name__ == "__main__":`` block (None: unreadable)."""
    try:
        with open(path, encoding="utf-8") as source:
            tree = ast.parse(source.read(), path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test):
            for statement in node.body:
                end = statement.end_lineno or statement.lineno
                lines.update(range(statement.lineno, end + 1))
    return frozenset(lines)


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = (test.left, test.comparators[0])
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    mains = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(mains) == 1
