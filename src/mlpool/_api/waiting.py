"""How the facade waits on a job's handle, from a thread or a coroutine, and
leaves nothing behind when the wait ends.

A done-callback on a :class:`concurrent.futures.Future` cannot be removed, and
:func:`concurrent.futures.wait` does not wake when a pending future is
cancelled (only once an executor calls ``set_running_or_notify_cancel``). A
caller polling an unfinished job with a timeout (``get_result_async(job_id,
timeout=1)`` in a loop) must not add a callback per poll, each holding its
event loop and waiter until the job ends. So each future gets at most
one callback, :func:`_wake_waiters`, installed by the first wait on it; waits
register a *waker* in :data:`_api.waiting` and remove it when they end, whatever
ends them (the future, the timeout, the task's cancellation). A coroutine's
waker sets its waiter directly when it runs on that waiter's loop (the loop
read the worker's pipe: no thread hop), else through ``call_soon_threadsafe``;
a thread's sets an event.

An :class:`asyncio.Future` of the running loop is waited on with its own
``add_done_callback`` / ``remove_done_callback``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

from mlpool._engine.jobs import Job, running_loop
from mlpool.errors import JobTimeoutError, MLPoolError, PoolClosedError

Handle = Future | asyncio.Future
_Waker = Callable[[], None]

# Concurrent futures a wait is on -> the wakers of those waits; an entry exists
# exactly while the future is unfinished and has our callback.
_waiting: dict[Future, list[_Waker]] = {}


def wait_any(futures: list[Future], timeout: float | None) -> bool:
    """Block until one of ``futures`` is done (cancelled included) or ``timeout``
    passes; whether one is done. Leaves nothing on the futures."""
    if any(future.done() for future in futures):
        return True
    event = threading.Event()
    waker: _Waker = event.set
    for future in futures:
        _watch(future, waker)
    try:
        event.wait(timeout)
    finally:
        for future in futures:
            _unwatch(future, waker)
    return any(future.done() for future in futures)


async def wait_any_async(futures: list[Handle], timeout: float | None) -> bool:
    """:func:`wait_any` for coroutines: the loop stays free, and every callback
    or timer added for this wait is removed when it ends. Never cancels
    ``futures``. Asyncio futures must belong to the running loop."""
    for future in futures:
        if future.done():
            return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future = loop.create_future()
    wake = partial(_set, waiter)
    waker = partial(_wake_on, loop, waiter)
    watched: list[Future] = []
    local: list[asyncio.Future] = []
    timer = None
    try:
        for future in futures:
            if isinstance(future, asyncio.Future):
                future.add_done_callback(wake)
                local.append(future)
            else:
                _watch(future, waker)
                watched.append(future)
        if timeout is not None:
            timer = loop.call_later(max(0.0, timeout), _set, waiter)
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for afut in local:
            afut.remove_done_callback(wake)
        for future in watched:
            _unwatch(future, waker)
    return any(future.done() for future in futures)


async def wait_here_async(job: Job, timeout: float | None) -> bool:
    """Wait for ``job``'s asyncio handle, which belongs to the running loop (a
    job id fetched in the coroutine's loop that made it: the hot path), or
    ``timeout``; True if it is done.

    The wait is the job's ``fetcher``: the call that settles the job wakes it
    at once (no callback of the handle in between, one loop turn fewer). A
    second wait on the same job waits on the handle's done-callback."""
    afut = job.afut
    assert afut is not None
    waiter: asyncio.Future = afut.get_loop().create_future()
    timer = None if timeout is None else waiter.get_loop().call_later(max(0.0, timeout), _set, waiter)
    if job.fetcher is None:
        job.fetcher = waiter
        try:
            await waiter
        finally:
            job.fetcher = None
            if timer is not None:
                timer.cancel()
        return afut.done()
    wake = partial(_set, waiter)
    afut.add_done_callback(wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        afut.remove_done_callback(wake)
    return afut.done()


async def wait_done_async(future: Future, timeout: float | None) -> bool:
    """:func:`wait_any_async` for one concurrent future (the job-id API's hot path)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future = loop.create_future()
    waker = partial(_wake_on, loop, waiter)
    _watch(future, waker)
    timer = None if timeout is None else loop.call_later(max(0.0, timeout), _set, waiter)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        _unwatch(future, waker)
    return future.done()


def _watch(future: Future, waker: _Waker) -> None:
    # No lock: dict.setdefault, list.append and dict.pop are atomic under the
    # GIL, and a waker appended after _wake_waiters took the list sees the
    # future done just below.
    mine = [waker]
    waiters = _waiting.setdefault(future, mine)
    if waiters is mine:
        future.add_done_callback(_wake_waiters)  # on a future already done, calls back at once
    else:
        waiters.append(waker)
    if future.done():
        waker()


def _unwatch(future: Future, waker: _Waker) -> None:
    waiters = _waiting.get(future)
    if waiters is not None:
        try:
            waiters.remove(waker)
        except ValueError:
            pass


def _wake_waiters(future: Future) -> None:
    """The one done-callback of a watched future; runs in the thread that settled it."""
    for waker in _waiting.pop(future, ()):
        waker()


def _wake_on(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future) -> None:
    """Wake a coroutine's wait, from any thread (at once on its own loop: no hop)."""
    if running_loop() is loop:
        _set(waiter)
        return
    try:
        loop.call_soon_threadsafe(_set, waiter)
    except RuntimeError:  # the loop is closed: nobody waits there any more
        pass


def _set(waiter: asyncio.Future, _: object = None) -> None:
    if not waiter.done():
        waiter.set_result(None)


# ------------------------------------------------ a job's handles


def warn_if_loop_blocked(method: str, twin: str, *, stacklevel: int) -> None:
    """Warn (RuntimeWarning, once per call site under Python's default
    filters) when a blocking call waits on the thread of a running event
    loop: every other coroutine of that loop stops until the job ends.
    ``stacklevel`` counts from this function's caller to the user's call."""
    if running_loop() is not None:  # the cheap check: no exception, one C call
        warn_loop_blocked(f"pool.{method}()", f"`await pool.{twin}(...)`", stacklevel=stacklevel)


def warn_loop_blocked(call: str, instead: str, *, stacklevel: int) -> None:
    """The warning of :func:`warn_if_loop_blocked`, for a caller that saw a
    running loop: ``call`` ("pool.score()") blocks it; use ``instead``.
    ``stacklevel``: as ``warnings.warn`` would take it in the caller."""
    warnings.warn(
        f"{call} blocks the event loop running in this thread (every other request of it waits); "
        f"in a coroutine, use {instead}",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def done_handle(job: Job) -> Future | asyncio.Future | None:
    """The job's handle that holds its outcome, or None while it has none."""
    afut = job.afut
    if afut is not None and afut.done():
        return afut
    future = job.future
    if future is not None and future.done():
        return future
    return None


def concurrent_future(job: Job) -> Future:
    """The job's concurrent Future (every job made outside a coroutine has one)."""
    future = job.future
    if future is None:  # only score_async's jobs have none, and they never come here
        raise MLPoolError(f"internal error: job {job.id} has no concurrent future")
    return future


def remaining(job: Job) -> float | None:
    """Seconds until the job's deadline (None: it has none)."""
    if job.deadline is None:
        return None
    return max(0.0, job.deadline - time.monotonic())


def job_key(job: Job) -> str:
    key = job.key
    if key is None:  # admitted with register=True always has one
        raise MLPoolError(f"internal error: job {job.id} was admitted without an id")
    return key


def no_room(job: Job) -> JobTimeoutError:
    return JobTimeoutError(f"job {job.id} timed out waiting for room in the queue; it never ran", waiting_for_room=True)


def never_queued(job: Job) -> PoolClosedError:
    return PoolClosedError(
        f"the session was closed while job {job.id} waited for room in the queue; it was never queued"
    )


def still_running(job_id: str, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"job {job_id} did not finish within {timeout}s; it goes on and can be fetched later")


def check_wait(timeout: float | None) -> None:
    """A caller's wait bound: None or a number of seconds >= 0 (not NaN)."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds (or None), got {timeout!r}")
