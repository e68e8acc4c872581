"""Streams, the caller's half: what a generator in a worker yields, item by item.

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
engine's half (the channel and its hooks) is ``mlpool._engine.streams``.

Backpressure: the worker runs at most ``stream_buffer`` items and
``stream_buffer_bytes`` bytes (at least one item) ahead of what the consumer
took; the consumer gives credit back every half window. So the parent holds
at most a window of items per stream, however slow its consumer.

Items are decoded (shared memory mapped, unpickled) by the consumer, in its
own thread or loop, never under the engine's lock.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError
from typing import Any, Protocol

from mlpool._engine.jobs import Job, running_loop
from mlpool._engine.streams import DEFAULT_BYTES, DEFAULT_ITEMS, StreamChannel, check_streamable, open_channel
from mlpool._wire.protocol import Credit, Item

__all__ = [
    "DEFAULT_BYTES", "DEFAULT_ITEMS", "AsyncStream", "Stream", "StreamChannel", "StreamEngine", "check_streamable",
    "open_channel",
]


class StreamEngine(Protocol):
    """What a stream asks of its engine (``_engine.engine.ProcessEngine``, ``_engine.inline.InlineEngine``)."""

    def cancel(self, job: Job, *, interrupt: bool = False) -> bool: ...

    def send_control(self, job: Job, msg: Any) -> None: ...

    def read_item(self, job: Job, item: Item) -> Any: ...

    def call_soon(self, fn: Callable[[], object]) -> None: ...

    def before_blocking(self) -> None: ...


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
