"""The models and scoring functions of the shared-pool tests (every API process imports these).

The loader writes one file per load into ``$MLPOOL_TEST_LOADS`` (when set), so
a test counts how many times the models were loaded across all processes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any


def load() -> dict[str, Any]:
    directory = os.environ.get("MLPOOL_TEST_LOADS")
    if directory:
        Path(directory, f"load-{os.getpid()}-{uuid.uuid4().hex}").touch()
    return {"pid": os.getpid()}


MODELS = {"m": load}


def pid(model: dict[str, Any]) -> int:
    return model["pid"]


def double(model: dict[str, Any], x: Any) -> Any:
    return x * 2


def wait_on(model: dict[str, Any], fifo: str) -> int:
    """Blocks until the test writes to ``fifo`` (see conftest.Fifo); the worker's pid."""
    Path(fifo + ".pid").write_text(str(os.getpid()))
    with open(fifo) as f:
        f.read()
    return os.getpid()


def append_tag(model: dict[str, Any], log: str, tag: str) -> str:
    with open(log, "a") as f:
        f.write(tag + "\n")
    return tag


def loads(directory: Path) -> int:
    """How many times the models were loaded (files written by :func:`load`)."""
    return len(list(directory.glob("load-*")))


def load_fails() -> None:
    raise RuntimeError("the model file is corrupt")


def load_gated() -> dict[str, Any]:
    """Waits until the test writes to the FIFO ``$MLPOOL_TEST_GATE`` (see conftest.Fifo)."""
    gate = os.environ["MLPOOL_TEST_GATE"]
    Path(gate + ".pid").write_text(str(os.getpid()))
    with open(gate) as f:
        f.read()
    return load()


def load_v2() -> dict[str, Any]:
    return {**load(), "version": 2}


def version(model: dict[str, Any]) -> int:
    return model.get("version", 1)


def quick_or_wait(model: dict[str, Any], fifo: str | None) -> int:
    """Returns at once, or (given a FIFO) waits on it as :func:`wait_on` does."""
    return os.getpid() if fifo is None else wait_on(model, fifo)
