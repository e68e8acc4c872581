"""An API process's attachment to its pool host: the socket, its writer, its reader.

Callers never block on the socket: every message goes through an
:class:`~mlpool._shared.channel.Outbox` (a host that is stopped or hung
stalls only the writer thread, and the callers' own waits end on their
deadlines). The reader thread hands every message to the engine, then, at
the end of the connection (the host died, or this process shut it), says so
once.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from contextlib import suppress

from mlpool._shared.channel import Outbox
from mlpool._shared.rendezvous import Attached
from mlpool.errors import PoolBrokenError


class Connection:
    """One attachment; ``take(msg, fds)`` gets each message, ``lost(self, reason)`` the end."""

    def __init__(
        self,
        attached: Attached,
        take: Callable[[tuple, list[int]], None],
        lost: Callable[[Connection, BaseException | None], None],
    ) -> None:
        self.channel = attached.channel
        welcome = attached.welcome
        self.host_pid: int = welcome["host_pid"]
        self.processes: int = welcome["processes"]
        self.slots: int = welcome["slots"]
        self.outbox = Outbox(self.channel, "mlpool-shared-send")
        self._take = take
        self._lost = lost
        threading.Thread(target=self._read, name="mlpool-shared-reader", daemon=True).start()

    def send(self, msg: tuple, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Queue ``msg``; ``fds`` stay the caller's (the outbox sends copies)."""
        self.outbox.put(msg, [os.dup(fd) for fd in fds])

    def lost(self, reason: BaseException | None) -> PoolBrokenError:
        """The error of the jobs in flight when this connection ended unasked."""
        if self.outbox.interrupted:
            what = "the connection to the pool host was reset: a send was interrupted (Ctrl-C) in mid-message"
        else:
            why = f": {reason!r}" if reason is not None else ""
            what = f"the pool host (pid {self.host_pid}) died{why}"
        return PoolBrokenError(f"{what}; the jobs in flight failed, and the next call attaches again")

    def close(self) -> None:
        """End the connection: the reader sees it and reports the end."""
        with suppress(OSError):
            self.channel.sock.shutdown(socket.SHUT_RDWR)

    def _read(self) -> None:
        reason: BaseException | None = None
        try:
            while (messages := self.channel.receive()) is not None:
                for msg, fds in messages:
                    self._take(msg, fds)
        except Exception as exc:  # a broken connection (OSError), or bad data from the host
            reason = exc
        self.close()  # a writer blocked on a stopped host fails at once
        self.outbox.close()
        self.outbox.join(5.0)
        self.channel.close()
        self._lost(self, reason)
