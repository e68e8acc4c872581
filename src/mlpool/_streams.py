"""Streams, parent side (#17): what a generator in a worker yields, item by item.

::

    pool.stream / stream_async ─► a Job with a StreamChannel (job.stream) ─► queue ─► RunStream
                                                                                        │ worker
      Stream / AsyncStream ◄─ pop ◄─ StreamChannel ◄─ push (engine: on_item) ◄─ Item ◄──┤
            │ every half window taken: Credit ─────────────────────────────────────────►│
            │ close / aclose / with / drop / task cancelled / session closed:           │
            │   engine.cancel(job) ─► CloseStream ─────────────────────────────────────►│
            └ the job settles (_jobs.settle ─► end): StreamEnd (done), Failed (the generator
              raised), WorkerCrashedError, JobTimeoutError, cancelled ─► after the buffered items

A stream is an ordinary job whose ``stream`` field holds its channel: it is
queued, placed, timed out, retried, crashes and is cancelled as any job; its
outcome is the stream's end, read after the items the channel still holds.
The engine hands it to the channel itself when it settles the job, never
through the event loop that made the stream (another may read it). The
engine's hooks are the few functions below (``on_item``, ``run_frame``,
``close_stream``, ``may_retry``) and ``StreamChannel.end``.

Backpressure: the worker runs at most ``stream_buffer`` items and
``stream_buffer_bytes`` bytes (at least one item) ahead of what the consumer
took; the consumer gives credit back every half window. So the parent holds
at most a window of items per stream, however slow its consumer.

Items are decoded (shared memory mapped, unpickled) by the consumer, in its
own thread or loop, never under the engine's lock.
"""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Protocol

from mlpool._batching import batch_policy
from mlpool._jobs import Job, JobState, Outcome, running_loop
from mlpool._protocol import CloseStream, Credit, Item, encode, encode_run_stream
from mlpool._transport import send_frames

if TYPE_CHECKING:
    from mlpool._workers import WorkerHandle

# Default read-ahead of a stream (MLPool(stream_buffer=..., stream_buffer_bytes=...)).
DEFAULT_ITEMS = 16
DEFAULT_BYTES = 8 * 2**20


class StreamEngine(Protocol):
    """What a stream asks of its engine (``_manager.Manager``, ``_inline.InlineEngine``)."""

    def cancel(self, job: Job, *, interrupt: bool = False) -> bool: ...

    def send_control(self, job: Job, msg: Any) -> None: ...

    def read_item(self, job: Job, item: Item) -> Any: ...

    def call_soon(self, fn: Callable[[], object]) -> None: ...

    def before_blocking(self) -> None: ...


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
        """The job settled (``_jobs.settle``, in the thread that settles it, before
        any event loop hears of it): the consumer reads what is left, then
        ``outcome``. Not through a callback of the job's handle: an asyncio
        handle belongs to the loop that made the stream, which may have
        stopped while another loop reads it (#24.6)."""
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
        send_frames(worker.sock, [(frame, [])])
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


# ------------------------------------------------------------ the consumer


class _StreamBase:
    __slots__ = ("_job", "_engine", "_channel", "_closed", "_over", "__weakref__")

    def __init__(self, job: Job, engine: StreamEngine) -> None:
        channel = job.stream
        assert channel is not None
        self._job = job
        self._engine = engine
        self._channel = channel
        self._closed = False  # closed by its consumer
        self._over = False  # the end was read (or raised)

    @property
    def closed(self) -> bool:
        """Whether the consumer closed the stream (``close``, ``aclose``, its block)."""
        return self._closed

    def _item(self, item: Item) -> Any:
        """Decode a popped item; the credit goes back first (the worker runs on meanwhile)."""
        credit = self._channel.taken(item)
        if credit is not None:
            self._engine.send_control(self._job, Credit(self._job.id, *credit))
        try:
            return self._engine.read_item(self._job, item)
        except BaseException:
            self.close()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"stream of {self._job.fn_name} is closed; open a new one with pool.stream(...)")

    def _end(self) -> BaseException:
        """The stream's end, once every item was read: the exception to raise
        (StopIteration / StopAsyncIteration stand for a normal end)."""
        self._over = True
        outcome = self._channel.outcome
        assert outcome is not None  # read once the channel ended
        ok, value, cancelled = outcome
        if cancelled:
            return self._cancelled()
        if not ok:
            return value
        return self._stop()

    def _cancelled(self) -> BaseException:
        raise NotImplementedError

    def _stop(self) -> BaseException:
        raise NotImplementedError

    def close(self, *, interrupt: bool = False) -> None:
        """Stop the stream: its generator is closed at its next ``yield`` (its
        ``finally`` runs) and the worker serves the next job; with
        ``interrupt=True`` the worker is killed and replaced at once (a
        generator stuck between yields). Items not read are dropped.
        Idempotent; never blocks on the worker."""
        if self._closed:
            return
        self._closed = True
        if not self._channel.ended:
            self._engine.cancel(self._job, interrupt=interrupt)
        self._channel.discard()

    def __del__(self) -> None:
        # Dropped unclosed (a `for` loop left by break): closed from the
        # engine's callback thread, since a garbage collection may run here
        # while this thread holds the engine's lock.
        try:
            if self._closed or self._channel.ended:
                self._channel.discard()
                return
            self._engine.call_soon(_Abandoned(self._engine, self._job, self._channel))
        except AttributeError:  # __init__ failed before its fields were set
            pass
        except RuntimeError:  # no thread can start (interpreter shutdown): the workers go with the pool
            pass


