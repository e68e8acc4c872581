"""Jobs to workers (under the engine's lock); their answers come back through ``_engine.replies``.

::

    dispatch: Scheduler.plan ─► (worker, jobs) ─► build the Run frame first
              ─► record who holds what ─► send; a frame that cannot be built
              fails its jobs, a pipe that breaks requeues them
    send_direct: the same for one job on an idle worker whose pipe the caller reads

A job's message is built before anything is recorded: if it cannot be built
(out of descriptors or memory for shared memory), nothing changed but the
job's failure. Which worker's pipe an event loop reads, and when it is
taken back, is decided here with the loans (see ``_processes.readers``).

Callers dispatch themselves when a worker is free (one thread hop fewer on
the idle path); the manager dispatches whenever capacity frees up, which
only ever happens on its own thread (a result, a Ready, a death). So a job
left in the queue by a caller never needs a wake-up. Callers wake the
manager only when they move a deadline earlier or ask for shutdown.
"""

from __future__ import annotations

import logging
import time
from functools import partial

from mlpool._api.config import PoolConfig
from mlpool._engine.jobs import PIPELINE_BUDGET, Job, JobState, running_loop
from mlpool._engine.outcomes import ManagerAlarm, Outcomes
from mlpool._engine.regions import RegionPool
from mlpool._engine.registry import Registry
from mlpool._engine.scheduler import MAX_INFLIGHT, Scheduler
from mlpool._engine.state import PoolState
from mlpool._engine.streams import run_frame
from mlpool._processes.readers import LOAN_CHECK, PipeReaders
from mlpool._processes.supervisor import Supervisor
from mlpool._processes.workers import WorkerHandle, WorkerState
from mlpool._wire.protocol import (
    encode_run,
    encode_run_batch,
)
from mlpool._wire.serialization import FUNCTION_CACHE_SIZE
from mlpool._wire.transport import send_frames
from mlpool.errors import MLPoolError

logger = logging.getLogger("mlpool._engine.engine")

# A frame, its descriptors, and how many jobs it carries.
Frame = tuple[bytes, list[int], int]


