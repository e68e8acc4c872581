"""A test-only iris scorer for the example app: a request whose first feature
is a hold code waits on a named pipe instead of scoring at once.

``HOLD_UNTIL_RELEASED`` (-1.0) waits until the test writes to the FIFO
``$HELD_IRIS_DIR/release``; ``HOLD_FOREVER`` (-2.0) waits on
``$HELD_IRIS_DIR/never``, which nobody writes: such a job outlasts any job
timeout whatever the machine's speed. Any other request scores as the app does.
"""

from __future__ import annotations

import os
import select
from pathlib import Path

HOLD_UNTIL_RELEASED = -1.0
HOLD_FOREVER = -2.0
GATES = {HOLD_UNTIL_RELEASED: "release", HOLD_FOREVER: "never"}
MAX_HOLD = 300.0  # seconds: a bound, so that a worker left behind by a failed test ends


def gate_dir() -> Path:
    return Path(os.environ["HELD_IRIS_DIR"])


def make_gates(directory: Path) -> None:
    """Create the FIFOs the held requests wait on, in ``directory``."""
    for name in GATES.values():
        os.mkfifo(directory / name)


def open_release(directory: Path) -> int:
    """Let every request held until release go, now and later: the returned
    descriptor holds the FIFO open with a byte in it; close it at the end."""
    fd = os.open(directory / GATES[HOLD_UNTIL_RELEASED], os.O_RDWR)
    os.write(fd, b"go")
    return fd


def wait_on_gate(name: str) -> None:
    """Block until the FIFO ``name`` has data (or a writer came and left), at most MAX_HOLD."""
    fd = os.open(gate_dir() / name, os.O_RDONLY | os.O_NONBLOCK)
    try:
        readable, _, _ = select.select([fd], [], [], MAX_HOLD)
    finally:
        os.close(fd)
    if not readable:
        raise TimeoutError(f"gate {name!r} stayed shut for {MAX_HOLD} s")


def score_iris(model, features: list[float]) -> int:
    """The app's iris scorer, after waiting on the gate the first feature names, if any."""
    from app import models  # the app's own (on the server's path, not the tests')

    gate = GATES.get(features[0])
    if gate is not None:
        wait_on_gate(gate)
    return models.score_iris(model, features)