class _Abandoned:
    """Closes a stream whose consumer dropped it unclosed (see ``_StreamBase.__del__``)."""

    __slots__ = ("engine", "job", "channel")

    def __init__(self, engine: StreamEngine, job: Job, channel: StreamChannel) -> None:
        self.engine, self.job, self.channel = engine, job, channel

    def __call__(self) -> None:
        if not self.channel.ended:
            self.engine.cancel(self.job)
        self.channel.discard()


class Stream(_StreamBase):
    """The items a generator yields in a worker, as an iterator (``pool.stream``).

    Each item is returned as soon as the worker produced it; the worker runs
    at most the pool's ``stream_buffer`` items (``stream_buffer_bytes``
    bytes) ahead. After the last item: the generator's own exception,
    :class:`WorkerCrashedError`, :class:`JobTimeoutError` (the stream's
    timeout bounds the whole stream), or ``StopIteration``; a stream
    cancelled from outside (its session closed) raises
    :class:`concurrent.futures.CancelledError`. Iterating a closed stream
    raises ``ValueError``. Use it in a ``with`` block, or call :meth:`close`:
    leaving early stops the generator. Blocks the calling thread while it
    waits for an item; one consumer at a time.
    """

    __slots__ = ()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        self._check_open()
        if self._over:
            raise StopIteration
        channel = self._channel
        blocked = False
        while True:
            item = channel.pop()
            if item is not None:
                return self._item(item)
            if channel.ended:
                raise self._end()
            if channel.pump is not None:
                channel.pump()
                continue
            if not blocked:
                if running_loop() is not None:
                    warnings.warn("iterating pool.stream() blocks the event loop running in this thread; "
                                  "in a coroutine, use `async for item in pool.stream_async(...)`",
                                  RuntimeWarning, stacklevel=2)  # fmt: skip
                self._engine.before_blocking()  # this thread's loop cannot read while it waits
                blocked = True
            channel.wait()
            if self._closed:  # by another thread while this one waited: the end, quietly
                self._over = True
                raise StopIteration

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _cancelled(self) -> BaseException:
        return CancelledError(f"stream of {self._job.fn_name} was cancelled (its session closed)")

    def _stop(self) -> BaseException:
        return StopIteration()


class AsyncStream(_StreamBase):
    """:class:`Stream` as an async iterator (``pool.stream_async``); the event
    loop stays free while it waits for items, which it reads itself. Its job
    is queued when the iteration (or its ``async with``) starts. Cancelling
    the task that iterates closes the stream; :meth:`aclose` and
    ``async with`` close it too."""

    __slots__ = ("_admit",)

    def __init__(self, job: Job, engine: StreamEngine, admit: Callable[[], Awaitable[None]]) -> None:
        super().__init__(job, engine)
        self._admit: Callable[[], Awaitable[None]] | None = admit

    def __aiter__(self) -> AsyncStream:
        return self

    async def _start(self) -> None:
        admit, self._admit = self._admit, None
        if admit is not None:
            try:
                await admit()
            except BaseException:
                self.close()
                raise

    async def __anext__(self) -> Any:
        self._check_open()
        if self._admit is not None:
            await self._start()
        if self._over:
            raise StopAsyncIteration
        channel = self._channel
        while True:
            item = channel.pop()
            if item is not None:
                return self._item(item)
            if channel.ended:
                raise self._end()
            if channel.pump is not None:  # inline mode: one item runs here, blocking the loop
                channel.pump()
                await asyncio.sleep(0)  # sleep-ok: a turn for the loop's other tasks, not a wait
                continue
            waiter = channel.waiter(asyncio.get_running_loop())
            if waiter is None:
                continue
            try:
                await waiter
            except asyncio.CancelledError:
                self.close()
                raise
            if self._closed:  # by another task while this one waited (a client that left): the end
                self._over = True
                raise StopAsyncIteration

    async def aclose(self, *, interrupt: bool = False) -> None:
        """:meth:`close` for ``async with`` and ``contextlib.aclosing``."""
        self.close(interrupt=interrupt)

    async def __aenter__(self) -> AsyncStream:
        self._check_open()
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def _cancelled(self) -> BaseException:
        return asyncio.CancelledError(f"stream of {self._job.fn_name} was cancelled (its session closed)")

    def _stop(self) -> BaseException:
        return StopAsyncIteration()
