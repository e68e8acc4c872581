"""Streams, the engine's half: a stream's channel, and the engine's hooks.

A stream is an ordinary job whose ``stream`` field holds its
:class:`StreamChannel`; the engine pushes the worker's items into it (under
its lock: ``on_item``), builds its Run frame (``run_frame``), closes it in
the worker (``close_stream``), never replays one that delivered items
(``may_retry``), and hands it its end when it settles the job
(``StreamChannel.end``), in whichever thread settles it. The consumer's half,
the iterators, is ``mlpool._api.streams``, whose docstring draws the whole
exchange.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mlpool._engine.batching import batch_policy
from mlpool._engine.jobs import Job, JobState, Outcome, running_loop
from mlpool._wire.protocol import CloseStream, Item, encode, encode_run_stream
from mlpool._wire.transport import send_frames

if TYPE_CHECKING:
    from mlpool._processes.workers import WorkerHandle

# Default read-ahead of a stream (MLPool(stream_buffer=..., stream_buffer_bytes=...)).
DEFAULT_ITEMS = 16
DEFAULT_BYTES = 8 * 2**20


class StreamChannel:
    """The items of one stream between the engine (``push``, under its lock, on
    whatever thread reads the worker's pipe) and the consumer (``pop``)."""

    __slots__ = (
        "window_items", "window_bytes", "delivered", "pump", "source", "ended", "outcome",
        "_cond", "_items", "_waiter", "_taken_items", "_taken_bytes",
    )  # fmt: skip

    def __init__(self, window_items: int, window_bytes: int) -> None:
        self.window_items = window_items
        self.window_bytes = window_bytes
        self.delivered = 0  # items that reached the parent: a stream with any is never replayed
        # Inline mode (nb_workers=0): produce the next item in the consumer's thread.
        self.pump: Callable[[], None] | None = None
        self.source: Any = None  # inline mode: the generator
        self.ended = False  # the job settled (set by the engine: see end)
        self.outcome: tuple[bool, Any, bool] | None = None  # once ended: ok, result or error, cancelled
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future | None = None  # an async consumer waiting
        self._taken_items = 0  # taken since the last credit
        self._taken_bytes = 0

    def push(self, item: Item) -> None:
        """An item arrived (under the engine's lock; no user code runs here)."""
        with self._cond:
            self._items.append(item)
            self.delivered += 1
            waiter, self._waiter = self._waiter, None
            self._cond.notify_all()
        if waiter is not None:
            _wake(waiter)

    def end(self, outcome: Outcome) -> None:
        """The job settled (``_engine.jobs.settle``, in the thread that settles it, before
        any event loop hears of it): the consumer reads what is left, then
        ``outcome``. Not through a callback of the job's handle: an asyncio
        handle belongs to the loop that made the stream, which may have
        stopped while another loop reads it."""
        with self._cond:
            if self.ended:
                return
            self.outcome = (outcome.ok, outcome.value, outcome.cancelled)  # not the job: no cycle through it
            self.ended = True
            waiter, self._waiter = self._waiter, None
            self._cond.notify_all()
        if waiter is not None:
            _wake(waiter)

    def pop(self) -> Item | None:
        with self._cond:
            return self._items.popleft() if self._items else None

    def wait(self) -> None:
        """Block until an item or the end is there (a sync consumer)."""
        with self._cond:
            while not self._items and not self.ended:
                self._cond.wait()

    def waiter(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future | None:
        """A future of ``loop`` that an item or the end resolves; None if one is there."""
        with self._cond:
            if self._items or self.ended:
                return None
            self._waiter = loop.create_future()
            return self._waiter

    def taken(self, item: Item) -> tuple[int, int] | None:
        """The consumer took ``item``: the credit to send now (items, bytes), if due."""
        self._taken_items += 1
        self._taken_bytes += item_size(item)
        if self._taken_items >= max(1, self.window_items // 2) or self._taken_bytes >= self.window_bytes // 2:
            credit = (self._taken_items, self._taken_bytes)
            self._taken_items = self._taken_bytes = 0
            return credit
        return None

    def discard(self) -> None:
        """Drop the items nobody will read (their shared memory with them)."""
        with self._cond:
            items, self._items = self._items, deque()
        for item in items:
            if item.fd >= 0:
                os.close(item.fd)


def item_size(item: Item) -> int:
    """Bytes an item counts for in the window (the worker counts the same)."""
    return len(item.data) + sum(length for _, length in item.spans)


def _wake(waiter: asyncio.Future) -> None:
    loop = waiter.get_loop()
    if running_loop() is loop:
        if not waiter.done():
            waiter.set_result(None)
        return
    try:
        loop.call_soon_threadsafe(_resolve, waiter)
    except RuntimeError:  # its loop closed: nobody waits any more
        pass


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


# ------------------------------------------------------------ engine hooks


def open_channel(job: Job, window_items: int, window_bytes: int) -> None:
    """Make ``job`` a stream (before it is queued)."""
    job.stream = StreamChannel(window_items, window_bytes)


def check_streamable(fn: Callable[..., Any]) -> None:
    """A batched function cannot stream: TypeError naming it."""
    if batch_policy(fn) is not None:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise TypeError(
            f"{name} is batched (@mlpool.batched): it returns one result per item and cannot stream; "
            "pass pool.stream a plain generator function"
        )


def run_frame(job: Job, fn: bytes) -> bytes:
    """The RunStream frame of a stream's job (``fn``: the function's pickle, or empty)."""
    channel = job.stream
    assert channel is not None
    p = job.payload
    return encode_run_stream(job.id, job.fn_id, job.model, fn, p.data, p.spans,
                             channel.window_items, channel.window_bytes)  # fmt: skip


def on_item(worker: WorkerHandle, item: Item) -> None:
    """An Item from ``worker`` (under the engine's lock): to its stream, or
    dropped if the stream was closed; out of order, the worker is killed."""
    job = worker.inflight[0] if worker.inflight else None
    if job is None or job.id != item.job_id or job.stream is None:
        if item.fd >= 0:
            os.close(item.fd)
        worker.kill(f"protocol error: sent an item of job {item.job_id}, which it is not streaming")
        return
    if job.state is JobState.RUNNING:
        job.stream.push(item)
    elif item.fd >= 0:  # closed: nobody reads it
        os.close(item.fd)


def close_stream(worker: WorkerHandle, job: Job) -> None:
    """A running stream was cancelled (under the engine's lock): its
    generator is closed at its next yield, and the worker serves on."""
    send_to_worker(worker, encode(CloseStream(job.id)))


def send_to_worker(worker: WorkerHandle, frame: bytes) -> None:
    """Write a small control frame (under the engine's lock). A dead worker's
    pipe fails: its sentinel tells the engine, which settles the job."""
    try:
        send_frames(worker.pipe.sock, [(frame, [])])
    except OSError:
        pass


def holder(job: Job) -> WorkerHandle | None:
    """The worker running stream ``job`` now, if any (under the engine's lock)."""
    worker = job.worker
    if worker is None or not worker.inflight or worker.inflight[0] is not job:
        return None
    return worker


def may_retry(job: Job) -> bool:
    """A stream that delivered items is never replayed (its consumer has them)."""
    return job.stream is None or job.stream.delivered == 0
