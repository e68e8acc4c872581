"""A worker's pipe as its readers see it: who reads it, what was read, who waits on it.

The process side of a worker (its state, its jobs, its death) is the
Supervisor's and lives in ``WorkerHandle``; the pipe is the readers'
(``_processes.readers.PipeReaders``) and lives here, one per worker
(``worker.pipe``). Which fields change under which lock is written beside them.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from mlpool._wire.transport import FrameReader


class WorkerPipe:
    """The parent's end of one worker's duplex pipe."""

    __slots__ = ("conn", "fd", "sock", "frames", "eof", "read_lock", "read_by", "registered", "watchers")

    def __init__(self, conn: Any) -> None:
        """``conn``: the parent's end (a multiprocessing Connection or a
        socket). Raises OSError (out of descriptors)."""
        self.conn = conn
        self.fd: int = conn.fileno()  # writes (blocking) go here; selectors and loops watch it
        # Reads use recv(MSG_DONTWAIT) on a second handle of the same socket,
        # so a reader woken for data another reader took never blocks, while
        # writes on ``fd`` stay blocking.
        self.sock = socket.socket(fileno=os.dup(self.fd))
        # Under ``read_lock``: the bytes read and not yet a whole frame, the
        # end of file, and who reads: None (the manager thread), a caller
        # thread's token, or an event loop (see PipeReaders: "loans").
        self.read_lock = threading.Lock()
        self.frames = FrameReader()
        self.eof = False
        self.read_by: Any = None
        # Under the engine's lock: in the manager's selector; who may still
        # wait on ``fd`` or the sentinel (loops with an add_reader, caller
        # threads polling). The last to leave closes a reaped worker.
        self.registered = False
        self.watchers: set[Any] = set()

    def close(self) -> None:
        """Close both handles and the buffer (once nobody waits on them)."""
        self.frames.close()
        self.sock.close()
        self.conn.close()
