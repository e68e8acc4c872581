"""Worker stacks, the worker's half: its stack pipe, answered from a signal handler.

The parent (``mlpool._processes.stacks``, whose docstring draws the whole
exchange) gives each worker a pipe of its own; :func:`install` points
faulthandler at it, for dumps on ``DUMP_SIGNAL`` and for the fatal-error
dump of a crash. Python's own C-level handler of the signal, chained after
faulthandler's, writes the END byte (the signal number) once a dump is
whole; the worker writes ACK once its handlers are in place.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from typing import Any

DUMP_SIGNAL = signal.SIGUSR2
END = bytes([DUMP_SIGNAL])  # written by Python's signal handler after faulthandler's dump
ACK = b"\x06"  # the worker's handlers are in place


def install(fd: int) -> None:
    """Worker side, in its main thread: send stack dumps and fatal-error dumps to ``fd``.

    The descriptor stays open for the life of the process (faulthandler
    keeps its number). Where the dump signal cannot be set up (not the main
    thread), only fatal-error dumps go there, and the parent gets no ACK.
    """
    try:
        os.set_blocking(fd, False)  # set_wakeup_fd requires it; a full pipe truncates a dump, never blocks
        faulthandler.enable(file=fd, all_threads=True)
        signal.signal(DUMP_SIGNAL, _dumped)
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
        faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True, chain=True)
        os.write(fd, ACK)
    except (OSError, ValueError, RuntimeError):  # not the main thread...: no ACK, so never signalled
        return


def _dumped(signum: int, frame: Any) -> None:
    """Python's half of the dump signal: nothing to do (its C half wrote END)."""
