"""Loaders and scoring functions for the worker-side tests.

This module imports nothing from mlpool (nor anything that does), so a
worker that imports it to run one of these functions loads no mlpool module
the worker itself did not need.
"""

from __future__ import annotations

import os
import sys
import threading


def load_empty() -> dict:
    return {}


def loaded_modules(model: dict) -> list[str]:
    """The modules loaded in this worker."""
    return sorted(sys.modules)


def raise_base_exception(model: dict, kind: str) -> None:
    if kind == "SystemExit":
        sys.exit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt("pressed in the worker")
    if kind == "GeneratorExit":
        raise GeneratorExit()
    raise CustomBaseException("a BaseException of its own")


class CustomBaseException(BaseException):
    pass


class UnprintableUnpicklable(Exception):
    """An exception that cannot be pickled (a lock) and whose __str__ raises."""

    def __init__(self) -> None:
        super().__init__("never shown")
        self.lock = threading.Lock()

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class NotesRaise(Exception):
    """Formatting its traceback raises (traceback reads __notes__)."""

    @property
    def __notes__(self) -> list:
        raise RuntimeError("__notes__ is broken")


class ExitOnUnpickle:
    """Pickles fine; unpickling it raises SystemExit (in whichever process loads it)."""

    def __reduce__(self) -> tuple:
        return (sys.exit, (7,))


def raise_awkward(model: dict, kind: str) -> None:
    if kind == "lone surrogate":
        raise ValueError("bad byte \udcff in the input")
    if kind == "unpicklable, __str__ raises":
        raise UnprintableUnpicklable()
    if kind == "traceback formatting raises":
        raise NotesRaise("with broken notes")
    raise AssertionError(kind)


def exit_on_unpickle(model: dict) -> ExitOnUnpickle:
    return ExitOnUnpickle()


def pid(model: dict) -> int:
    return os.getpid()


def block_on(model: dict, fifo: str) -> int:
    """Block until the test writes to ``fifo`` (its pid in ``fifo + ".pid"`` first)."""
    with open(fifo + ".pid", "w") as f:
        f.write(str(os.getpid()))
    with open(fifo) as f:
        f.read()
    return os.getpid()
