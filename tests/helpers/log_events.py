"""The ``mlpool`` log records with an ``event`` field, captured in order; wait for one without sleeping."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def of(self, *events: str, after: logging.LogRecord | None = None) -> list[logging.LogRecord]:
        """The records of ``events``, in order (those after the record ``after`` only)."""
        start = self.records.index(after) + 1 if after is not None else 0
        return [r for r in self.records[start:] if getattr(r, "event", None) in events]

    def wait_for(
        self, event: str, *, after: logging.LogRecord | None = None, timeout: float = 30.0
    ) -> logging.LogRecord:
        """The first record of ``event`` (after ``after``), once logged."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.of(event, after=after), timeout), f"no {event} logged"
            return self.of(event, after=after)[0]


@contextmanager
def captured() -> Iterator[Events]:
    """Capture the ``mlpool`` logger's records at INFO and above, for the block."""
    handler, logger = Events(), logging.getLogger("mlpool")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
