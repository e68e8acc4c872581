"""A generator for the tests of clients that leave a stream (#24.6; imported by spawned workers)."""

from __future__ import annotations

import itertools

from helpers.stream_workloads import _mark


def gated(model: dict, markers: str, gate: str):
    """Mark "started"; with a ``gate``, wait until the test writes to it; then
    yield "first", 1, 2, 3, ... for ever; mark "finally"."""
    _mark(markers, "started")
    try:
        if gate:
            with open(gate) as f:
                f.read()
        yield "first"
        yield from itertools.count(1)
    finally:
        _mark(markers, "finally")
