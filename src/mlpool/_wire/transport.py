"""Moving wire messages (see ``_wire.protocol``) over sockets, with descriptors.

- Worker pipes: a byte stream of frames. :func:`send_frames` writes frames
  and the descriptors of their shared memory (``SCM_RIGHTS``); a
  :class:`FrameReader` reads without blocking, reassembles frames, and
  hands each one its descriptors.
- The template's channel: a ``SOCK_SEQPACKET`` socket, one pickled message
  per packet (:func:`send_packet`, :func:`recv_packet`).

Imports nothing from mlpool but ``_wire.protocol``: both sides of every pipe use it.
"""

from __future__ import annotations

import array
import os
import pickle
import socket
from collections import deque

from mlpool._wire.protocol import _HEADER, KNOWN_KINDS, FromWorker, ToWorker, decode
from mlpool._wire.template_protocol import FromTemplate, ToTemplate

# Linux's SCM_MAX_FD: sendmsg refuses more descriptors in one call (EINVAL),
# so one recvmsg never brings more: a buffer this size is never truncated.
MAX_FDS_PER_SEND = 253
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_SEND * array.array("i").itemsize) if hasattr(socket, "CMSG_SPACE") else 0
# The most one read makes room for: a frame longer than that takes several reads.
MAX_READ = 64 * 1024 * 1024
# Plain ints: flags are IntFlag members, and & on those runs Python code.
_DONTWAIT = int(socket.MSG_DONTWAIT)
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 0))


class DescriptorsLost(OSError):
    """The kernel dropped descriptors sent with a message (MSG_CTRUNC): the
    frames that needed them cannot be decoded. A protocol bug, never a
    normal end of the connection."""


class FrameReader:
    """Reassembles frames from the bytes of one socket; one read may bring many
    frames or part of one. Descriptors sent alongside are queued in order.

    Reads go through one reusable buffer: allocating a fresh 256 KiB bytes
    object per read costs a page-faulting mmap each time (tens of µs).
    """

    __slots__ = ("_buf", "_scratch", "fds")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scratch = bytearray(1 << 16)
        self.fds: deque[int] = deque()

    def _room(self) -> memoryview:
        wanted = min(MAX_READ, max(1 << 16, self.missing()))
        if len(self._scratch) < wanted:
            self._scratch = bytearray(wanted)
        return memoryview(self._scratch)

    def recv_from(self, sock: socket.socket, flags: int = _DONTWAIT) -> bool:
        """Read what ``sock`` has (by default without blocking); False at end of file.

        Raises BlockingIOError when there is nothing to read.
        """
        # Between frames (the usual case) the scratch buffer fits any start of one.
        with memoryview(self._scratch) if not self._buf else self._room() as room:
            n, ancillary, msg_flags, _ = sock.recvmsg_into([room], _ANCILLARY, flags)
            self._buf += room[:n]
        if ancillary:
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                    self.fds.extend(fds)
            if msg_flags & _CTRUNC:
                raise DescriptorsLost(
                    "descriptors sent with a message were lost (MSG_CTRUNC): the sender sent more than "
                    f"{MAX_FDS_PER_SEND} in one sendmsg"
                )
        return n > 0

    def missing(self) -> int:
        """Bytes still missing from the frame being received (0: none started)."""
        if len(self._buf) < _HEADER.size:
            return 0
        length, _ = _HEADER.unpack_from(self._buf)
        return _HEADER.size + length - len(self._buf)

    def feed(self, data: bytes) -> None:
        """Add bytes received some other way (a Ray actor's call argument)."""
        self._buf += data

    def messages(self) -> list[ToWorker | FromWorker]:
        """Every complete message read so far, in order. Raises ValueError as
        soon as a header names no message kind (bytes that are no frame: the
        length they announce is not waited for)."""
        buf = self._buf
        out = []
        pos, end = 0, len(buf)
        with memoryview(buf) as view:
            while end - pos >= _HEADER.size:
                length, kind = _HEADER.unpack_from(buf, pos)
                if kind not in KNOWN_KINDS:
                    raise ValueError(f"a frame header names message kind {kind}, which no message has")
                stop = pos + _HEADER.size + length
                if stop > end:
                    break
                out.append(decode(kind, bytes(view[pos + _HEADER.size : stop]), self.fds))
                pos = stop
        if pos:
            del buf[:pos]
        return out

    def close(self) -> None:
        """Close descriptors received but never claimed (a frame cut by a death)."""
        while self.fds:
            os.close(self.fds.popleft())


def send_frames(sock: socket.socket, frames: list[tuple[bytes, list[int]]]) -> None:
    """Send frames in order; each frame's descriptors arrive before its last
    byte (with its first bytes, at most MAX_FDS_PER_SEND per byte), any number."""
    if len(frames) == 1 and not frames[0][1]:
        sock.sendall(frames[0][0])
        return
    pending: list[bytes] = []
    for frame, fds in frames:
        if not fds:
            pending.append(frame)
            continue
        if pending:
            sock.sendall(b"".join(pending))
            pending = []
        _send_with_fds(sock, frame, fds)
    if pending:
        sock.sendall(pending[0] if len(pending) == 1 else b"".join(pending))


def _send_with_fds(sock: socket.socket, frame: bytes, fds: list[int]) -> None:
    """One frame and its descriptors: each sendmsg but the last carries one
    byte and the next MAX_FDS_PER_SEND descriptors, the last the rest."""
    chunks = [fds[i : i + MAX_FDS_PER_SEND] for i in range(0, len(fds), MAX_FDS_PER_SEND)]
    if len(chunks) > len(frame):  # a frame describes its descriptors: never this short
        raise ValueError(f"a frame of {len(frame)} bytes cannot carry {len(fds)} descriptors")
    with memoryview(frame) as view:
        pos = 0
        for i, chunk in enumerate(chunks):
            end = pos + 1 if i < len(chunks) - 1 else len(frame)
            pos += sock.sendmsg([view[pos:end]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))])
        if pos < len(frame):
            sock.sendall(view[pos:])


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (blocking)."""
    with memoryview(data) as view:
        while view:
            written = os.write(fd, view)
            view = view[written:]


# A LoadFailed carries up to 2 x 32 KiB of text; the default socket buffer
# (about 208 KiB) bounds a packet.
MAX_PACKET = 256 * 1024
_FD_ITEM = array.array("i").itemsize


def send_packet(
    sock: socket.socket, msg: ToTemplate | FromTemplate, fds: list[int] | tuple[int, ...] = (), flags: int = 0
) -> None:
    """Send one message (and descriptors) on the template's channel."""
    socket.send_fds(sock, [pickle.dumps(msg)], list(fds), flags)


def recv_packet(sock: socket.socket, flags: int = 0) -> tuple[ToTemplate | FromTemplate | None, list[int]]:
    """One message from the template's channel and its descriptors; (None, [])
    at end of file. Raises BlockingIOError with MSG_DONTWAIT and nothing to read."""
    # Not socket.recv_fds: before Python 3.12 it ignores ``flags``.
    data, ancillary, _, _ = sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(4 * _FD_ITEM), flags)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_ITEM])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return pickle.loads(data), list(fds)