class Dispatcher:
    """Hands queued jobs to workers."""

    def __init__(
        self,
        config: PoolConfig,
        scheduler: Scheduler,
        supervisor: Supervisor,
        readers: PipeReaders,
        outcomes: Outcomes,
        registry: Registry[Job],
        regions: RegionPool,
        alarm: ManagerAlarm,
    ) -> None:
        self._scheduler = scheduler
        self._supervisor = supervisor
        self._readers = readers
        self._outcomes = outcomes
        self._regions = regions
        self._alarm = alarm
        self._registry = registry
        self._model_group = supervisor.model_group
        # Each group's max_jobs_per_worker.
        self._limits = {name: group.max_jobs_per_worker for name, group in supervisor.groups.items()}
        # When no worker can take a job: reclaim the pipes of loops that stopped (a live view of the workers).
        self._unstick = partial(readers.reclaim_stopped, supervisor.workers.values())

    def watch_deadline(self, job: Job) -> None:
        """Expire ``job`` at its deadline, if it has one."""
        if self._registry.watch(job):
            self._alarm.note(job.deadline)  # type: ignore[arg-type]

    def dispatch(self) -> None:
        """Hand queued jobs to workers that can take them."""
        scheduler = self._scheduler
        scheduler.hold_until = None  # set again by plan() if a batch still waits for more items
        if not scheduler.queued:
            return
        limits = self._limits
        workers = [
            w
            for w in self._supervisor.workers.values()
            if w.state is WorkerState.IDLE
            # What pick_worker needs of a worker that holds jobs (else nothing is planned for it):
            and (not w.inflight or (len(w.inflight) < MAX_INFLIGHT and w.backlog < PIPELINE_BUDGET))
            and ((limit := limits[w.group]) is None or w.jobs_done + len(w.inflight) < limit)
        ]
        here = running_loop()
        if not workers:  # all busy (the common case under load): nothing to plan
            self._unstick(here)  # but a full worker lent to a stopped loop is read by the manager from now on
            return
        frames: dict[WorkerHandle, list[Frame]] = {}
        running = self._supervisor.state is PoolState.RUNNING
        plan = scheduler.plan(workers, here, time.monotonic(), self._others_busy, self._unstick)
        for worker, taken, estimate in plan:
            if len(taken) == 1:
                jobs = taken if self._start(taken[0]) else []
            else:
                jobs = [job for job in taken if self._start(job)]
            if not jobs:
                continue
            # The message first: if it cannot be built, nothing was recorded.
            try:
                frame, fds = self._run_frame(worker, jobs)
            except Exception as exc:
                self._refuse(jobs, exc)
                continue
            limit = limits[worker.group]
            if limit is not None and worker.jobs_done + len(worker.inflight) + len(jobs) >= limit:
                workers.remove(worker)  # its last jobs before it is recycled
            loop = jobs[0].loop if len(jobs) == 1 or all(job.loop is jobs[0].loop for job in jobs) else None
            pipe = worker.pipe
            if pipe.read_by is not None and (pipe.read_by is not loop or loop is None):
                self._readers.take_back(worker, here)  # an idle loan to another reader
            if pipe.read_by is None and loop is not None and loop is here and not worker.inflight and running:
                self._readers.lend_to_loop(worker, here)
                self._alarm.note(time.monotonic() + LOAN_CHECK)  # the manager checks that this loop runs
            for job in jobs:
                job.to(JobState.RUNNING)
                worker.assign(job, estimate)
            if not pipe.registered and pipe.read_by is None:
                self._readers.watch_now(worker)
            frames.setdefault(worker, []).append((frame, fds, len(jobs)))
        if scheduler.hold_until is not None:
            self._alarm.note(scheduler.hold_until)
        for worker, batch in frames.items():
            self._send(worker, batch)

    def send_direct(self, job: Job, token: object, lent: list[WorkerHandle]) -> bool | None:
        """Lend an idle worker's pipe to the calling thread (noted in ``lent``
        at once) and send it ``job``. None: wait for the result; False: not
        here (enqueue it); True: settled already (refused, or requeued)."""
        if self._scheduler.queued or job.state is not JobState.NEW:
            return False
        group = self._model_group[job.model]
        for worker in self._supervisor.workers.values():
            if worker.state is WorkerState.IDLE and not worker.inflight and worker.group == group:
                break
        else:
            return False
        try:
            frame, fds = self._run_frame(worker, [job])
        except Exception as exc:
            job.mark_running()
            self._refuse([job], exc)
            return True
        self._readers.lend_to_thread(worker, token)
        lent.append(worker)
        if job.deadline is not None:
            self.watch_deadline(job)
        job.mark_running()
        job.to(JobState.RUNNING)
        worker.assign(job, self._scheduler.estimate(job.fn_id))
        self._send(worker, [(frame, fds, 1)])
        if job.state is not JobState.RUNNING:  # the pipe failed: requeued or refused
            self._readers.end(worker, token)
            if self._supervisor.state is not PoolState.RUNNING:
                self._alarm.soon()
            self.dispatch()
            return True
        return None

    def _start(self, job: Job) -> bool:
        """Move a job taken from the queue to running; False (and cancelled) if its caller cancelled it."""
        if job.mark_running():
            return True
        self._outcomes.cancel(job)
        return False

    def _others_busy(self) -> bool:
        return any(w.inflight for w in self._supervisor.workers.values())

    def _run_frame(self, worker: WorkerHandle, jobs: list[Job]) -> tuple[bytes, list[int]]:
        """One Run (or RunBatch) frame for ``jobs``, all of one function, and
        the descriptors of their shared memory to send with it."""
        first = jobs[0]
        known = worker.known_functions
        fn = b"" if first.fn_id in known else first.fn_pickle
        # The buffers went into shared memory when the job was made (see
        # Payload); a retry sends the same region.
        if len(jobs) == 1:
            fds = [first.payload.place(self._regions)] if first.payload.shared else []
        else:
            fds = [job.payload.place(self._regions) for job in jobs if job.payload.shared]
        if first.stream is not None:
            frame = run_frame(first, fn)
            if first.trace is not None:
                first.trace.sent(worker.pid)
        elif first.batch_policy is None:
            p = first.payload
            offer = first.result_offer  # a forwarded job's comes from the API process that made it
            if offer is None and not first.forwarded and (size := self._scheduler.result_size(first.fn_id)) is not None:
                # Its results came in shared memory: offer room for the next.
                offer = first.result_offer = self._regions.take(size)
            if offer is not None:
                fds.append(offer.fd)
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
            self._outcomes.finish(job, False, error)

    def _send(self, worker: WorkerHandle, frames: list[Frame]) -> None:
        """Write frames to ``worker``."""
        try:
            if len(frames) == 1:
                send_frames(worker.pipe.sock, [frames[0][:2]])
            else:
                send_frames(worker.pipe.sock, [(frame, fds) for frame, fds, _ in frames])
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
                job = worker.unsend()
                if job.result_offer is not None:
                    self._regions.give(job.result_offer)
                    job.result_offer = None
                if dead:
                    self._scheduler.requeue(job)
                else:
                    self._refuse([job], exc)
