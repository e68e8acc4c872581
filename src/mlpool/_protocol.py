"""Wire messages between the parent and a worker, and their framing.

Each worker has one duplex pipe. Every message is one frame::

    [body length: u32][kind: u8][body]

Parent -> worker (``ToWorker``): ``Run`` (one job), ``RunBatch`` (jobs of a
batched function, one call), ``Stop``.
Worker -> parent (``FromWorker``): ``Ready``, ``LoadFailed``, ``Done``,
``Failed``, ``OverMemory``, ``Exiting``.

The hot messages (``Run``, ``Done``, ``Failed``) are packed with :mod:`struct`
around opaque pickled payloads: pickling a dataclass costs about 10 µs a round
trip, struct about 1 µs, and a job crosses the pipe twice. The rare control
messages are pickled whole. This module imports nothing from mlpool, so the
worker's side can import it cheaply.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from dataclasses import dataclass

_HEADER = struct.Struct("<IB")
_RUN = struct.Struct("<QIHI")  # job id, function id, model name length, function pickle length
_DONE = struct.Struct("<Qd")  # job id, seconds the call took
_FAILED = struct.Struct("<QdI")  # job id, seconds, length of the pickled exception

_RUN_KIND, _STOP_KIND, _RUN_BATCH_KIND = 1, 2, 3
_RUN_BATCH = struct.Struct("<IIHI")  # job count, function id, model name length, function pickle length
_READY_KIND, _LOAD_FAILED_KIND, _DONE_KIND, _FAILED_KIND, _EXITING_KIND, _OVER_MEMORY_KIND = 10, 11, 12, 13, 14, 15
_OVER_MEMORY = struct.Struct("<Q")  # resident bytes

MAX_FRAME = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Run:
    """Run one job. ``fn`` is the function's pickle the first time this worker
    sees ``fn_id``, else empty; ``payload`` is the pickled ``(args, kwargs)``."""

    job_id: int
    fn_id: int
    model: str
    fn: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class RunBatch:
    """Run a batched function once over the items of several jobs; answer
    each job with its own Done or Failed, in order."""

    job_ids: tuple[int, ...]
    fn_id: int
    model: str
    fn: bytes
    payloads: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish the jobs already received, answer ``Exiting`` and exit."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Every loader returned; the worker serves jobs from now on."""

    pid: int
    load_seconds: float


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """A loader raised or returned None; the worker exits after sending this."""

    model: str
    error: str
    traceback: str


@dataclass(frozen=True, slots=True)
class Done:
    """A job returned; ``result`` is its pickled return value."""

    job_id: int
    seconds: float
    result: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    """A job raised. ``error`` is the pickled exception (or a stand-in),
    ``traceback`` the worker's formatted traceback."""

    job_id: int
    seconds: float
    error: bytes
    traceback: str


@dataclass(frozen=True, slots=True)
class OverMemory:
    """After a job, the worker's resident memory passed max_memory_per_worker."""

    rss: int


@dataclass(frozen=True, slots=True)
class Exiting:
    """The worker obeys ``Stop`` and is about to exit."""


ToWorker = Run | RunBatch | Stop
FromWorker = Ready | LoadFailed | Done | Failed | OverMemory | Exiting


def _frame(kind: int, *parts: bytes) -> bytes:
    length = sum(len(p) for p in parts)
    if length > MAX_FRAME:
        raise ValueError(f"message of {length} bytes is larger than the pipe frame limit of {MAX_FRAME} bytes")
    return b"".join((_HEADER.pack(length, kind), *parts))


def encode(msg: ToWorker | FromWorker) -> bytes:
    """One frame holding ``msg``."""
    match msg:
        case Run(job_id, fn_id, model, fn, payload):
            return encode_run(job_id, fn_id, model, fn, payload)
        case RunBatch(job_ids, fn_id, model, fn, payloads):
            return encode_run_batch(job_ids, fn_id, model, fn, payloads)
        case Done(job_id, seconds, result):
            return _frame(_DONE_KIND, _DONE.pack(job_id, seconds), result)
        case Failed(job_id, seconds, error, tb):
            return _frame(_FAILED_KIND, _FAILED.pack(job_id, seconds, len(error)), error, tb.encode())
        case Stop():
            return _frame(_STOP_KIND)
        case Exiting():
            return _frame(_EXITING_KIND)
        case OverMemory(rss):
            return _frame(_OVER_MEMORY_KIND, _OVER_MEMORY.pack(rss))
        case Ready():
            return _frame(_READY_KIND, pickle.dumps(msg))
        case LoadFailed():
            return _frame(_LOAD_FAILED_KIND, pickle.dumps(msg))
    raise TypeError(f"not a wire message: {msg!r}")


