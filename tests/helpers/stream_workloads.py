"""Generator functions for the stream tests (imported by spawned workers).

They tell the test what they did through ``markers``: a FIFO the test reads
(see ``helpers.markers``), one line per event, so tests wait on events,
never on time.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _mark(markers: str, text: str) -> None:
    fd = os.open(markers, os.O_WRONLY)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def count(model: dict, n: int):
    yield from range(n)


def first_then_gate(model: dict, gate: str):
    """Yield "first", then wait until the test writes to ``gate``, then "second"."""
    yield "first"
    with open(gate) as f:
        f.read()
    yield "second"


def marked_forever(model: dict, markers: str):
    """Yield 0, 1, 2, ... for ever; mark each item as produced, and the
    generator's ``finally`` with how many it produced, and its pid."""
    produced = 0
    try:
        while True:
            _mark(markers, f"item {produced}")
            yield produced
            produced += 1
    finally:
        _mark(markers, f"finally {produced} {os.getpid()}")


def stuck_after_one(model: dict, markers: str, gate: str):
    """One item, then stuck between yields until ``gate`` opens (never, in the tests)."""
    try:
        yield os.getpid()
        _mark(markers, "stuck")
        with open(gate) as f:
            f.read()
        yield "released"
    finally:
        _mark(markers, "finally")


def raise_after(model: dict, n: int):
    yield from range(n)
    raise ValueError(f"failed after {n} items")


def crash_after(model: dict, n: int, how: str):
    yield from range(n)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def crash_after_release(model: dict, n: int, fifo: str):
    """Yield ``n`` items, then exit once the test opens ``fifo`` (it received them)."""
    yield from range(n)
    with open(fifo) as f:
        f.read()
    os._exit(3)


def crash_first_time(model: dict, marker: str, n: int):
    """Crash before the first item the first time (``marker`` does not exist yet)."""
    if not Path(marker).exists():
        Path(marker).write_text("crashed once")
        os._exit(5)
    yield from range(n)


def arrays(model: dict, n: int, size: int):
    import numpy

    for i in range(n):
        yield numpy.full(size, i % 251, dtype=numpy.uint8)


def not_iterable(model: dict) -> int:
    return 42


def unpicklable_second(model: dict, markers: str):
    import threading

    try:
        yield 1
        yield threading.Lock()
        yield 3
    finally:
        _mark(markers, "finally")


def returns_list(model: dict, n: int) -> list:
    return list(range(n))


def pid(model: dict) -> int:
    return os.getpid()
