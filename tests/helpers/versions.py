"""Loaders whose version and behaviour a test sets in files (the reload_models tests).

A :class:`ModelFiles` directory holds ``version`` (what the next load reads,
like a model file replaced in place), per version an optional behaviour
(``raise``, ``crash``, ``segfault``, ``hang``, ``first-only``: the first load
succeeds, the others raise) and an optional gate: a FIFO the
next load of that version blocks on until the test releases it, so a test holds a
roll at the step it wants to look at without waiting on time.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path


class ModelFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        os.mkfifo(root / "never")  # nobody ever writes it: a load that hangs
        self.set(1)

    def set(self, version: int, behaviour: str = "ok") -> None:
        """The next load reads ``version`` and does ``behaviour``."""
        (self.root / f"behaviour-{version}").write_text(behaviour)
        (self.root / "version").write_text(str(version))

    def gate(self, version: int, fifo: object) -> None:
        """Make the next load of ``version`` wait until the test releases ``fifo`` (a conftest.Fifo)."""
        (self.root / f"gate-{version}").write_text(str(fifo))

    def loader(self, name: str = "m") -> functools.partial:
        return functools.partial(load_version, str(self.root), name)


def load_version(root: str, name: str) -> str:
    version = Path(root, "version").read_text()
    gate = Path(root, f"gate-{version}")
    if gate.exists():
        fifo = gate.read_text()
        gate.unlink()  # one load per gate
        Path(f"{fifo}.pid").write_text(str(os.getpid()))
        with open(fifo) as f:  # blocks until the test opens the FIFO
            f.read()
    behaviour = Path(root, f"behaviour-{version}").read_text()
    with open(Path(root, f"loads-{version}"), "a+") as f:  # one line per load of this version
        f.write(".\n")
        f.seek(0)
        loads = len(f.readlines())
    if behaviour == "raise" or (behaviour == "first-only" and loads > 1):
        raise RuntimeError(f"model file version {version} is corrupt")
    if behaviour == "crash":
        os._exit(7)
    if behaviour == "segfault":
        ctypes.string_at(0)
    if behaviour == "hang":
        with open(Path(root, "never")) as f:
            f.read()
    return f"{name}:{version}"


def load_constant(value: str) -> str:
    return value


def which(model: str) -> tuple[str, int]:
    """The model's version and the worker's pid."""
    return model, os.getpid()


def version_of(model: str, *args: object) -> str:
    return model


def model_after_release(model: str, fifo: str) -> str:
    """The model this job started with, returned once the test releases ``fifo``."""
    Path(fifo + ".pid").write_text(str(os.getpid()))
    with open(fifo) as f:
        f.read()
    return model