def encode_run(job_id: int, fn_id: int, model: str, fn: bytes, payload: bytes) -> bytes:
    """``encode(Run(...))`` without building the message first (the dispatch hot path)."""
    name = model.encode()
    return _frame(_RUN_KIND, _RUN.pack(job_id, fn_id, len(name), len(fn)), name, fn, payload)


def encode_run_batch(job_ids: tuple[int, ...], fn_id: int, model: str, fn: bytes, payloads: tuple[bytes, ...]) -> bytes:
    name = model.encode()
    count = len(job_ids)
    head = _RUN_BATCH.pack(count, fn_id, len(name), len(fn))
    ids = struct.pack(f"<{count}Q", *job_ids)
    sizes = struct.pack(f"<{count}I", *(len(p) for p in payloads))
    return _frame(_RUN_BATCH_KIND, head, ids, sizes, name, fn, *payloads)


def decode(kind: int, body: bytes) -> ToWorker | FromWorker:
    """The message in one frame's body."""
    if kind == _DONE_KIND:
        job_id, seconds = _DONE.unpack_from(body)
        return Done(job_id, seconds, body[_DONE.size :])
    if kind == _RUN_KIND:
        job_id, fn_id, name_len, fn_len = _RUN.unpack_from(body)
        start = _RUN.size
        model = body[start : start + name_len].decode()
        start += name_len
        return Run(job_id, fn_id, model, body[start : start + fn_len], body[start + fn_len :])
    if kind == _FAILED_KIND:
        job_id, seconds, err_len = _FAILED.unpack_from(body)
        start = _FAILED.size
        return Failed(job_id, seconds, body[start : start + err_len], body[start + err_len :].decode())
    if kind == _RUN_BATCH_KIND:
        count, fn_id, name_len, fn_len = _RUN_BATCH.unpack_from(body)
        start = _RUN_BATCH.size
        job_ids = struct.unpack_from(f"<{count}Q", body, start)
        start += 8 * count
        sizes = struct.unpack_from(f"<{count}I", body, start)
        start += 4 * count
        model = body[start : start + name_len].decode()
        start += name_len
        fn = body[start : start + fn_len]
        start += fn_len
        payloads = []
        for size in sizes:
            payloads.append(body[start : start + size])
            start += size
        return RunBatch(job_ids, fn_id, model, fn, tuple(payloads))
    if kind == _STOP_KIND:
        return Stop()
    if kind == _EXITING_KIND:
        return Exiting()
    if kind == _OVER_MEMORY_KIND:
        return OverMemory(*_OVER_MEMORY.unpack(body))
    if kind in (_READY_KIND, _LOAD_FAILED_KIND):
        return pickle.loads(body)
    raise ValueError(f"unknown message kind {kind}")


class FrameReader:
    """Reassembles frames from the bytes of one pipe; one read may bring many
    frames or part of one.

    Reads go through one reusable buffer: allocating a fresh 256 KiB bytes
    object per read costs a page-faulting mmap each time (tens of µs).
    """

    __slots__ = ("_buf", "_scratch")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scratch = bytearray(1 << 16)

    def _room(self) -> memoryview:
        wanted = max(1 << 16, self.missing())
        if len(self._scratch) < wanted:
            self._scratch = bytearray(wanted)
        return memoryview(self._scratch)

    def read_from(self, fd: int) -> bool:
        """Read what ``fd`` has (blocking if it has nothing); False at end of file."""
        with self._room() as room:
            n = os.readv(fd, [room])
            self._buf += room[:n]
        return n > 0

    def recv_from(self, sock: socket.socket) -> bool:
        """Read what ``sock`` has without blocking; False at end of file.

        Raises BlockingIOError when there is nothing to read.
        """
        with self._room() as room:
            n = sock.recv_into(room, len(room), socket.MSG_DONTWAIT)
            self._buf += room[:n]
        return n > 0

    def missing(self) -> int:
        """Bytes still missing from the frame being received (0: none started)."""
        if len(self._buf) < _HEADER.size:
            return 0
        length, _ = _HEADER.unpack_from(self._buf)
        return _HEADER.size + length - len(self._buf)

    def messages(self) -> list[ToWorker | FromWorker]:
        """Every complete message read so far, in order."""
        buf = self._buf
        out = []
        pos, end = 0, len(buf)
        with memoryview(buf) as view:
            while end - pos >= _HEADER.size:
                length, kind = _HEADER.unpack_from(buf, pos)
                stop = pos + _HEADER.size + length
                if stop > end:
                    break
                out.append(decode(kind, bytes(view[pos + _HEADER.size : stop])))
                pos = stop
        if pos:
            del buf[:pos]
        return out


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (blocking)."""
    with memoryview(data) as view:
        while view:
            written = os.write(fd, view)
            view = view[written:]
