"""How the facade waits on a job's handle, from a thread or a coroutine, and
leaves nothing behind when the wait ends.

A done-callback on a :class:`concurrent.futures.Future` cannot be removed, and
:func:`concurrent.futures.wait` does not wake when a pending future is
cancelled (only once an executor calls ``set_running_or_notify_cancel``). A
caller polling an unfinished job with a timeout (``get_result_async(job_id,
timeout=1)`` in a loop) must not add a callback per poll, each holding its
event loop and waiter until the job ends (#19.10). So each future gets at most
one callback, :func:`_wake_waiters`, installed by the first wait on it; waits
register a *waker* in :data:`_waiting` and remove it when they end, whatever
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
from concurrent.futures import Future
from typing import Callable, Union

from mlpool._jobs import running_loop

Handle = Union[Future, asyncio.Future]
_Waker = Callable[[], None]

_lock = threading.Lock()
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
        _unwatch(futures, waker)
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

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    def waker() -> None:  # in the thread that settled a concurrent future
        if running_loop() is loop:
            wake(None)
            return
        try:
            loop.call_soon_threadsafe(wake, None)
        except RuntimeError:  # the loop is closed: nobody waits there any more
            pass

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
            timer = loop.call_later(max(0.0, timeout), wake, None)
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for afut in local:
            afut.remove_done_callback(wake)
        if watched:
            _unwatch(watched, waker)
    return any(future.done() for future in futures)


def _watch(future: Future, waker: _Waker) -> None:
    with _lock:
        waiters = _waiting.get(future)
        first = waiters is None
        if first:
            waiters = _waiting[future] = []
        waiters.append(waker)  # type: ignore[union-attr]
    if first:
        # Outside the lock: on a future already done, this calls back at once.
        future.add_done_callback(_wake_waiters)


def _unwatch(futures: list[Future], waker: _Waker) -> None:
    with _lock:
        for future in futures:
            waiters = _waiting.get(future)
            if waiters is not None:
                try:
                    waiters.remove(waker)
                except ValueError:
                    pass


def _wake_waiters(future: Future) -> None:
    """The one done-callback of a watched future; runs in the thread that settled it."""
    with _lock:
        waiters = _waiting.pop(future, ())
    for waker in waiters:
        waker()
