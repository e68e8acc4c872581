"""The pool's engine: one lock over all mutable state, one thread that waits.

::

    caller threads / event loops                         worker processes
      │ make_job: pickle args, look up fn (no lock)        ▲        │
      │ enqueue: under the lock, into the queue ───────────┘ Run    │ Ready, Done,
      │   and dispatch at once if a worker can take it              │ Failed, ...
      ▼                                                             ▼
    Manager ── lock ──┬─ _scheduler: the queue, placing, estimates    manager thread: one
                      ├─ _workers: the jobs each holds, in order       select() on every
                      ├─ _registry: job ids, deadlines, result expiry  worker pipe, every
                      └─ _forks: the model template (share_models)     death handle and a
                                                                       wake-up pipe, with
    run(): start what is due ─► wait for the next event or deadline    the next deadline
         ─► read messages and deaths ─► settle them, expire, dispatch  as its timeout

Each part owns its state and the rules that change it: the queue and who
takes what in ``_scheduler`` (pure logic), ids, deadlines and expiry in
``_registry``, the template and its fork requests in ``_forking``. What
stays here: dispatching (build a job's message first, then record who holds
it), the messages workers send, outcomes and counts, and the callers' entry
points. Deaths, restarts, recycling and shutdown are ``_lifecycle``; who
reads a worker's pipe (the manager, a sync caller, an event loop) is
``_pipes``: both are methods of this class kept apart by topic.

Callers dispatch themselves when a worker is free (one thread hop fewer on
the idle path); the manager dispatches whenever capacity frees up, which
only ever happens on its own thread (a result, a Ready, a death). So a job
left in the queue by a caller never needs a wake-up. Callers wake the
manager only when they move a deadline earlier or ask for shutdown.

Outcomes are decided under the lock and handed to callers after it is
released (``_release``): user callbacks never run under our lock, and those
of futures the manager thread settles run on a callback thread.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import selectors
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from mlpool._config import PoolConfig
from mlpool._errors import (
    JobTimeoutError,
    MLPoolError,
    ModelLoadError,
    PoolBrokenError,
    PoolClosedError,
    PoolFullError,
    WorkerCrashedError,
)
from mlpool._forking import ForkLauncher
from mlpool._jobmaker import JobMaker
from mlpool._jobs import CANCELLED, CallbackRunner, Job, JobState, running_loop, running_unit, settle, shared_future
from mlpool._lifecycle import WorkerLifecycle, _last_alive
from mlpool._logs import worker_ready as log_worker_ready
from mlpool._metrics import LatencyRecorder
from mlpool._pipes import PipeReaders, ProtocolBroken
from mlpool._protocol import NOWHERE, Done, Exiting, Failed, LoadFailed, OverMemory, Ready, encode_run, encode_run_batch
from mlpool._ray import RaySession
from mlpool._registry import Registry, Settled
from mlpool._scheduler import Scheduler
from mlpool._serialization import FUNCTION_CACHE_SIZE, dumps_by_value, unpack_exception
from mlpool._shm import RegionPool, read_result
from mlpool._stacks import collect_stacks
from mlpool._state import PoolState, PoolStats
from mlpool._template import Template
from mlpool._tracing import end as end_trace
from mlpool._transport import send_frames
from mlpool._worker_main import WorkerSettings
from mlpool._workers import WorkerHandle, WorkerState

logger = logging.getLogger(__name__)

# The manager's longest wait: deadlines may be further, the OS's timeouts may not.
MAX_WAIT = 3600.0
# Workers whose stack-dump handler is in place and who are not being killed.
_DUMPABLE = frozenset({WorkerState.IDLE, WorkerState.RETIRING, WorkerState.STOPPING})



class Manager(PipeReaders, WorkerLifecycle):
    """Owns the workers, the queue, the deadlines and the job-id registry."""

    def __init__(self, config: PoolConfig, loaders: dict[str, Callable[[], Any]]) -> None:
        self.config = config
        for name in loaders:
            _check_model_name(name)
        self.models = frozenset(loaders)
        self._loaders_pickle = dumps_by_value(loaders, "models_to_load")
        self._context = multiprocessing.get_context(config.start_method)
        self._worker_settings = WorkerSettings(
            parent_pid=os.getpid(),
            threads=config.threads_per_worker,
            memory_limit=config.max_memory_per_worker,
            nice=config.worker_nice,
            shm_threshold=config.shared_memory_threshold,
            shm_limit=config.shared_memory_limit,
            private_memory=config.share_models,
        )
        self._jobs_maker = JobMaker(config, loaders, owner=self)
        self._pid = os.getpid()  # the process this pool belongs to (see _forked)
        self._callbacks = CallbackRunner()
        # Shared memory kept for reuse (see _shm.RegionPool for its idle bound).
        self._regions = RegionPool()

        self._lock = threading.Lock()
        # --- under the lock ---
        self._state = PoolState.STARTING
        self._scheduler = Scheduler()  # the queue, placing jobs, duration estimates
        self._workers: dict[int, WorkerHandle] = {}
        self._registry: Registry[Job] = Registry(config.result_ttl)
        self._space_waiters: list[Future] = []
        self._outcomes: list[tuple[Job, bool, Any]] = []  # settled by _release
        self._wake_at: float | None = None  # when the manager's select() returns at the latest
        self._need_wake = False
        self._failures = 0
        self._broken_reason = ""
        self._stop_deadline: float | None = None
        self._latency = LatencyRecorder()
        self._counts = dict.fromkeys(
            ("completed", "failed", "crashed", "timed_out", "cancelled", "retried", "restarts", "recycled"), 0
        )
        # --- manager thread only ---
        self._selector = selectors.DefaultSelector()
        self._selector_lock = threading.Lock()  # loans (un)register pipes from callers' threads
        self._spawn_at: list[float] = []
        # share_models: the template workers are forked from (see _forking).
        self._forks = ForkLauncher(
            self._context, self._loaders_pickle, self._worker_settings,
            start_timeout=config.start_timeout, fork_with_threads=config.fork_with_threads,
        ) if config.share_models else None  # fmt: skip
        # backend="ray": the Ray instance the actors live in (see _ray).
        self._ray = RaySession(config.ray_address) if config.backend == "ray" else None
        self._start_deadline = time.monotonic() + config.start_timeout
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

        self.started: Future[None] = Future()  # result: ready; exception: start failed
        self.finished: Future[None] = Future()  # the manager thread is done, every worker reaped
        self._thread = threading.Thread(target=self._run, name="mlpool-manager", daemon=True)

    # ------------------------------------------------------------------ callers

    def _check_process(self) -> None:
        """Refuse use from a process forked from the pool's own: the workers,
        their pipes and the manager thread belong to the parent."""
        if os.getpid() != self._pid:
            raise PoolClosedError(
                f"this pool belongs to process {self._pid}, and this process ({os.getpid()}) was forked "
                "from it; create a pool in this process (for gunicorn --preload: in a post_fork hook "
                "or the app's lifespan, not at import)"
            )

    def before_blocking(self) -> None:
        """The calling thread is about to block: take back the worker pipes its
        own event loop reads, which that loop cannot read while it waits."""
        loop = running_loop()
        if loop is None or os.getpid() != self._pid:
            return
        self._lock.acquire()
        try:
            for worker in self._workers.values():
                if worker.borrower is loop:
                    self._take_back(worker, loop)
        finally:
            self._release()

    def start(self) -> None:
        self._thread.start()

    @property
    def state(self) -> PoolState:
        return self._state

    def make_job(
        self,
        model: str,
        fn: Callable,
        args: tuple,
        kwargs: dict,
        *,
        timeout: float | None,
        retries: int | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Job:
        """A new job (see JobMaker), refused in a process forked from the pool's own."""
        self._check_process()
        return self._jobs_maker.make(model, fn, args, kwargs, timeout=timeout, retries=retries, loop=loop)

    def enqueue(self, job: Job, *, wait: bool, register: bool = False) -> Future | None:
        """Accept ``job``: None, or a future that resolves when the full queue
        has room (call again then). Without ``wait`` a full queue raises
        PoolFullError. ``register`` gives the job a string id (``job.key``)."""
        self._lock.acquire()
        try:
            if job.state is not JobState.NEW:  # cancelled while it waited for room
                return None
            self._check_accepting()
            if self._scheduler.queued >= self.config.max_queue_size:
                if not wait:
                    raise PoolFullError(
                        f"the queue is full ({self._scheduler.queued} jobs waiting, max_queue_size="
                        f"{self.config.max_queue_size}); retry later or create the job with "
                        "block_until_scheduled=True"
                    )
                waiter: Future = Future()
                self._space_waiters.append(waiter)
                return waiter
            if register:
                self._registry.add(job)
            self._scheduler.push(job)
            self._watch_deadline(job)
            self._dispatch()
            return None
        finally:
            self._release()

    def _release_memory(self, job: Job, *, keep_offer: bool = False) -> None:
        """Give the job's shared memory back to the pool; no process reads it now."""
        if job.payload.buffers:
            job.payload.release(self._regions)
        if job.result_offer is not None and not keep_offer:
            self._regions.give(job.result_offer)
            job.result_offer = None

    def _watch_deadline(self, job: Job) -> None:
        if self._registry.watch(job) and (self._wake_at is None or job.deadline < self._wake_at):  # type: ignore[operator]
            self._need_wake = True

    def cancel(self, job: Job, *, interrupt: bool = False) -> bool:
        """Cancel ``job``: True if it will never report an outcome.

        A queued job never runs. A running job's result is discarded; with
        ``interrupt`` its worker is killed now (and replaced).
        """
        self._check_process()
        self._lock.acquire()
        try:
            if job.state is JobState.NEW:  # not admitted yet (waiting for room): it never will be
                self._finish(job, False, CANCELLED)
                return True
            if job.state is JobState.QUEUED:
                self._scheduler.left(job)
                self._finish(job, False, CANCELLED)
                return True
            if job.state is JobState.RUNNING:
                worker = job.worker
                assert worker is not None
                unit = running_unit(worker.inflight)
                # A batch runs on while any of its jobs still wants a result.
                stop = interrupt and job in unit and _last_alive(job, unit)
                self._finish(job, False, CANCELLED)
                if stop:
                    worker.kill(f"job {job.id} was cancelled with interrupt=True")
                return True
            return False
        finally:
            self._release()

    def lookup(self, key: str) -> Job | Settled | None:
        self._check_process()
        with self._lock:
            return self._registry.lookup(key)

    def share(self, job: Job) -> Future:
        """A concurrent Future of ``job``'s outcome, for a caller in another
        thread or loop than the one a job made in a coroutine belongs to.

        Attached once, under the lock; settled with the same outcome as the
        job's asyncio handle (see ``_jobs.settle``). If the job finished
        before, its asyncio handle is done, or this Future is settled when
        the outcome on its way reaches it."""
        with self._lock:
            return shared_future(job)

    def reclaim_stopped_loans(self) -> None:
        """Take worker pipes back from event loops that stopped running, so the
        manager thread reads them: for a caller about to wait on a job made in
        a coroutine whose loop ended (a job id fetched after ``asyncio.run``
        returned), whose result only that loop would otherwise read."""
        self._lock.acquire()
        try:
            if self._reclaim_stopped_loans():
                self._need_wake = True
        finally:
            self._release()

    def forget(self, key: str, job: Job | Settled) -> bool:
        """Drop a fetched or cancelled job from the registry; False if already gone."""
        with self._lock:
            return self._registry.forget(key, job)

    def shutdown(self, *, cancel_pending: bool, timeout: float) -> None:
        """Stop taking jobs and start the shutdown sequence; returns at once.

        In a process forked from the pool's own it does nothing: the workers
        belong to the parent, which shuts them down."""
        if os.getpid() != self._pid:
            return
        self._lock.acquire()
        try:
            # Event loops cannot read while they wait for this shutdown, nor
            # once they have stopped: the manager reads every pipe from now on.
            for worker in self._workers.values():
                if isinstance(worker.borrower, asyncio.AbstractEventLoop):
                    self._take_back(worker, running_loop())
            if self._state in (PoolState.CLOSED, PoolState.BROKEN):
                return
            if self._state is not PoolState.CLOSING:
                self._state = self._state.to(PoolState.CLOSING)
                self._stop_deadline = time.monotonic() + timeout
            if cancel_pending:
                self._cancel_queued()
            self._need_wake = True
        finally:
            self._release()

    def join(self, timeout: float | None) -> bool:
        """Wait for the manager thread to finish; False on timeout."""
        if threading.current_thread() is self._thread:
            return False
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def worker_stacks(self, timeout: float) -> dict[int, str]:
        """Every serving worker's stacks by pid (see ``_stacks``); waits at most ``timeout``."""
        with self._lock:
            targets = [
                (w.pid, w.stacks) for w in self._workers.values() if w.stacks is not None and w.state in _DUMPABLE
            ]
        return collect_stacks(targets, timeout)

    def stats(self) -> PoolStats:
        with self._lock:
            alive = [w for w in self._workers.values() if w.state is not WorkerState.EXITED]
            running = sum(len(w.inflight) for w in alive)
            return PoolStats(
                state=self._state.value,
                workers_alive=sum(1 for w in alive if w.state is not WorkerState.STARTING),
                workers_busy=sum(1 for w in alive if w.inflight),
                queue_depth=self._scheduler.queued,
                jobs_running=running,
                jobs_completed=self._counts["completed"],
                jobs_failed=self._counts["failed"],
                jobs_crashed=self._counts["crashed"],
                jobs_timed_out=self._counts["timed_out"],
                jobs_cancelled=self._counts["cancelled"],
                jobs_retried=self._counts["retried"],
                worker_restarts=self._counts["restarts"],
                workers_recycled=self._counts["recycled"],
                results_unfetched=self._registry.unfetched,
                **self._latency.stats_fields(),
                saturation=(running + self._scheduler.queued) / self.config.nb_workers,
            )

    # ------------------------------------------------------------ lock helpers

    def _release(self) -> None:
        """Release the lock, then settle the outcomes decided under it.

        The lock is released whatever exception arrives meanwhile (a signal
        handler raising in the main thread): the swap of the outcomes has no
        call in it, so no handler runs between taking them and releasing."""
        outcomes, self._outcomes = self._outcomes, []
        waiters: list[Future] | None = None
        wake = False
        try:
            if self._space_waiters and self._has_space():
                waiters, self._space_waiters = self._space_waiters, []
            wake = self._need_wake and threading.get_ident() != self._thread.ident
            self._need_wake = False
        finally:
            self._lock.release()
        if wake:
            self._wake()
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if outcomes:
            callbacks = self._callbacks if threading.get_ident() == self._thread.ident else None
            decoded = [self._decode(outcome) for outcome in outcomes]
            settle(decoded, callbacks)
            # Unfetched results of the job-id API keep only their outcome.
            keyed = [outcome for outcome in decoded if outcome[0].key is not None and outcome[2] is not CANCELLED]
            if keyed:
                with self._lock:
                    for job, ok, value in keyed:
                        self._registry.settled(job, ok, value)

    def _decode(self, outcome: tuple[Job, bool, Any]) -> tuple[Job, bool, Any]:
        """Turn a raw Done/Failed message into the result or the exception (outside the lock)."""
        job, ok, value = outcome
        kind = type(value)
        if kind is Done:
            offer, job.result_offer = job.result_offer, None
            try:
                what = f"the result of job {job.id} ({job.fn_name})"
                result = read_result(value.result, value.spans, value.where, value.fd, offer, self._regions, what)
                decoded: tuple[Job, bool, Any] = (job, True, result)
            except Exception as exc:  # its buffers are garbage now: the region went back
                decoded = (job, False, exc)
        elif kind is Failed:
            decoded = (job, False, unpack_exception(value.error, value.traceback))
        else:
            decoded = outcome
        if job.trace is not None:
            end_trace(job, value, decoded[1], decoded[2], _outcome_kind(decoded[1], decoded[2]))
        return decoded

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: a wake-up is already pending; closed: done
            pass

    def _has_space(self) -> bool:
        """Whether callers waiting for room should try again (room, or a refusal to hear)."""
        accepting = self._state in (PoolState.RUNNING, PoolState.STARTING)
        return not accepting or self._scheduler.queued < self.config.max_queue_size

    def _check_accepting(self) -> None:
        if self._state is PoolState.RUNNING or self._state is PoolState.STARTING:
            return
        if self._state is PoolState.BROKEN:
            raise PoolBrokenError(f"the pool is broken and takes no jobs: {self._broken_reason}")
        raise PoolClosedError("the pool is shut down (or shutting down) and takes no new jobs")

    def _finish(self, job: Job, ok: bool, value: Any) -> None:
        """Decide ``job``'s outcome (settled by _release)."""
        job.state = JobState.FINISHED
        if job.worker is None:  # never sent, or back in the queue: nobody reads its memory
            self._release_memory(job)
        self._outcomes.append((job, ok, value))
        now = time.monotonic()
        self._counts[_outcome_kind(ok, value)] += 1
        if value is not CANCELLED:
            run = value.seconds if type(value) is Done or type(value) is Failed else None
            self._latency.observe(now - job.submitted_at, run)
        expiry = self._registry.finished(job, now, keep_result=value is not CANCELLED)
        if expiry is not None and (self._wake_at is None or expiry < self._wake_at):
            self._need_wake = True

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        """Hand queued jobs to workers that can take them (under the lock)."""
        scheduler = self._scheduler
        scheduler.hold_until = None  # set again by plan() if a batch still waits for more items
        if not scheduler:
            return
        limit = self.config.max_jobs_per_worker
        workers = [
            w
            for w in self._workers.values()
            if w.state is WorkerState.IDLE and (limit is None or w.jobs_done + len(w.inflight) < limit)
        ]
        if not workers:
            return
        here = running_loop()
        frames: dict[WorkerHandle, list[tuple[bytes, list[int], int]]] = {}  # frame, its fds, its jobs
        plan = scheduler.plan(workers, here, time.monotonic(), self._others_busy, self._reclaim_stopped_loans)
        for worker, taken, estimate in plan:
            jobs = [job for job in taken if self._start(job)]
            if not jobs:
                continue
            # The message first: if it cannot be built, nothing was recorded.
            try:
                frame, fds = self._run_frame(worker, jobs)
            except Exception as exc:
                self._refuse(jobs, exc)
                continue
            if limit is not None and worker.jobs_done + len(worker.inflight) + len(jobs) >= limit:
                workers.remove(worker)  # its last jobs before it is recycled
            loop = jobs[0].loop if all(job.loop is jobs[0].loop for job in jobs) else None
            if worker.borrower is not None and (worker.borrower is not loop or loop is None):
                self._take_back(worker, here)  # an idle loan to another reader
            if (worker.borrower is None and loop is not None and loop is here and not worker.inflight
                    and self._state is PoolState.RUNNING):
                self._lend_to_loop(worker, here)
            for job in jobs:
                job.state = JobState.RUNNING
                job.worker = worker
                job.estimate = estimate
                worker.inflight.append(job)
                worker.backlog += estimate
            if not worker.registered and worker.borrower is None:
                with worker.read_lock:
                    self._watch(worker)
            frames.setdefault(worker, []).append((frame, fds, len(jobs)))
        hold = scheduler.hold_until
        if hold is not None and (self._wake_at is None or hold < self._wake_at):
            self._need_wake = True
        for worker, batch in frames.items():
            self._send(worker, batch)

    def _start(self, job: Job) -> bool:
        """Move a job taken from the queue to running; False (and cancelled) if its caller cancelled it."""
        if job.mark_running():
            return True
        self._finish(job, False, CANCELLED)
        return False

    def _others_busy(self) -> bool:
        return any(w.inflight for w in self._workers.values())

    def _run_frame(self, worker: WorkerHandle, jobs: list[Job]) -> tuple[bytes, list[int]]:
        """One Run (or RunBatch) frame for ``jobs``, all of one function, and
        the descriptors of their shared memory to send with it."""
        first = jobs[0]
        known = worker.known_functions
        fn = b"" if first.fn_id in known else first.fn_pickle
        # Copied into shared memory at its first dispatch (under the lock: a
        # memcpy, about 0.3 ms for 8 MB); a retry sends the same region.
        fds = [fd for fd in (job.payload.place(self._regions) for job in jobs) if fd >= 0]
        if first.batch_policy is None:
            p = first.payload
            offer = self._scheduler.result_size(first.fn_id)
            if offer is not None:  # its results came in shared memory: offer room for the next
                first.result_offer = self._regions.take(offer)
                fds.append(first.result_offer.fd)
            frame = encode_run(first.id, first.fn_id, first.model, fn, p.data, p.spans, offer is not None)
            if first.trace is not None:
                first.trace.sent(worker.pid)
        else:
            ids = tuple(job.id for job in jobs)
            payloads = tuple(job.payload.data for job in jobs)
            spans = tuple(job.payload.spans for job in jobs) if fds else ()
            frame = encode_run_batch(ids, first.fn_id, first.model, fn, payloads, spans)
            for job in jobs:
                if job.trace is not None:
                    job.trace.sent(worker.pid)
        if fn:
            if len(known) >= FUNCTION_CACHE_SIZE:  # the worker clears its cache at the same message
                known.clear()
            known.add(first.fn_id)
        return frame, fds

    def _refuse(self, jobs: list[Job], exc: Exception) -> None:
        """Fail jobs whose message could not be built (out of descriptors or
        memory for shared memory, ...); the worker never saw them."""
        for job in jobs:
            error = MLPoolError(f"job {job.id} ({job.fn_name}) could not be sent to a worker: {exc!r}")
            error.__cause__ = exc
            job.worker = None
            self._finish(job, False, error)

    def _send(self, worker: WorkerHandle, frames: list[tuple[bytes, list[int], int]]) -> None:
        """Write frames (each with its descriptors and how many jobs it carries) to ``worker``."""
        try:
            send_frames(worker.sock, [(frame, fds) for frame, fds, _ in frames])
        except OSError as exc:
            # A dead worker (its sentinel will tell us how): these jobs never
            # reached it, back to the front of the queue. Any other error may
            # have left half a message in the pipe: the worker is killed, and
            # these jobs fail (sending them again would fail again).
            dead = isinstance(exc, (BrokenPipeError, ConnectionResetError))
            unsent = sum(count for _, _, count in frames)
            logger.debug("worker %d: could not send %d jobs: %r", worker.id, unsent, exc)
            worker.kill(f"its pipe failed: {exc!r}")
            for _ in range(unsent):
                job = worker.inflight.pop()
                worker.backlog -= job.estimate
                if job.result_offer is not None:
                    self._regions.give(job.result_offer)
                    job.result_offer = None
                if dead:
                    self._scheduler.requeue(job)
                else:
                    self._refuse([job], exc)

    # ----------------------------------------------------------- manager loop

    def _run(self) -> None:
        """The manager thread: start workers, then serve until every worker is gone."""
        try:
            if self._ray is not None and not self._connect_ray():
                return
            for _ in range(self.config.nb_workers):
                self._spawn_at.append(time.monotonic())
            while not self._serve_once():
                pass
        except BaseException as exc:  # a bug in mlpool: fail every job rather than hang them
            logger.exception("mlpool manager thread failed; the pool is broken")
            self._lock.acquire()
            try:
                self._break(f"internal error in the manager thread: {exc!r}")
            finally:
                self._release()
            for worker in list(self._workers.values()):
                worker.reap()
                worker.close()
        finally:
            self._close_resources()

    def _serve_once(self) -> bool:
        """One wake-up of the manager; True when it is time to exit."""
        self._start_template_if_due()
        self._spawn_due_workers()
        self._lock.acquire()
        try:
            if self._done():  # broken or closed while spawning: nothing left to wait for
                return True
            timeout = self._plan_wait()
        finally:
            self._release()
        events = self._selector.select(timeout)
        arrivals: list[tuple[WorkerHandle, list]] = []
        exits: list[tuple[WorkerHandle, int | None]] = []
        template_events: list = []
        template_exit: tuple[Template, int | None] | None = None
        now = time.monotonic()
        for key, _ in events:
            kind, worker = key.data
            if kind == "template":  # here "worker" is the Template
                template_events += worker.receive()
            elif kind == "template-exit":
                template_events += worker.receive()
                template_exit = (worker, self._reap_template(worker))
            elif kind == "read":
                arrivals.append((worker, self._read(worker)))
            elif kind == "exit":
                arrivals.append((worker, self._read_remaining(worker)))
                with self._selector_lock:
                    self._selector.unregister(worker.sentinel)
                exitcode = worker.reap()
                if exitcode is None and worker.forked and self._forks is not None and self._forks.template:
                    self._forks.await_exit_code(worker, now)  # its template reports it (Reaped)
                else:
                    exits.append((worker, exitcode))
            else:
                self._drain_wakeups()
        self._lock.acquire()
        try:
            for worker, messages in arrivals:
                for msg in messages:
                    self._on_message(worker, msg)
            forks = self._forks
            if forks is not None:
                exits += self._on_fork_outcome(forks.events(template_events))
                if template_exit is not None:
                    exits += self._on_template_exit(*template_exit)
                elif forks.ready and not forks.announced:
                    self._on_template_ready()
                exits += forks.overdue_exits(time.monotonic())
            for worker, exitcode in exits:
                self._on_exit(worker, exitcode)
            now = time.monotonic()
            self._expire_jobs(now)
            self._expire_results(now)
            self._check_start(now)
            self._advance_shutdown(now)
            self._dispatch()
            done = self._done()
        finally:
            self._release()
        for worker, _ in exits:
            self._dispose(worker)
        return done

    def _done(self) -> bool:
        """Whether the manager thread has nothing left to do (under the lock)."""
        return self._state in (PoolState.CLOSED, PoolState.BROKEN) and not self._workers

    def _plan_wait(self) -> float | None:
        """Seconds until the next deadline (None: none); noted in _wake_at."""
        candidates = []
        registry_due = self._registry.next_deadline()
        if registry_due is not None:
            candidates.append(registry_due)
        if self._spawn_at:
            candidates.append(self._spawn_at[0])
        if self._forks is not None and (forks_due := self._forks.next_deadline()) is not None:
            candidates.append(forks_due)
        if self._scheduler.hold_until is not None:
            candidates.append(self._scheduler.hold_until)
        start_deadline = self._next_start_deadline()
        if start_deadline is not None:
            candidates.append(start_deadline)
        if self._stop_deadline is not None and self._state is PoolState.CLOSING:
            candidates.append(self._stop_deadline)
        if not candidates:
            self._wake_at = None
            return None
        self._wake_at = min(candidates)
        # select() refuses timeouts past about 24.8 days; an early wake-up is harmless.
        return min(MAX_WAIT, max(0.0, self._wake_at - time.monotonic()))

    def _connect_ray(self) -> bool:
        assert self._ray is not None
        try:
            self._ray.connect()
        except Exception as exc:
            error = ModelLoadError(f"could not connect to Ray (ray_address={self.config.ray_address!r}): {exc!r}")
            self._lock.acquire()
            try:
                self._break(str(error), start_error=error)
                self._state = self._state.to(PoolState.CLOSED)
            finally:
                self._release()
            return False
        return True

    def _reap_template(self, template: Template) -> int | None:
        """The template died: stop watching it, take what it sent last, reap it."""
        with self._selector_lock:
            self._selector.unregister(template.fd)
            self._selector.unregister(template.sentinel)
        return template.reap()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # ----------------------------------------------- manager: under the lock

    def _on_message(self, worker: WorkerHandle, msg: Any) -> None:
        match msg:
            case Done() | Failed():
                if not worker.inflight or worker.inflight[0].id != msg.job_id:
                    worker.kill(f"protocol error: answered job {msg.job_id} out of order")
                    return
                job = worker.inflight.popleft()
                worker.backlog -= job.estimate
                worker.jobs_done += 1
                shared = sum(length for _, length in msg.spans) if type(msg) is Done and msg.where != NOWHERE else None
                self._scheduler.observe(job.fn_id, msg.seconds, shared)
                # The worker is done with its arguments; the offer is read in _decode.
                self._release_memory(job, keep_offer=job.state is JobState.RUNNING and type(msg) is Done)
                if not worker.inflight and worker.registered:
                    with worker.read_lock:
                        self._watch(worker)
                self._failures = 0
                if job.state is JobState.RUNNING:
                    self._finish(job, type(msg) is Done, msg)
                elif type(msg) is Done and msg.fd >= 0:  # a discarded result's shared memory
                    os.close(msg.fd)
                    self._release_memory(job)
                self._maybe_retire(worker)
            case Ready():
                if worker.state is WorkerState.STARTING:
                    worker.state = worker.state.to(WorkerState.IDLE)
                    with worker.read_lock:
                        self._watch(worker)
                    worker.pid = msg.pid
                    log_worker_ready(worker, msg.load_seconds, replacement=self._state is not PoolState.STARTING)
                    if self._state is PoolState.STARTING and all(
                        w.state is not WorkerState.STARTING for w in self._workers.values()
                    ):
                        self._state = self._state.to(PoolState.RUNNING)
                        self._set_started(None)
            case LoadFailed():
                worker.load_failure = msg
            case OverMemory(rss):
                self._retire(worker, f"its resident memory, {rss / 2**20:.0f} MiB, passed max_memory_per_worker")
            case Exiting():
                pass
            case ProtocolBroken(reason):
                worker.fault = reason
                worker.kill(f"protocol error: {reason}")

# Bytes of a model name in a Run message (its length field is 16 bits).
MAX_MODEL_NAME = 4096


def _check_model_name(name: str) -> None:
    """A name every message can carry: refused at construction, not at each job."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError as exc:
        raise ValueError(f"model name {name!r} cannot be encoded as UTF-8: {exc.reason}") from None
    if size > MAX_MODEL_NAME:
        raise ValueError(f"model name {name[:40]!r}... is {size} bytes long; at most {MAX_MODEL_NAME}")


def _outcome_kind(ok: bool, value: Any) -> str:
    """Which ``stats()`` count an outcome adds to: every finished job counts once."""
    if ok:
        return "completed"
    if value is CANCELLED:
        return "cancelled"
    if isinstance(value, WorkerCrashedError):
        return "crashed"
    if isinstance(value, JobTimeoutError):
        return "timed_out"
    return "failed"  # the function raised, or the pool broke or shut down under it
