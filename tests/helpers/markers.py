"""A FIFO the stream tests' generators report to, one line per event
(``helpers.stream_workloads``): tests wait on those events, never on time."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path


class Markers:
    """The read end of a FIFO the generators write one line per event to."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self._r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._w = os.open(path, os.O_WRONLY)  # ours: the FIFO never reads as ended
        self._buffer = b""

    def __str__(self) -> str:
        return self.path

    def next(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no event from the generator within {timeout}s"
            self._buffer += os.read(self._r, 65536)
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def until(self, prefix: str, timeout: float = 30.0) -> str:
        """The next line starting with ``prefix`` (earlier ones are skipped)."""
        deadline = time.monotonic() + timeout
        while not (line := self.next(max(0.0, deadline - time.monotonic()))).startswith(prefix):
            pass
        return line

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
