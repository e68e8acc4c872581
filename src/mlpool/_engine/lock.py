"""The engine's one lock, and what happens each time it is released.

Code that callers' threads run holds it as ``with lock.mutex:`` (the C
lock's own ``with``: no exception can arrive between taking the lock and
the block that releases it) followed by ``lock.after_release()`` in a ``finally``;
the manager thread, which no KeyboardInterrupt reaches, uses ``with lock:``,
which does both. After each critical section, ``deliver`` (outside the lock):
- wakes the manager thread if a part asked for it (an earlier deadline, a
  shutdown) and this is another thread;
- wakes callers waiting for room in a full queue once there is room;
- delivers the outcomes decided under the lock (``Outcomes.pending``):
  decoded here (a result stays pickled for its caller's thread: see
  ``_engine.results``), then settled (``_engine.jobs.settle``). Done-callbacks of futures
  the manager thread settles run on a callback thread: a callback may wait
  on the pool, which only the manager thread can serve.

An exception that arrives meanwhile (a signal handler raising in the main
thread: Ctrl-C) never leaves the lock held, and outcomes it interrupts go
back for the manager thread to deliver. A Python-level ``__enter__`` could
not promise the first: the handler may run between the lock's acquire and
the ``with`` block that would release it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future

from mlpool._engine.admission import ModelBounds
from mlpool._engine.jobs import CallbackRunner, Job, Outcome, running_loop, settle
from mlpool._engine.outcomes import ManagerAlarm, Outcomes
from mlpool._engine.registry import Registry


class EngineLock:
    """The lock over every part of the engine, as a context manager."""

    def __init__(
        self,
        lock: threading.Lock,
        outcomes: Outcomes,
        registry: Registry[Job],
        alarm: ManagerAlarm,
        has_space: Callable[[], bool],
        bounds: ModelBounds | None = None,
    ) -> None:
        self.mutex = lock  # held without delivering: for reads that decide nothing
        self._acquire = self.mutex.acquire
        self._outcomes = outcomes
        self._registry = registry
        self._alarm = alarm
        self._has_space = has_space
        self._space_waiters: list[Future] = []
        self._bounds = bounds  # callers waiting for room in a full model
        self.callbacks = CallbackRunner()
        self.manager_ident: int | None = None  # the manager thread's (set as it starts): it needs no wake-up
        self.wake_r, self._wake_w = os.pipe()  # the manager's select() watches wake_r
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)

    def __enter__(self) -> None:
        """For the manager thread (no KeyboardInterrupt reaches it); code that
        callers' threads run uses ``with lock.mutex:`` and ``deliver()`` in a
        ``finally`` (see the module's docstring)."""
        self.mutex.acquire()

    def __exit__(self, *exc: object) -> None:
        self.mutex.release()
        self.after_release()

    def after_release(self) -> None:
        """After a critical section, outside the lock: wake the manager if asked,
        wake callers waiting for room, decode and settle the outcomes decided.

        Outcomes taken and not yet delivered when an exception arrives (a
        Ctrl-C in the main thread) go back for the manager thread to deliver:
        decoding is done in place, once, and settling twice is harmless."""
        outcomes = self._outcomes
        if not (outcomes.pending or self._alarm.need_wake or self._space_waiters
                or (self._bounds is not None and self._bounds.waiters)):  # fmt: skip
            return  # a stale read only means the next deliver() does it: every section has one
        taken: list[Outcome] = []
        on_manager = threading.get_ident() == self.manager_ident
        try:
            waiters: list[Future] | None = None
            with self.mutex:
                taken, outcomes.pending = outcomes.pending, taken  # no call in between
                wake = self._alarm.need_wake and not on_manager
                self._alarm.need_wake = False
                if self._space_waiters and self._has_space():
                    waiters, self._space_waiters = self._space_waiters, []
                if self._bounds is not None and self._bounds.waiters:
                    waiters = self._bounds.due() + (waiters or [])
            if wake:
                self.wake()
            if waiters:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            if taken:
                keyed = False  # any job of the job-id API?
                for index, outcome in enumerate(taken):
                    taken[index] = outcomes.decode(outcome)
                    keyed = keyed or outcome.job.key is not None
                settle(taken, self.callbacks if on_manager else None)
                if keyed:
                    self._keep_outcomes(taken)
                taken = []
        finally:
            if taken:
                with self.mutex:
                    outcomes.pending[:0] = taken
                self.wake()

    def _keep_outcomes(self, delivered: list[Outcome]) -> None:
        """Unfetched results of the job-id API keep only their outcome; one a
        get_result_async of this loop waits for is fetched at once."""
        here = running_loop()
        keyed = [
            outcome for outcome in delivered
            if outcome.job.key is not None and not outcome.cancelled
            and (outcome.job.fetcher is None or outcome.job.loop is not here)
        ]  # fmt: skip
        if keyed:
            with self.mutex:
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
