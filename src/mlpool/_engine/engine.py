"""The pool's engine: the lock, the callers' entry points, and the manager thread.

::

    caller threads / event loops                              worker processes
      │ make_job: pickle args, look up fn (no lock)             ▲        │
      │ enqueue: under the lock, into the queue ────────────────┘ Run    │ Ready, Done,
      │   and dispatch at once if a worker can take it                   │ Failed, ...
      ▼                                                                  ▼
    ProcessEngine ── lock ──┬─ Scheduler     the queue, who takes what     manager thread:
                            ├─ Registry      job ids, deadlines, expiry    one select() on
                            ├─ Supervisor    pool state, workers, groups   every watched
                            │                and their launchers, deaths,  pipe, death
                            │                shutdown                      handle and the
                            ├─ JobRecovery   what deaths and deadlines     wake-up pipe,
                            │                do to jobs                    with the next
                            ├─ PipeReaders   who reads each worker's pipe  deadline as
                            ├─ Dispatcher    jobs to workers               its timeout
                            ├─ Replies       what workers send
                            └─ Outcomes      outcomes, counts, latency

    run(): start what is due ─► wait for the next event or deadline
         ─► read messages and deaths ─► settle them, expire, dispatch

Each part owns its state and the rules that change it; the ProcessEngine owns the
lock and the callers' entry points. Its methods hold the lock as
``with self._lock:`` (the C lock) and deliver in a ``finally``; the manager
thread and the Supervisor use ``with locked():``, which does both (see
``_engine.lock``). Delivering, after the lock, settles the outcomes decided
under it: user callbacks never run under our lock, and those of futures the
manager thread settles run on a callback thread.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from mlpool._api.config import PoolConfig
from mlpool._engine.admission import ModelBounds
from mlpool._engine.dispatch import Dispatcher
from mlpool._engine.jobmaker import JobMaker, forked_error
from mlpool._engine.jobs import PIPELINE_BUDGET, Job, JobState, running_loop, running_unit, shared_future
from mlpool._engine.lock import EngineLock
from mlpool._engine.manager_thread import ManagerThread
from mlpool._engine.outcomes import ManagerAlarm, Outcomes
from mlpool._engine.recovery import JobRecovery, last_alive
from mlpool._engine.regions import RegionPool, read_result
from mlpool._engine.registry import Registry, Settled
from mlpool._engine.replies import Replies
from mlpool._engine.scheduler import Scheduler
from mlpool._engine.state import PoolState, PoolStats, refusal
from mlpool._engine.streams import close_stream, holder, send_to_worker
from mlpool._processes.groups import build_groups
from mlpool._processes.readers import OUT_OF_PATIENCE, PipeReaders
from mlpool._processes.rollout import ReloadPlan
from mlpool._processes.stacks import collect_stacks
from mlpool._processes.supervisor import Supervisor
from mlpool._processes.workers import WorkerHandle, WorkerState
from mlpool._wire.protocol import (
    Item,
    check_model_name,
    encode,
)
from mlpool._wire.serialization import dumps_by_value
from mlpool.errors import PoolBrokenError, PoolFullError

logger = logging.getLogger(__name__)

# Workers whose stack-dump handler is in place and who are not being killed.
_DUMPABLE = frozenset({WorkerState.IDLE, WorkerState.RETIRING, WorkerState.STOPPING})
_NOT_SERVING = frozenset({WorkerState.STARTING, WorkerState.EXITED})  # loading, or gone


# Seconds shutdown() waits for the lock before leaving the request to the manager thread.
SHUTDOWN_LOCK_PATIENCE = 1.0


class ProcessEngine:
    """Owns the lock, the parts of the engine, and the manager thread."""

    def __init__(self, config: PoolConfig, loaders: dict[str, Callable[[], Any]]) -> None:
        self.config = config
        for name in loaders:
            check_model_name(name)
        self.models = frozenset(loaders)
        self._pid = os.getpid()  # the process this pool belongs to (see _check_process)
        self._regions = RegionPool(config.shared_memory_cache)  # shared memory kept for reuse
        self._jobs_maker = JobMaker(config, loaders, owner=self, pid=self._pid, regions=self._regions)
        # A new job (see JobMaker.make), refused in a process forked from the pool's own.
        self.make_job = self._jobs_maker.make
        # The parts, each the owner of its state (under the lock).
        self._alarm = ManagerAlarm()
        groups = build_groups(config, loaders)
        model_group = {model: group.name for group in groups for model in group.models}
        self._scheduler = Scheduler(model_group)
        self._registry: Registry[Job] = Registry(config.result_ttl)
        lock = threading.Lock()  # the engine's one lock (see _engine.lock)
        self._outcomes = Outcomes(self._registry, self._regions, self._alarm, model_group, lock)
        self._bounds = ModelBounds(  # each model's own max_queue_size
            config.model_settings, self._scheduler.queued_of, config.max_queue_size, self._accepting
        )
        self._locked = EngineLock(lock, self._outcomes, self._registry, self._alarm, self._has_space, self._bounds)
        self._lock = self._locked.mutex
        self._after_release = self._locked.after_release
        self._recovery = JobRecovery(self._scheduler, self._outcomes, self._registry, self._regions)
        self._readers = PipeReaders(self._on_loop_messages)
        self._supervisor = Supervisor(
            config, groups, scheduler=self._scheduler, recovery=self._recovery,
            readers=self._readers, alarm=self._alarm, locked=self.locked,
        )  # fmt: skip
        self._dispatcher = Dispatcher(
            config, self._scheduler, self._supervisor, self._readers, self._outcomes, self._registry, self._regions,
            self._alarm,
        )  # fmt: skip
        self._replies = Replies(self._scheduler, self._supervisor, self._readers, self._outcomes)
        self._manager = ManagerThread(
            self._locked, alarm=self._alarm, scheduler=self._scheduler, registry=self._registry,
            regions=self._regions, recovery=self._recovery, readers=self._readers, supervisor=self._supervisor,
            dispatcher=self._dispatcher, replies=self._replies,
        )  # fmt: skip
        self._thread = self._manager.thread
        self.started: Future[None] = self._supervisor.started  # result: ready; exception: start failed
        self.finished: Future[None] = self._manager.finished  # the manager thread is done, every worker reaped

    def locked(self) -> EngineLock:
        """Hold the engine's lock: ``with self.locked():``. Leaving releases
        the lock, then delivers the outcomes decided under it."""
        return self._locked

    # ------------------------------------------------------------------ callers

    def _check_process(self) -> None:
        """Refuse use from a process forked from the pool's own: the workers,
        their pipes and the manager thread belong to the parent."""
        if os.getpid() != self._pid:
            raise forked_error(self._pid)

    def before_blocking(self) -> None:
        """The calling thread is about to block: take back the worker pipes its
        own event loop reads, which that loop cannot read while it waits."""
        loop = running_loop()
        if loop is None or os.getpid() != self._pid:
            return
        try:
            with self._lock:
                for worker in self._supervisor.workers.values():
                    if worker.pipe.read_by is loop:
                        self._manager.take_back(worker, loop)
        finally:
            self._after_release()

    def start(self) -> None:
        self._thread.start()

    @property
    def state(self) -> PoolState:
        state = self._supervisor.state
        if self._manager.shutdown_asked is not None and state in (PoolState.STARTING, PoolState.RUNNING):
            return PoolState.CLOSING  # asked; the manager thread applies it at once
        return state

    def enqueue(self, job: Job, *, wait: bool, register: bool = False) -> Future | None:
        """Accept ``job``: None, or a future that resolves when the full queue
        has room (call again then). Without ``wait`` a full queue raises
        PoolFullError. ``register`` gives the job a string id (``job.key``)."""
        try:
            with self._lock:
                try:
                    if job.state is not JobState.NEW:  # cancelled while it waited for room
                        return None
                    self._check_accepting()
                    down = self._supervisor.unservable
                    if down and job.model in down:  # its group cannot serve (the others do)
                        raise PoolBrokenError(down[job.model])
                    if self._scheduler.queued >= self.config.max_queue_size:
                        if not wait:
                            raise PoolFullError(
                                f"the queue is full ({self._scheduler.queued} jobs waiting, max_queue_size="
                                f"{self.config.max_queue_size}); retry later or create the job with "
                                "block_until_scheduled=True"
                            )
                        return self._locked.wait_for_space()
                    if self._bounds.bounded and self._bounds.full(job.model):  # its model's own max_queue_size
                        if not wait:
                            raise self._bounds.refuse(job.model)
                        return self._bounds.wait(job.model)
                    if register:
                        self._registry.add(job)
                    self._scheduler.push(job)
                    if job.deadline is not None:
                        self._dispatcher.watch_deadline(job)
                    self._dispatcher.dispatch()
                    return None
                except BaseException:  # refused: its shared memory goes back now, not when collected
                    self._discard(job)
                    raise
        finally:
            self._after_release()

    def discard(self, job: Job) -> None:
        """``job`` will never be admitted (refused, or its caller stopped
        waiting for room): its shared memory goes back to the pool now, not
        when the garbage collector finds it (a job and its future refer to
        each other)."""
        with self._lock:
            self._discard(job)

    def _discard(self, job: Job) -> None:
        if job.state is JobState.NEW:  # else it was admitted, or cancelled (which released it)
            self._outcomes.release_memory(job)

    def cancel(self, job: Job, *, interrupt: bool = False) -> bool:
        """Cancel ``job``: True if it will never report an outcome.

        A queued job never runs. A running job's result is discarded; with
        ``interrupt`` its worker is killed now (and replaced).
        """
        self._check_process()
        try:
            with self._lock:
                if job.state is JobState.NEW:  # not admitted yet (waiting for room): it never will be
                    self._outcomes.cancel(job)
                    return True
                if job.state is JobState.QUEUED:
                    self._scheduler.withdraw(job)
                    self._outcomes.cancel(job)
                    return True
                if job.state is JobState.RUNNING:
                    worker = job.worker
                    assert worker is not None
                    unit = running_unit(worker.inflight)
                    # A batch runs on while any of its jobs still wants a result.
                    stop = interrupt and job in unit and last_alive(job, unit)
                    self._outcomes.cancel(job)
                    if stop:
                        worker.kill(f"job {job.id} was cancelled with interrupt=True")
                    elif job.stream is not None:
                        close_stream(worker, job)
                    return True
                return False
        finally:
            self._after_release()

    def lookup(self, key: str) -> Job | Settled | None:
        """The job of id ``key``, its outcome, or None. Without the lock: one
        dict read is atomic, and what it finds may change right after either way."""
        if os.getpid() != self._pid:
            raise forked_error(self._pid)
        return self._registry.lookup(key)

    def share(self, job: Job) -> Future:
        """A concurrent Future of ``job``'s outcome, for a caller in another
        thread or loop than the one a job made in a coroutine belongs to.

        Attached once, under the lock; settled with the same outcome as the
        job's asyncio handle (see ``_engine.jobs.settle``). If the job finished
        before, its asyncio handle is done, or this Future is settled when
        the outcome on its way reaches it.

        A loop that borrows the job's worker's pipe gives it back: this caller
        must not depend on that loop running (it may stop while we wait)."""
        try:
            with self._lock:
                worker, loop = job.worker, job.loop
                if worker is not None and loop is not None and worker.pipe.read_by is loop:
                    self._manager.take_back(worker, running_loop())
                    self._alarm.soon()  # the manager watches the pipe from now on
                return shared_future(job)
        finally:
            self._after_release()

    def reclaim_stopped_loans(self) -> None:
        """Take worker pipes back from event loops that stopped running, so the
        manager thread reads them: for a caller about to wait on a job made in
        a coroutine whose loop ended (a job id fetched after ``asyncio.run``
        returned), whose result only that loop would otherwise read."""
        try:
            with self._lock:
                if self._readers.reclaim_stopped(self._supervisor.workers.values(), running_loop()):
                    self._alarm.soon()
        finally:
            self._after_release()

    def forget(self, key: str, job: Job | Settled) -> bool:
        """Drop a fetched or cancelled job from the registry; False if already gone."""
        with self._lock:
            return self._registry.forget(key, job)

    def shutdown(self, *, cancel_pending: bool, timeout: float) -> None:
        """Stop taking jobs and start the shutdown sequence; returns at once,
        queued jobs already cancelled with ``cancel_pending``.

        A signal handler may call it, even one that interrupted this very
        thread inside the pool: if the lock does not come within a moment,
        the manager thread applies the request (new jobs are refused at once
        all the same). In a process forked from the pool's own it does
        nothing: the workers belong to the parent."""
        if os.getpid() != self._pid:
            return
        self._manager.ask_shutdown(cancel_pending, timeout)
        if not self._lock.acquire(timeout=SHUTDOWN_LOCK_PATIENCE):
            return
        try:
            self._manager.apply_shutdown()
        finally:
            self._lock.release()
            self._after_release()

    def join(self, timeout: float | None) -> bool:
        """Wait for the manager thread to finish; False on timeout. In a
        process forked from the pool's own, True at once: the thread is the
        parent's (after a fork made in C, which runs no at-fork hook, it
        still looks alive here, and the exit hook would wait for it)."""
        if os.getpid() != self._pid:
            return True
        if threading.current_thread() is self._thread:
            return False
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def worker_stacks(self, timeout: float) -> dict[int, str]:
        """Every serving worker's stacks by pid (see ``_processes.stacks``); waits at most ``timeout``."""
        with self._lock:
            workers = self._supervisor.workers.values()
            targets = [(w.pid, w.stacks) for w in workers if w.stacks is not None and w.state in _DUMPABLE]
        return collect_stacks(targets, timeout)

    def stats(self) -> PoolStats:
        with self._lock:
            supervisor = self._supervisor
            slots = {name: group.size for name, group in supervisor.groups.items()}
            workers = list(supervisor.workers.values())
            serving = [w for w in workers if w.state not in _NOT_SERVING]
            versions = {m: v for group in supervisor.groups.values() for m, v in group.versions(serving).items()}
            return self._outcomes.snapshot(
                self.state, workers, self._scheduler, slots, retried=self._recovery.retried,
                restarts=supervisor.counts["restarts"], recycled=supervisor.counts["recycled"],
                unfetched=self._registry.unfetched, versions=versions,
            )  # fmt: skip

    def reload(
        self, loaders: dict[str, Callable[[], Any]] | None, *, timeout: float | None, surge: int
    ) -> Future[None]:
        """Roll a new version of the models out (see ``_processes.rollout``):
        a future, done when every affected worker serves it. The loaders are
        pickled here, in the caller's thread (a SerializationError names the model)."""
        self._check_process()  # the workers and the manager thread are the parent's
        pickled = None
        if loaders is not None:
            pickled = {name: dumps_by_value(fn, f"the loader of model {name!r}") for name, fn in loaders.items()}
        plan = ReloadPlan(pickled, self.config.start_timeout if timeout is None else timeout, surge,
                          self.config.start_timeout)  # fmt: skip
        with self.locked():
            if (error := refusal(self.state, self._supervisor.broken_reason)) is not None:
                plan.future.set_exception(error)
            else:
                self._supervisor.reloads.ask(plan)
        return plan.future

    # ------------------------------------------------------------ streams

    def send_control(self, job: Job, msg: Any) -> None:
        """Send a stream's Credit to the worker running it, if one still does."""
        with self._lock:
            worker = holder(job)
            if worker is not None and job.state is JobState.RUNNING:
                send_to_worker(worker, encode(msg))

    def read_item(self, job: Job, item: Item) -> Any:
        """An item of a stream, decoded in the consumer's thread (no lock)."""
        what = f"an item of job {job.id} ({job.fn_name})"
        return read_result(item.data, item.spans, item.where, item.fd, None, self._regions, what)

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the callback thread (safe from ``__del__``: a queue put)."""
        self._locked.callbacks.run(None, [lambda _: fn()])  # type: ignore[arg-type]

    # ------------------------------------------------------ a caller's loan

    def is_quick(self, fn_id: int) -> bool:
        """Whether calls of ``fn_id`` took less than the pipelining budget (a
        millisecond) lately: short enough to wait for in the submitting thread."""
        return self._scheduler.estimate(fn_id) < PIPELINE_BUDGET

    def run_direct(self, job: Job, patience: float | None = None) -> bool:
        """Run ``job`` on an idle worker, reading its pipe in this thread.

        False, with nothing done, when no worker is free or jobs are queued
        (then enqueue it). True when the job's future is settled, or the
        manager took the pipe back (a crash, a timeout) and will settle it.
        Every loan ends: from the moment this thread holds the pipe, whatever
        exception arrives (Ctrl-C) hands it back to the manager, and so does
        a worker that has not answered within ``patience`` seconds.
        """
        if job.batch_policy is not None:
            return False
        if running_loop() is not None:
            self.before_blocking()
        token = object()
        lent: list[WorkerHandle] = []  # the worker whose pipe this thread reads, once it does
        try:
            try:
                with self._lock:
                    try:
                        self._check_accepting()
                    except BaseException:  # refused: its shared memory goes back now, not when collected
                        self._discard(job)
                        raise
                    sent = self._dispatcher.send_direct(job, token, lent)
            finally:
                self._after_release()
            if sent is not None:
                return sent
            worker = lent[0]
            while (read := self._readers.wait_lent(worker, token, patience)) is not None:
                messages, died = read
                try:
                    with self._lock:
                        self._replies.take(worker, messages)
                        if died or job not in worker.inflight or read is OUT_OF_PATIENCE:
                            self._end_loan(worker, token)
                            break
                finally:
                    self._after_release()
            return True
        finally:
            if lent:
                if lent[0].pipe.read_by is token:  # an interrupted wait: the manager reads from now on
                    try:
                        with self._lock:
                            self._end_loan(lent[0], token)
                    finally:
                        self._after_release()
                self._readers.leave(lent[0], token)

    def _end_loan(self, worker: WorkerHandle, token: object) -> None:
        """Under the lock: the manager reads ``worker``'s pipe again; what waits may go to it."""
        if self._readers.end(worker, token) and not self._plainly_running():
            self._alarm.soon()  # shutdown may wait for this worker
        if self._scheduler.queued:
            self._dispatcher.dispatch()

    def _on_loop_messages(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop, messages: list) -> None:
        """In ``loop``, which borrows ``worker``'s pipe: settle here, keep the worker busy."""
        try:
            with self._lock:
                self._replies.take(worker, messages)
                self._dispatcher.dispatch()
                if not worker.inflight and self.state is not PoolState.RUNNING:
                    self._manager.take_back(worker, loop)  # shutdown waits for this worker
        finally:
            self._after_release()

    def _has_space(self) -> bool:
        """Whether callers waiting for room should try again (room, or a refusal to hear)."""
        return not self._accepting() or self._scheduler.queued < self.config.max_queue_size

    def _accepting(self) -> bool:
        return self.state in (PoolState.RUNNING, PoolState.STARTING)

    def _plainly_running(self) -> bool:
        """RUNNING, and no shutdown asked (the common case, read without the ``state`` property)."""
        return self._supervisor.state is PoolState.RUNNING and self._manager.shutdown_asked is None

    def _check_accepting(self) -> None:
        """Raise the refusal of the pool's state, if it takes no jobs."""
        if self._plainly_running():
            return
        error = refusal(self.state, self._supervisor.broken_reason)
        if error is not None:
            raise error

    # ----------------------------------------------------------- manager loop
