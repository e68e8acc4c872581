"""Sessions: jobs grouped by their client, cancelled together when it goes away.

A WebSocket handler serves one client for a long time and sends it many
results; when the client disconnects, its unfinished jobs should stop
costing anything::

    async with pool.session(interrupt=True) as session:
        async for message in websocket.iter_text():
            await websocket.send_json(await session.score_async("iris", score, message))
    # leaving the block (normally, by an error, or by cancellation) cancels
    # every job of the session that has not finished

A :class:`Session` is the pool's job methods (:class:`~mlpool._api.jobapi.JobAPI`)
with a :class:`SessionJobs`, which owns the session's state under its own lock:
a job enters the group when a call starts admitting it, belongs to it once
the engine admitted it (a job refused with :class:`PoolFullError` never
does), and leaves it when it finishes, by a done-callback on its handle. So
the group holds only unfinished jobs and costs O(1) per job, and
``close()`` cancels exactly those, also the calls still waiting for room in
the queue, which wake at once.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from mlpool._api.jobapi import Engine, JobAPI
from mlpool._api.options import JobOptions
from mlpool._engine.jobs import Job
from mlpool.errors import PoolClosedError


class SessionJobs:
    """The unfinished jobs of one session; thread-safe by construction (one lock,
    and ``close`` decides under it which jobs are the session's to cancel)."""

    __slots__ = ("_engine", "_interrupt", "_lock", "_waiting", "_jobs", "_closed")

    def __init__(self, engine: Engine, *, interrupt: bool) -> None:
        self._engine = engine
        self._interrupt = interrupt
        self._lock = threading.Lock()
        # --- under the lock ---
        self._waiting: set[Job] = set()  # being admitted (maybe waiting for room)
        self._jobs: set[Job] = set()  # admitted, not finished
        self._closed = False

    @property
    def interrupt(self) -> bool:
        """Whether closing the session interrupts its running jobs (a pool host
        applies it too when the API process dies)."""
        return self._interrupt

    @property
    def unfinished(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._jobs)

    @property
    def closed(self) -> bool:
        return self._closed

    def enter(self, job: Job) -> None:
        """A call starts admitting ``job``; PoolClosedError if the session is closed."""
        with self._lock:
            if self._closed:
                raise PoolClosedError("this session is closed")
            self._waiting.add(job)

    def leave(self, job: Job) -> None:
        """``job`` was refused (or its caller gave up): not the session's."""
        with self._lock:
            self._waiting.discard(job)

    def admit(self, job: Job) -> bool:
        """The engine admitted ``job``: it is the session's until it finishes.
        False if ``close()`` took it first (and cancelled it)."""
        with self._lock:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
            self._jobs.add(job)
        handle: Any = job.afut if job.afut is not None else job.future
        # Runs at once if the job already finished (the inline engine runs it at admission).
        handle.add_done_callback(partial(self._finished, job))
        return True

    def _finished(self, job: Job, _: object) -> None:
        with self._lock:
            self._jobs.discard(job)

    def close(self) -> int:
        """Cancel every job of the session that has not finished; how many. Idempotent."""
        with self._lock:
            self._closed = True
            jobs = [*self._waiting, *self._jobs]
            self._waiting = set()
            self._jobs = set()
        engine = self._engine
        cancelled = 0
        for job in jobs:
            if engine.cancel(job, interrupt=self._interrupt):
                cancelled += 1
                if job.key is not None:
                    engine.forget(job.key, job)
        return cancelled


class Session(JobAPI):
    """A group of jobs submitted through one pool and cancelled together.

    Create it with :meth:`MLPool.session`. Its methods are the pool's job
    methods (same arguments, same errors); :meth:`close` (or leaving the
    ``with`` / ``async with`` block) cancels every job of the session still
    queued or running, and makes the session's calls that wait for room in
    the queue raise at once (``CancelledError``; :class:`PoolClosedError`
    for ``create_job``). With ``interrupt=True`` a running job's worker is
    killed and replaced, so its CPU is freed at once; otherwise its result is
    discarded. A job refused with :class:`PoolFullError` is not the session's.
    Thread-safe.
    """

    def __init__(self, engine: Engine, *, interrupt: bool = False, options: JobOptions | None = None) -> None:
        self._jobs = SessionJobs(engine, interrupt=interrupt)
        super().__init__(engine, self._jobs, options)

    def __repr__(self) -> str:
        return f"<mlpool.Session {self.unfinished} unfinished jobs{' closed' if self._jobs.closed else ''}>"

    @property
    def unfinished(self) -> int:
        """How many of the session's jobs have not finished (held only until they do)."""
        return self._jobs.unfinished

    def close(self) -> int:
        """Cancel every unfinished job of the session (also those waiting for
        room in the queue); how many were cancelled. Idempotent: later calls
        through the session raise :class:`PoolClosedError`."""
        return self._jobs.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
