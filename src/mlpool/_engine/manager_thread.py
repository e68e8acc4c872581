"""The manager thread: the engine's one wait, and what it does when it wakes.

::

    run(): start what is due (a launcher's, workers) ─► select() on every watched
           pipe, death handle and the wake-up pipe, until the next deadline ─►
           read (outside the lock) ─► under the lock: messages, launchers' news,
           deaths, result expiry, deadlines, dispatch ─► running jobs past their
           deadline: read their pipes, take their workers' stacks (outside the
           lock), fail them, kill their workers

An event loop that stops while it reads a busy worker's pipe (``asyncio.run``
returning, ``loop.stop()``) sends no event: while a loop holds such a pipe,
the wait ends every ``LOAN_CHECK`` seconds at the latest, and a stopped
loop's pipes are taken back, so callers waiting behind it are served.

It owns the shutdown request (``ask_shutdown`` takes no lock: a signal
handler may call it) and applies it under the lock at its next turn. It is
never interrupted by KeyboardInterrupt (signal handlers run in the main
thread), so it holds the engine's lock with ``with lock:``, which releases
and delivers outcomes (see ``_engine.lock``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from mlpool._engine.dispatch import Dispatcher
from mlpool._engine.jobs import Job, JobState
from mlpool._engine.lock import EngineLock
from mlpool._engine.outcomes import ManagerAlarm
from mlpool._engine.recovery import JobRecovery
from mlpool._engine.regions import RegionPool
from mlpool._engine.registry import Registry
from mlpool._engine.replies import Replies
from mlpool._engine.scheduler import Scheduler
from mlpool._engine.state import PoolState
from mlpool._processes.readers import LOAN_CHECK, PipeReaders
from mlpool._processes.stacks import KILL_STACK_TIMEOUT, collect_stacks
from mlpool._processes.supervisor import Supervisor
from mlpool._processes.workers import WorkerHandle

logger = logging.getLogger("mlpool._engine.engine")


class ManagerThread:
    """The engine's thread: waits on everything, acts under the lock."""

    def __init__(
        self, lock: EngineLock, *, alarm: ManagerAlarm, scheduler: Scheduler, registry: Registry[Job],
        regions: RegionPool, recovery: JobRecovery, readers: PipeReaders, supervisor: Supervisor,
        dispatcher: Dispatcher, replies: Replies,
    ) -> None:  # fmt: skip
        self._lock = lock
        self._alarm = alarm
        self._scheduler = scheduler
        self._registry = registry
        self._regions = regions
        self._recovery = recovery
        self._readers = readers
        self._supervisor = supervisor
        self._dispatcher = dispatcher
        self._replies = replies
        self.shutdown_asked: tuple[bool, float] | None = None  # (cancel_pending, timeout)
        self._shutdown_applied: tuple[bool, float] | None = None
        self._said_waiting = False  # the shutdown's warning that it waits for jobs
        self.finished: Future[None] = Future()  # the thread is done, every worker reaped
        self.thread = threading.Thread(target=self.run, name="mlpool-manager", daemon=True)
        readers.register(lock.wake_r, ("wake", None))

    def ask_shutdown(self, cancel_pending: bool, timeout: float) -> None:
        """Ask for a shutdown, from any thread, without a lock; applied at the next turn."""
        asked = self.shutdown_asked
        if asked is not None:  # asked again: the stronger of the two requests
            cancel_pending, timeout = cancel_pending or asked[0], min(timeout, asked[1])
        self.shutdown_asked = (cancel_pending, timeout)  # one assignment: atomic
        self._lock.wake()

    def run(self) -> None:
        """Start workers, then serve until every worker is gone."""
        self._lock.manager_ident = threading.get_ident()
        try:
            self._supervisor.prepare()
            while not self._serve_once():
                pass
        except BaseException as exc:  # a bug in mlpool: fail every job rather than hang them
            logger.exception("mlpool manager thread failed; the pool is broken")
            with self._lock:
                self._supervisor.break_pool(f"internal error in the manager thread: {exc!r}")
            for worker in list(self._supervisor.workers.values()):
                worker.reap()
                worker.close()
        finally:
            self._close()

    def _serve_once(self) -> bool:
        """One wake-up; True when it is time to exit."""
        supervisor = self._supervisor
        supervisor.start_due()
        with self._lock:
            if supervisor.done():  # broken or closed while starting: nothing left to wait for
                return True
            timeout = self._alarm.plan(
                self._registry.next_deadline(), supervisor.next_deadline(), self._scheduler.hold_until,
                self._next_loan_check(),
            )  # fmt: skip
        arrivals, exits = self._receive(self._readers.select(timeout))
        with self._lock:
            self.apply_shutdown()  # asked from any thread; its wake-up ended the select()
            for worker, messages in arrivals:
                self._replies.take(worker, messages)
            exits += supervisor.launcher_events()
            now = time.monotonic()
            for worker, exitcode in exits:
                supervisor.on_exit(worker, exitcode)
            self._registry.expire(now)
            supervisor.check(now)
            self._readers.reclaim_stopped(supervisor.workers.values(), None)
            self._dispatcher.dispatch()
            done = supervisor.done()
            late = self._recovery.take_late()
            for _, worker in late:  # read by this thread from now on (see _time_out)
                self.take_back(worker, None)
        for worker, _ in exits:
            self._readers.dispose(worker)
        if late:
            self._time_out(late)
        return done

    def _next_loan_check(self) -> float | None:
        """When to check the loops reading busy workers' pipes (under the lock); None: none does."""
        for worker in self._supervisor.workers.values():
            if worker.inflight and isinstance(worker.pipe.read_by, asyncio.AbstractEventLoop):
                return time.monotonic() + LOAN_CHECK
        return None

    def take_back(self, worker: WorkerHandle, here: asyncio.AbstractEventLoop | None) -> None:
        """End ``worker``'s loan, if any (under the lock); a shutdown may wait for it."""
        if self._readers.take_back(worker, here) and self._supervisor.state is not PoolState.RUNNING:
            self._alarm.soon()

    def apply_shutdown(self) -> None:
        """Under the lock: act on the latest shutdown request."""
        asked = self.shutdown_asked
        if asked is None or asked is self._shutdown_applied:
            return
        self._shutdown_applied = asked
        # Event loops cannot read while they wait for this shutdown, nor once
        # they have stopped: this thread reads every pipe from now on.
        for worker in self._supervisor.workers.values():
            if isinstance(worker.pipe.read_by, asyncio.AbstractEventLoop):
                self.take_back(worker, None)
        self._supervisor.shutdown(cancel_pending=asked[0], timeout=asked[1])
        self._say_shutdown_waits(asked[1])

    def _say_shutdown_waits(self, timeout: float) -> None:
        """Under the lock: warn, once, that the shutdown waits for jobs, and how to wait less."""
        running = sum(len(worker.inflight) for worker in self._supervisor.workers.values())
        queued = self._scheduler.queued
        closing = self._supervisor.state is PoolState.CLOSING
        if self._said_waiting or not closing or timeout <= 0 or not (running or queued):
            return
        self._said_waiting = True
        jobs = f"{running} running job{'s' * (running != 1)}"
        if queued:
            jobs += f" and {queued} queued (shutdown(cancel_pending=True) drops queued jobs)"
        logger.warning(
            "shutdown is waiting up to %gs for %s, then kills the workers; to wait less, call "
            "pool.shutdown(timeout=SECONDS) (from any thread, or before leaving `with MLPool(...)`), "
            "or cancel a job with pool.cancel_job(job_id, interrupt=True)", timeout, jobs,
        )  # fmt: skip

    def _time_out(self, late: list[tuple[Job, WorkerHandle]]) -> None:
        """Running jobs past their deadline. An answer already on the worker's
        pipe counts (a loop that borrowed it may not have read it yet); the
        others fail with their worker's stacks, taken outside the lock."""
        workers = {worker.pid: worker for _, worker in late}
        arrivals = [(worker, self._readers.read(worker)) for worker in workers.values()]
        with self._lock:
            for worker, messages in arrivals:
                self._replies.take(worker, messages)
            late = [(job, worker) for job, worker in late if job.state is JobState.RUNNING and job.worker is worker]
        if late:
            readers = [(pid, worker.stacks) for pid, worker in workers.items() if worker.stacks is not None]
            stacks = collect_stacks(readers, KILL_STACK_TIMEOUT)
            with self._lock:
                self._recovery.time_out(late, stacks)

    def _receive(self, ready: list[tuple[str, Any]]) -> tuple[list, list]:
        """Read what select() reported (outside the lock): messages, deaths; a
        launcher's own process (a fork template) is read by its launcher."""
        arrivals: list[tuple[WorkerHandle, list]] = []
        exits: list[tuple[WorkerHandle, int | None]] = []
        now = time.monotonic()
        for kind, subject in ready:
            if kind == "read":
                arrivals.append((subject, self._readers.read(subject)))
            elif kind == "exit":
                arrivals.append((subject, self._readers.read_remaining(subject)))
                if (death := self._supervisor.death_seen(subject, now)) is not None:
                    exits.append(death)
            elif kind == "launcher":
                self._supervisor.launcher_readable(subject, now)
            else:
                self._lock.drain_wakeups()
        return arrivals, exits

    def _close(self) -> None:
        """The thread ends: release what the engine holds."""
        self._supervisor.close()
        self._regions.close()
        self._readers.close()
        self._lock.close()
        if not self.finished.done():
            self.finished.set_result(None)
