"""Messages between an API process and its pool host, with descriptors.

A connection is a Unix stream socket. Each message is a pickled tuple,
``(kind, nfds, *fields)``, framed by its length; the ``nfds`` descriptors it
carries (shared-memory files: a job's arguments, the room offered for its
result, a result or stream item the worker wrote in a file of its own) go
with it as ``SCM_RIGHTS`` and are handed to the reader in order, so the
message that names them takes them.

The API process writes with blocking sends under a lock (:meth:`Channel.send`):
a host that reads slowly slows its callers, which is back-pressure. The host
answers through an :class:`Outbox`, which never blocks the thread that
settles jobs (the host engine's manager thread): it sends at once when the
socket has room and leaves the rest to a writer thread of its own.

Nothing is unpickled from a connection before the host checked the peer's
credentials (``_shared.rendezvous``).
"""

from __future__ import annotations

import array
import os
import pickle
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterable
from contextlib import suppress

from mlpool._wire.transport import MAX_FDS_PER_SEND

_LENGTH = struct.Struct("<I")
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_SEND * array.array("i").itemsize)
_READ = 1 << 16
_DONTWAIT = int(socket.MSG_DONTWAIT)


def frame(msg: tuple) -> bytes:
    """``msg`` pickled and framed."""
    data = pickle.dumps(msg, 5)
    return _LENGTH.pack(len(data)) + data


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


class Channel:
    """One end of a connection: blocking sends from any thread, reads from one."""

    def __init__(self, sock: socket.socket, max_frame: int | None = None) -> None:
        self.sock = sock
        self.max_frame = max_frame  # a longer frame is refused (ValueError) before it is read
        self._send_lock = threading.Lock()
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def send(self, msg: tuple, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send ``msg`` and ``fds`` (the caller keeps its descriptors). Raises
        OSError if the other end is gone."""
        data = frame(msg)
        with self._send_lock:
            self.send_frame_locked(data, list(fds))

    def locked(self) -> threading.Lock:
        """The send lock: hold it to send several messages in a row, or to keep
        a state change and its message in the same order (``send_frame_locked``)."""
        return self._send_lock

    def send_frame_locked(self, data: bytes, fds: list[int]) -> None:
        sent = self.sock.sendmsg([data], _rights(fds)) if fds else self.sock.send(data)
        if sent < len(data):
            self.sock.sendall(memoryview(data)[sent:])

    def receive(self) -> list[tuple[tuple, list[int]]] | None:
        """Block until at least one whole message arrived: each with its
        descriptors (the receiver's to close). None at the end of the
        connection. Raises OSError on a broken one, ValueError on bad data."""
        while True:
            messages = self._parse()
            if messages:
                return messages
            data, ancillary, flags, _ = self.sock.recvmsg(_READ, _ANCILLARY)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if flags & getattr(socket, "MSG_CTRUNC", 0):
                raise ValueError("descriptors sent with a message were dropped (MSG_CTRUNC)")
            if not data:
                return None
            self._buf += data

    def _parse(self) -> list[tuple[tuple, list[int]]]:
        messages = []
        buf = self._buf
        start = 0
        while len(buf) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buf, start)
            if self.max_frame is not None and length > self.max_frame:
                raise ValueError(f"a message of {length} bytes, more than the {self.max_frame} expected")
            end = start + _LENGTH.size + length
            if len(buf) < end:
                break
            msg = pickle.loads(memoryview(buf)[start + _LENGTH.size : end])
            if type(msg) is not tuple or len(msg) < 2 or type(msg[1]) is not int:
                raise ValueError(f"not a message: {type(msg).__name__}")
            nfds = msg[1]
            if nfds > len(self._fds):
                raise ValueError(f"a message names {nfds} descriptors and {len(self._fds)} came")
            messages.append((msg, [self._fds.popleft() for _ in range(nfds)]))
            start = end
        if start:
            del buf[:start]
        return messages

    def close(self) -> None:
        """Close the socket and the descriptors received and not taken."""
        close_all(self._fds)
        self._fds.clear()
        try:
            self.sock.close()
        except OSError:
            pass


class Outbox:
    """Sends on one connection, from any thread, never blocking the caller
    (a peer that stops reading, stopped or hung, stalls only the writer).

    A message goes out at once when nothing waits before it and the socket
    has room; otherwise a writer thread sends it, in order. Descriptors
    given with a message are closed once sent (or once the connection is
    gone): the outbox owns them. An exception in the middle of a send (a
    Ctrl-C in the calling thread) may have sent part of a frame: the
    connection is shut down then, never left corrupt."""

    def __init__(self, channel: Channel, name: str) -> None:
        self._channel = channel
        self._queue: deque[tuple[bytes, list[int]]] = deque()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._busy = False  # the writer is sending one, outside the lock
        self._closed = False
        self.interrupted = False  # shut down after a send was cut in the middle of a frame
        self._thread = threading.Thread(target=self._write, name=name, daemon=True)
        self._thread.start()

    def locked(self) -> threading.RLock:
        """Hold it to keep a decision and its message in order (puts inside are fine)."""
        return self._lock

    def put(self, msg: tuple, fds: list[int] | None = None) -> None:
        data = frame(msg)
        fds = fds or []
        with self._lock:
            if self._closed:
                close_all(fds)
                return
            if self._queue or self._busy:
                self._queue.append((data, fds))
                self._cond.notify()
                return
            # The count sent lands in ``done`` inside C (list.extend over map), so an
            # exception raised right after the call (a Ctrl-C) cannot lose it.
            done: list[int] = []
            sock = self._channel.sock
            try:
                if fds:
                    done.extend(map(sock.sendmsg, ([data],), (_rights(fds),), (_DONTWAIT,)))
                else:
                    done.extend(map(sock.send, (data,), (_DONTWAIT,)))
            except BlockingIOError:
                pass
            except OSError:  # the peer is gone: its reader sees the end
                close_all(fds)
                self._closed = True
                return
            finally:
                self._rest(data, fds, done[0] if done else 0)

    def _rest(self, data: bytes, fds: list[int], sent: int) -> None:
        """(Under the lock.) Queue what ``put`` did not send; a frame that cannot
        be completed in order shuts the connection down."""
        if self._closed:
            return
        try:
            if sent:
                close_all(fds)
                fds, data = [], data[sent:]
            if data:
                self._queue.append((data, fds))
                self._cond.notify()
        except BaseException:
            if sent:  # part of a frame is out and the rest is lost
                self.interrupted = True
                self._break()
            raise

    def _break(self) -> None:
        self._closed = True
        with suppress(OSError):
            self._channel.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop sending; what is queued is dropped (its descriptors closed)."""
        with self._lock:
            self._closed = True
            queued, self._queue = self._queue, deque()
            self._cond.notify()
        for _, fds in queued:
            close_all(fds)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _write(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                data, fds = self._queue.popleft()
                self._busy = True
            try:
                with self._channel.locked():
                    self._channel.send_frame_locked(data, fds)
            except OSError:
                with self._lock:
                    self._closed = True
            finally:
                close_all(fds)
                with self._lock:
                    self._busy = False
