"""A stream's job in the worker: run a generator, item by item, on credit.

Runs in a worker process (imports only the protocol, serialization and the
worker half of shared memory)::

    RunStream ─► fn(model, *args, **kwargs) ─► iter() ─► next() ─► Item ─► next() ...
                     (not iterable: TypeError)    ▲                   │
                                                  └─ wait for Credit ◄┘ window full
    CloseStream (read between items, or while waiting) ─► generator.close() ─► StreamEnd
    the generator returns ─► StreamEnd        it raises, or an item cannot be pickled ─► Failed

Each item is sent as soon as it exists, pickled as a result is (large
buffers in a shared-memory file). The worker runs at most ``window_items``
items and ``window_bytes`` bytes (always at least one item) ahead of what
the consumer took; then it waits, the generator paused at its ``yield``,
until a ``Credit`` (the consumer took more) or a ``CloseStream`` arrives.
The pipe is read without blocking after each item, so a ``CloseStream``
stops the generator at its next ``yield``: ``close()`` raises
``GeneratorExit`` there and its ``finally`` runs. A generator stuck between
yields is the parent's to kill (``interrupt=True``).

Messages for later jobs that arrive meanwhile (the parent sends none to a
worker holding a stream, but the protocol allows it) wait in ``later``, in
order. End of file on the pipe (the parent is gone) closes the generator.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from mlpool._wire.protocol import CloseStream, Credit, RunStream, StreamEnd, encode, encode_failed, encode_item
from mlpool._wire.serialization import pack_exception
from mlpool._wire.shm import unpack, write_result
from mlpool._wire.transport import DescriptorsLost, FrameReader, send_frames

Reply = tuple[bytes, list[int]]


class _Window:
    """What the consumer has not taken yet: items and bytes sent, less credits."""

    __slots__ = ("items", "nbytes", "max_items", "max_bytes", "closed", "eof")

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.items = 0
        self.nbytes = 0
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.closed = False  # CloseStream arrived
        self.eof = False  # the parent is gone

    def full(self) -> bool:
        return self.items >= self.max_items or (self.items > 0 and self.nbytes >= self.max_bytes)


def run_stream(
    msg: RunStream,
    fn_and_model: Callable[[], tuple[Callable, Any]],
    settings: Any,
    sock: socket.socket,
    reader: FrameReader,
    later: deque,
) -> tuple[list[Reply], bool]:
    """Run a stream's generator to its end (or its close); ``(replies, eof)``:
    the final StreamEnd or Failed to send, and whether the parent is gone.
    Items are sent here, as they come. ``fn_and_model()`` raises what the
    lookup of the function and model raises (the job's error)."""
    started = time.perf_counter()
    window = _Window(max(1, msg.window_items), max(1, msg.window_bytes))
    job_id = msg.job_id
    iterator: Iterator | None = None
    _apply_controls(later, window, job_id)  # a close read with the RunStream, before it started
    if window.closed:
        if msg.fd >= 0:  # its arguments' shared memory, never read
            os.close(msg.fd)
        return [(encode(StreamEnd(job_id, 0.0)), [])], False
    try:
        try:
            fn, model = fn_and_model()
            args, kwargs = unpack(msg.payload, msg.fd, msg.spans, "the stream's arguments")
            produced = fn(model, *args, **kwargs)
            del args, kwargs
            iterator = iterate(produced, fn)
            del produced
            what = f"an item of {getattr(fn, '__qualname__', None) or type(fn).__name__}"
            for item in iterator:
                _send_item(sock, job_id, item, what, settings, window)
                del item  # lets its shared memory go
                _read_control(sock, reader, later, window, job_id, block=False)
                while window.full() and not (window.closed or window.eof):
                    _read_control(sock, reader, later, window, job_id, block=True)
                if window.closed or window.eof:
                    break
        except BaseException as exc:  # the generator's error (or its item's): the worker serves on
            _close(iterator)
            return [_failed(job_id, time.perf_counter() - started, exc)], window.eof
        _close(iterator)
    except BaseException as exc:  # close() raised in a finally: still this stream's error
        return [_failed(job_id, time.perf_counter() - started, exc)], window.eof
    return [(encode(StreamEnd(job_id, time.perf_counter() - started)), [])], window.eof


def iterate(produced: Any, fn: Callable) -> Iterator:
    try:
        return iter(produced)
    except TypeError:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise TypeError(
            f"{name} was called by pool.stream, which iterates what it returns, but it returned "
            f"{type(produced).__name__}, which is not iterable; make it a generator function (yield each item)"
        ) from None


def _close(iterator: Iterator | None) -> None:
    """Stop the generator at its yield (GeneratorExit: its ``finally`` runs)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _send_item(sock: socket.socket, job_id: int, item: Any, what: str, settings: Any, window: _Window) -> None:
    data, spans, where, fd = write_result(item, what, settings.shm_threshold, settings.shm_limit, -1)
    try:
        send_frames(sock, [(encode_item(job_id, data, spans, where), [fd] if fd >= 0 else [])])
    finally:
        if fd >= 0:
            os.close(fd)
    window.items += 1
    window.nbytes += len(data) + sum(length for _, length in spans)


def _read_control(
    sock: socket.socket, reader: FrameReader, later: deque, window: _Window, job_id: int, *, block: bool
) -> None:
    """Read what the parent sent: credits and a close for this stream apply
    now, anything else waits in ``later``."""
    try:
        if not reader.recv_from(sock, 0 if block else socket.MSG_DONTWAIT):
            window.eof = True
            return
    except BlockingIOError:
        return
    except DescriptorsLost:
        raise
    except OSError:
        window.eof = True
        return
    _apply(reader.messages(), later, window, job_id)


def _apply_controls(later: deque, window: _Window, job_id: int) -> None:
    """Apply the controls of this stream already waiting in ``later``."""
    waiting = list(later)
    later.clear()
    _apply(waiting, later, window, job_id)


def _apply(messages: list, later: deque, window: _Window, job_id: int) -> None:
    for msg in messages:
        if type(msg) is Credit and msg.job_id == job_id:
            window.items -= msg.items
            window.nbytes -= msg.nbytes
        elif type(msg) is CloseStream and msg.job_id == job_id:
            window.closed = True
        elif type(msg) is not Credit and type(msg) is not CloseStream:  # else: for a stream that ended
            later.append(msg)  # a Stop too: it finishes the jobs received first


def _failed(job_id: int, seconds: float, exc: BaseException) -> Reply:
    error, tb = pack_exception(exc)
    return encode_failed(job_id, seconds, error, tb), []
