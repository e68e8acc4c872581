"""The engine's one lock, and what happens each time it is released.

``with lock:`` is the only way the engine holds it. Leaving the block
releases the lock and then, outside it:
- wakes the manager thread if a part asked for it (an earlier deadline, a
  shutdown) and this is another thread;
- wakes callers waiting for room in a full queue once there is room;
- delivers the outcomes decided under the lock (``Outcomes.take``): decoded
  here, then settled (``_jobs.settle``). Done-callbacks of futures the
  manager thread settles run on a callback thread: a callback may wait on
  the pool, which only the manager thread can serve.

The lock is released whatever exception arrives meanwhile (a signal handler
raising in the main thread): taking the outcomes has no call in it, so no
handler runs between that and the release.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future

from mlpool._admission import ModelBounds
from mlpool._jobs import CallbackRunner, Job, running_loop, settle
from mlpool._outcomes import Outcomes, WakeClock
from mlpool._registry import Registry


class EngineLock:
    """The lock over every part of the engine, as a context manager."""

    def __init__(
        self,
        outcomes: Outcomes,
        registry: Registry[Job],
        clock: WakeClock,
        has_space: Callable[[], bool],
        bounds: ModelBounds | None = None,
    ) -> None:
        self.plain = threading.Lock()  # held without delivering: for reads that decide nothing
        self._acquire = self.plain.acquire
        self._outcomes = outcomes
        self._registry = registry
        self._clock = clock
        self._has_space = has_space
        self._space_waiters: list[Future] = []
        self._bounds = bounds  # callers waiting for room in a full model (#16)
        self.callbacks = CallbackRunner()
        self.manager: threading.Thread | None = None  # the manager thread, which needs no wake-up
        self.wake_r, self._wake_w = os.pipe()  # the manager's select() watches wake_r
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)

    def __enter__(self) -> None:
        self._acquire()

    def __exit__(self, *exc: object) -> None:
        outcomes = self._outcomes.take()
        waiters: list[Future] | None = None
        wake = False
        on_manager = self.manager is not None and threading.get_ident() == self.manager.ident
        try:
            if self._space_waiters and self._has_space():
                waiters, self._space_waiters = self._space_waiters, []
            if self._bounds is not None and self._bounds.waiters:
                waiters = self._bounds.due() + (waiters or [])
            wake = self._clock.need_wake and not on_manager
            self._clock.need_wake = False
        finally:
            self.plain.release()
        if wake:
            self.wake()
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if outcomes:
            decoded = [self._outcomes.decode(outcome) for outcome in outcomes]
            settle(decoded, self.callbacks if on_manager else None)
            # Unfetched results of the job-id API keep only their outcome; one a
            # get_result_async of this loop waits for is fetched at once.
            here = running_loop()
            keyed = [
                outcome for outcome in decoded
                if outcome.job.key is not None and not outcome.cancelled
                and (outcome.job.fetcher is None or outcome.job.loop is not here)
            ]  # fmt: skip
            if keyed:
                with self.plain:
                    for job, ok, value, _ in keyed:
                        self._registry.settled(job, ok, value)

    def wait_for_space(self) -> Future:
        """A future resolved when the full queue may have room (under the lock)."""
        waiter: Future = Future()
        self._space_waiters.append(waiter)
        return waiter

    def wake(self) -> None:
        """Wake the manager thread from its select()."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: a wake-up is already pending; closed: done
            pass

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """The manager thread ends: no wake-up is needed any more."""
        self.callbacks.stop()
        for fd in (self.wake_r, self._wake_w):
            os.close(fd)
        self.wake_r = self._wake_w = -1
