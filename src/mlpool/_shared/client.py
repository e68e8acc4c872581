"""The engine of an API process that shares a pool host (``share_across_processes``).

::

    caller ── make_job (pickled here, large buffers in this process's shared memory)
           ── enqueue: within this process's share ─► SUBMIT ─► the host (``_shared.relay``)
    reader thread ◄─ DONE / FAILED / ERROR / GONE / END / ITEM / ANSWER ─► the job's handle;
           a result is unpickled by its caller, in place, from the room this process offered

Job ids, result expiry, sessions and futures live here, as in any pool. The
host holds the queue, the workers and the fairness between processes (a
lane each). This process's share: ``max_queue_size // processes`` waiting
plus one per worker slot; past it, callers wait, or get PoolFullError. A
host that dies fails the jobs in flight (PoolBrokenError says so); the next
call attaches again, starting a new host; calls meanwhile wait for it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import replace
from typing import Any

from mlpool._api.config import PoolConfig
from mlpool._engine.jobmaker import JobMaker, forked_error
from mlpool._engine.jobs import CallbackRunner, Job, JobState, Outcome, settle, shared_future
from mlpool._engine.metrics import LatencyRecorder
from mlpool._engine.regions import RegionPool, read_result
from mlpool._engine.registry import Registry, Settled
from mlpool._engine.state import PoolState, PoolStats, ProcessStats, refusal
from mlpool._engine.tracing import end as end_trace
from mlpool._shared.calls import HostCalls, empty_stats, set_quietly, share_full, unpickled_error, wake
from mlpool._shared.channel import close_all
from mlpool._shared.connection import Connection
from mlpool._shared.deadlines import Watchdog, overdue_error
from mlpool._shared.protocol import ANSWER, CANCEL, CREDIT, DONE, END, ERROR, FAILED, GONE, ITEM, RELOADED, SHARE
from mlpool._shared.rendezvous import Attached, address, attach
from mlpool._shared.spec import fingerprint, hello, host_spec, pickled_loaders
from mlpool._shared.submissions import Submissions, abandon
from mlpool._wire.protocol import Item
from mlpool._wire.serialization import unpack_exception
from mlpool.errors import PoolBrokenError, PoolClosedError

logger = logging.getLogger("mlpool.shared")

CALL_TIMEOUT = 30.0  # seconds a stats() call waits for the host before answering without it


class SharedEngine:
    """Answers the facade's calls through a pool host (see the module docstring)."""

    def __init__(
        self, config: PoolConfig, loaders: dict[str, Callable[[], Any]], share: bool | str, options: dict[str, Any]
    ) -> None:
        self.config = config
        self.models = frozenset(loaders)
        self._pid = os.getpid()
        self._regions = RegionPool(config.shared_memory_cache)
        self._maker = JobMaker(config, loaders, owner=self, pid=self._pid, regions=self._regions)
        self.make_job = self._maker.make
        self._address = address(share, list(loaders))
        self._options = options
        self._fingerprint = fingerprint(options)
        self._spec = host_spec(self._address, options, self._fingerprint)  # an unpicklable loader fails here
        self._reloaded: dict[str, bytes] = {}  # loaders reload_models put in place since (a new host loads them)
        self._lock = threading.Lock()
        self._callbacks = CallbackRunner()
        # --- under the lock ---
        self._state = PoolState.STARTING
        self._connection: Connection | None = None
        self._attaching: Future[None] | None = None
        self._submissions = Submissions(self._regions)
        self._lost_reason: BaseException | None = None
        self._host_pid = 0
        self._processes = 1
        self._slots = 1
        self._jobs: dict[int, Job] = {}  # sent, not answered
        self._cancelled: dict[int, Job] = {}  # cancelled after they were sent: their memory waits for the answer
        self._rooms: list[Future] = []  # callers waiting for room or for the host
        self._waited: dict[int, Future] = {}  # job id -> the attach it waits for (its failure is the job's)
        self._registry: Registry[Job] = Registry(config.result_ttl)
        self._counts = dict.fromkeys(("submitted", "completed", "failed", "cancelled"), 0)
        self._latency = LatencyRecorder()
        self._calls = HostCalls()
        self._watchdog = Watchdog(self._overdue)
        self.started: Future[None] = Future()
        self.finished: Future[None] = Future()

    @property
    def state(self) -> PoolState:
        return self._state

    # ---------------------------------------------------------- attaching

    def start(self) -> None:
        """Attach in a thread of its own; ``started`` tells how it went."""
        with self._lock:
            self._attach_soon()

    def _attach_soon(self) -> Future[None]:
        """(Under the lock.) The attach under way, or a new one."""
        if self._attaching is None:
            self._attaching = Future()
            threading.Thread(target=self._attach, args=(self._attaching,), name="mlpool-attach", daemon=True).start()
        return self._attaching

    def _attach(self, done: Future[None]) -> None:
        try:
            attached = attach(self._address, hello(self._fingerprint), self._spec)
        except BaseException as exc:
            self._attach_failed(done, exc)
            return
        self._attached(done, attached)

    def _attached(self, done: Future[None], attached: Attached) -> None:
        with self._lock:
            self._attaching = None
            if self._state in (PoolState.CLOSING, PoolState.CLOSED):
                attached.channel.close()
            else:
                connection = self._connection = Connection(attached, self._take, self._lost)
                self._state, self._lost_reason = PoolState.RUNNING, None
                self._host_pid, self._processes = connection.host_pid, connection.processes
                self._slots = connection.slots
                self._submissions.reset()
                self._waited.clear()
                if attached.welcome.get("reloaded"):  # reloads done before we came: a later host loads them
                    self._on_reloaded(attached.welcome["reloaded"])
            rooms = self._take_rooms()
        done.set_result(None)
        if not self.started.done():
            self.started.set_result(None)
        wake(rooms)

    def _attach_failed(self, done: Future[None], exc: BaseException) -> None:
        first = not self.started.done()
        with self._lock:
            self._attaching = None
            self._lost_reason = exc
            if first and self._state is PoolState.STARTING:  # never attached: broken (a shutdown stays)
                self._state = PoolState.BROKEN
            rooms = self._take_rooms()
        done.set_exception(exc)
        if first:
            self.started.set_exception(exc)
            set_quietly(self.finished)
        wake(rooms)

    # ---------------------------------------------------------- jobs

    def enqueue(self, job: Job, *, wait: bool, register: bool = False) -> Future | None:
        """Send ``job`` to the host: None, or a future that resolves when this
        process may send it (room in its share, or the host back): call again then."""
        with self._lock:
            self._registry.expire(time.monotonic())
            if job.state is not JobState.NEW:  # cancelled while it waited
                return None
            if (refused := self._refusal()) is not None:
                raise refused
            attempt = self._waited.pop(job.id, None)
            if attempt is not None and attempt.done() and (error := attempt.exception()) is not None:
                raise PoolBrokenError(f"the pool host died and a new one could not be started: {error}") from error
            connection = self._connection
            if connection is None:  # attaching (first, or after the host died)
                self._waited[job.id] = self._attach_soon()
                return self._room()
            if len(self._jobs) + len(self._cancelled) >= self._share():
                if not wait:
                    raise share_full(self._share(), self._processes, self.config.max_queue_size)
                return self._room()
            if register:
                self._registry.add(job)
            self._jobs[job.id] = job
            self._counts["submitted"] += 1
            job.to(JobState.QUEUED)
            if job.deadline is not None:  # kept by the host; by us if it stops answering
                self._watchdog.watch(job.deadline, job.id)
        try:
            self._submissions.send(connection, job)
        except BaseException:  # a Ctrl-C before it went out (or just after): the job is no more
            self._unsent(job, connection)
            raise
        return None

    def _unsent(self, job: Job, connection: Connection) -> None:
        with self._lock:
            if self._jobs.pop(job.id, None) is None:
                return
            job.to(JobState.FINISHED)
            self._counts["cancelled"] += 1
            self._registry.finished(job, time.monotonic(), keep_result=False)
        connection.send((CANCEL, 0, job.id, False))  # if it went out after all: its answer is dropped
        abandon(job)
        settle([Outcome(job, False, None, cancelled=True)], self._callbacks)

    def _refusal(self) -> BaseException | None:
        if self._state is PoolState.BROKEN:
            return PoolBrokenError(f"the shared pool could not start: {self._lost_reason}")
        if self._state in (PoolState.CLOSING, PoolState.CLOSED):
            return refusal(self._state)
        return None

    def _share(self) -> int:
        return max(1, self.config.max_queue_size // max(1, self._processes)) + self._slots

    def _room(self) -> Future:
        """(Under the lock.) A future for a caller to wait on: resolved when an
        answer frees room, or the host is attached (or could not be)."""
        room: Future = Future()
        self._rooms.append(room)
        return room

    def _take_rooms(self) -> list[Future]:
        rooms, self._rooms = self._rooms, []  # woken by the caller, after the lock
        return rooms

    def discard(self, job: Job) -> None:
        with self._lock:
            self._waited.pop(job.id, None)
            if job.state is JobState.NEW:
                job.payload.release(self._regions)

    def cancel(self, job: Job, *, interrupt: bool = False) -> bool:
        """True if ``job`` will never report an outcome; a sent one is cancelled at the host."""
        if os.getpid() != self._pid:
            raise forked_error(self._pid)
        with self._lock:
            if job.state is JobState.FINISHED:
                return False
            sent = self._jobs.pop(job.id, None) is not None
            if sent:
                self._cancelled[job.id] = job
            job.to(JobState.FINISHED)
            self._counts["cancelled"] += 1
            self._registry.finished(job, time.monotonic(), keep_result=False)
            connection = self._connection if sent else None
        if connection is not None:
            connection.send((CANCEL, 0, job.id, interrupt))
        settle([Outcome(job, False, None, cancelled=True)], self._callbacks)
        return True

    def run_direct(self, job: Job) -> bool:
        return False  # no worker pipe here: jobs go through the host (whose relay may run it directly)

    def send_control(self, job: Job, msg: Any) -> None:
        """A stream's Credit, on to the host."""
        connection = self._connection
        if connection is not None and job.state is JobState.QUEUED:
            connection.send((CREDIT, 0, job.id, msg.items, msg.nbytes))

    def read_item(self, job: Job, item: Item) -> Any:
        what = f"an item of job {job.id} ({job.fn_name})"
        return read_result(item.data, item.spans, item.where, item.fd, None, self._regions, what)

    def call_soon(self, fn: Callable[[], object]) -> None:
        self._callbacks.run(None, [lambda _: fn()])  # type: ignore[arg-type]

    def before_blocking(self) -> None:
        pass  # no pipe is lent to an event loop here

    def share(self, job: Job) -> Future:
        with self._lock:
            return shared_future(job)

    def reclaim_stopped_loans(self) -> None:
        pass  # the reader thread reads every answer

    def lookup(self, key: str) -> Job | Settled | None:
        if os.getpid() != self._pid:
            raise forked_error(self._pid)
        with self._lock:
            self._registry.expire(time.monotonic())
            return self._registry.lookup(key)

    def forget(self, key: str, job: Job | Settled) -> bool:
        with self._lock:
            return self._registry.forget(key, job)

    # ---------------------------------------------------------- answers

    def _take(self, msg: tuple, fds: list[int]) -> None:
        kind = msg[0]
        if kind == DONE:
            self._done(msg[2], msg[3], msg[4], msg[5], fds[0] if fds else -1)
        elif kind == ITEM:
            job = self._jobs.get(msg[2])
            item = Item(msg[2], msg[3], msg[4], msg[5], fds[0] if fds else -1)
            if job is not None and job.stream is not None and job.state is JobState.QUEUED:
                job.stream.push(item)
            else:
                close_all(fds)
        elif kind in (FAILED, ERROR, END, GONE):
            job = self._answered(msg[2], kind)
            if job is not None:
                if kind == END:
                    self._finish(job, True, None)
                elif kind == FAILED:
                    self._finish(job, False, unpack_exception(msg[3], msg[4]))
                elif kind == ERROR:
                    self._finish(job, False, unpickled_error(msg[3]))
                else:  # GONE without our cancel: the host shut down with it queued
                    self._finish(job, False, PoolClosedError("the pool host shut down before the job ran"))
        elif kind == SHARE:
            with self._lock:
                self._processes = msg[2]
                rooms = self._take_rooms()
            wake(rooms)
        elif kind == ANSWER:
            self._calls.answered(msg[2], msg[3], msg[4])
        elif kind == RELOADED:
            self._on_reloaded(msg[2])
        else:
            close_all(fds)
            raise ValueError(f"unexpected message kind {kind} from the pool host")

    def _answered(self, cid: int, kind: int) -> Job | None:
        """The host's last word on job ``cid``: the job if it waits for it
        (None if it was cancelled here); its shared memory is released (the
        room offered for a DONE's result is the result's: see ``_done``)."""
        with self._lock:
            job = self._jobs.pop(cid, None)
            cancelled = None if job is not None else self._cancelled.pop(cid, None)
            rooms = self._take_rooms()
        wake(rooms)
        if job is not None or cancelled is not None:
            self._submissions.answered(job or cancelled, kind, cancelled is not None)  # type: ignore[arg-type]
        return job

    def _done(self, cid: int, data: bytes, spans: Any, where: int, fd: int) -> None:
        job = self._answered(cid, DONE)
        if job is None:  # cancelled here: nobody reads it
            if fd >= 0:
                os.close(fd)
            return
        try:
            result = self._submissions.result(job, data, spans, where, fd, self._undecodable)
        except Exception as exc:  # out of memory or descriptors to map it
            self._finish(job, False, exc)
            return
        self._finish(job, True, result)

    def _finish(self, job: Job, ok: bool, value: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if job.state is JobState.FINISHED:
                return
            job.to(JobState.FINISHED)
            self._counts["completed" if ok else "failed"] += 1
            self._latency.observe(now - job.submitted_at, None)
            self._registry.finished(job, now, keep_result=True)
        if job.trace is not None:
            end_trace(job, None, ok, value, "completed" if ok else "failed")
        settle([Outcome(job, ok, value)], self._callbacks)
        with self._lock:
            self._registry.settled(job, ok, value)

    def _on_reloaded(self, loaders: dict[str, bytes]) -> None:
        self._reloaded.update(loaders)
        self._spec = host_spec(self._address, self._options, self._fingerprint, self._reloaded)

    def _overdue(self, job_id: int) -> None:
        """A job's deadline passed, and the host did not say so (stopped or hung)."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None:  # answered meanwhile
                return
            self._cancelled[job_id] = job  # its memory waits for the host's last word
            connection, host_pid = self._connection, self._host_pid
        if connection is not None:
            connection.send((CANCEL, 0, job_id, True))
        self._finish(job, False, overdue_error(job_id, job.fn_name, host_pid))

    def _undecodable(self, model: str) -> None:
        with self._lock:
            self._counts["completed"] -= 1
            self._counts["failed"] += 1

    def _lost(self, connection: Connection, reason: BaseException | None) -> None:
        """The connection ended: its jobs and calls fail; the next call attaches again."""
        with self._lock:
            if self._connection is connection:
                self._connection = None
            closing = self._state in (PoolState.CLOSING, PoolState.CLOSED)
            if not closing:
                self._state = PoolState.STARTING
            jobs = list(self._jobs.values()) + list(self._cancelled.values())
            self._jobs.clear()
            self._cancelled.clear()
            rooms = self._take_rooms()
        error = PoolClosedError("the pool was shut down while the job ran") if closing else connection.lost(reason)
        if not closing:
            logger.warning("mlpool: %s (%d jobs)", error, len(jobs))
        for job in jobs:
            abandon(job)
            self._finish(job, False, error)
        self._calls.fail_all(error)
        wake(rooms)
        if closing:
            self._closed()

    def _closed(self) -> None:
        """The last step of a shutdown: nothing of this pool is left in this process."""
        self._watchdog.stop()
        self._callbacks.stop()
        self._regions.close()
        set_quietly(self.finished)

    # ---------------------------------------------------------- calls

    def _call(self, operation: str, *arguments: Any) -> Future:
        """Ask the host; a future of its answer."""
        if os.getpid() != self._pid:
            raise forked_error(self._pid)
        with self._lock:
            refused, connection = self._refusal(), self._connection
            attempt = self._attach_soon() if connection is None and refused is None else None
        if attempt is not None:  # the host died: a call starts a new one too (a stats-only process)
            with suppress(Exception):
                attempt.result(CALL_TIMEOUT)
            with self._lock:
                refused, connection = self._refusal(), self._connection
        return self._calls.call(connection, refused, operation, arguments)

    def stats(self) -> PoolStats:
        """The whole pool's figures (from the host), with this process's own."""
        try:
            pool: PoolStats = self._call("stats").result(CALL_TIMEOUT)
        except Exception:
            pool = empty_stats(self._state)
        with self._lock:
            self._registry.expire(time.monotonic())
            counts = {f"jobs_{name}": count for name, count in self._counts.items()}
            mine = ProcessStats(self._pid, self._host_pid, self._processes, len(self._jobs), **counts,
                                results_unfetched=self._registry.unfetched)  # fmt: skip
            state = self._state.value if self._state is not PoolState.RUNNING else pool.state
        return replace(pool, state=state, process=mine, results_unfetched=mine.results_unfetched)

    def worker_stacks(self, timeout: float) -> dict[int, str]:
        stacks: dict[int, str] = self._call("worker_stacks", timeout).result(timeout + CALL_TIMEOUT)
        return stacks

    def reload(self, loaders: dict[str, Callable[[], Any]] | None, *, timeout: float | None, surge: int) -> Future:
        """Ask the host to roll the new version out (its ``reload_models``);
        once it succeeded, every API process hears of it (RELOADED), so a
        host started later (this one died) loads the new version."""
        return self._call("reload", None if loaders is None else pickled_loaders(loaders), timeout, surge)

    # ---------------------------------------------------------- the end

    def shutdown(self, *, cancel_pending: bool, timeout: float) -> None:
        """Stop taking jobs; once this process's jobs are answered (or
        cancelled: ``cancel_pending``, or ``timeout`` passed), leave the host.
        Nothing in a process forked from this one: the connection is the parent's."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._state in (PoolState.CLOSING, PoolState.CLOSED):
                return
            self._state = PoolState.CLOSING
            rooms = self._take_rooms()
            jobs = list(self._jobs.values())
        wake(rooms)
        if cancel_pending:
            for job in jobs:
                self.cancel(job)
        threading.Thread(target=self._leave, args=(timeout,), name="mlpool-shared-close", daemon=True).start()

    def _leave(self, timeout: float) -> None:
        futures.wait([self.share(job) for job in list(self._jobs.values())], timeout)  # this process's own jobs
        with self._lock:
            self._state = PoolState.CLOSED
            connection = self._connection
            jobs = list(self._jobs.values())
        for job in jobs:
            self.cancel(job)
        if connection is None:
            self._closed()
        else:
            connection.close()  # the reader sees the end, and closes the rest (_lost)

    def join(self, timeout: float | None) -> bool:
        if os.getpid() != self._pid:
            return True
        try:
            self.finished.result(timeout)
        except TimeoutError:
            return False
        return True
