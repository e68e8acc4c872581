"""What a worker's death, a passed deadline or the pool's end does to jobs.

The rules every path follows (under the engine's lock):
- a dead worker's jobs: the one it was running (or its batch) fails with
  WorkerCrashedError, is retried under ``max_retries``, or runs again if we
  killed the worker for another job of its batch; those behind it never
  started and go back to the front of the queue, in order;
- a job past its deadline: in the queue, it never runs; running, its worker
  is killed once no other job of its batch still wants a result;
- queued jobs at a shutdown or a break: they fail, or are cancelled.
Its counts (``retried``) feed ``stats()``.
"""

from __future__ import annotations

import logging

from mlpool._engine.jobs import Job, JobState, running_unit
from mlpool._engine.outcomes import Outcomes
from mlpool._engine.regions import RegionPool
from mlpool._engine.registry import Registry
from mlpool._engine.scheduler import Scheduler
from mlpool._engine.state import PoolState
from mlpool._engine.streams import may_retry
from mlpool._processes.logs import worker_exited as log_worker_exited
from mlpool._processes.stacks import with_crash_dump, with_worker_stack
from mlpool._processes.workers import WorkerHandle
from mlpool.errors import JobTimeoutError, PoolClosedError, WorkerCrashedError

logger = logging.getLogger("mlpool._engine.engine")


class JobRecovery:
    """Settles the jobs of dead workers, of passed deadlines, of a pool that ends."""

    def __init__(self, scheduler: Scheduler, outcomes: Outcomes, registry: Registry[Job], regions: RegionPool) -> None:
        self._scheduler = scheduler
        self._outcomes = outcomes
        self._registry = registry
        self._regions = regions
        self.retried = 0
        self._late: list[Job] = []  # running jobs past their deadline, until their stacks are taken

    def worker_died(
        self, worker: WorkerHandle, how: str, exitcode: int | None, intended: bool, state: PoolState,
        *, logged: bool = True,
    ) -> list[Job]:  # fmt: skip
        """Settle the jobs ``worker`` held when it died; returns them.
        ``intended``: we killed it (a timeout, an interrupt, a shutdown).
        ``logged=False``: the caller logs the death its own way."""
        jobs = worker.release_all()
        running = running_unit(jobs)  # the job (or batch) it was running...
        begun = worker.started.read()
        if running and begun >= 0 and begun != running[0].id:
            running = []  # ...unless it died before it took it: then none of them ran
        if logged:
            log_worker_exited(worker, how, running, intended=intended)
        for job in jobs:
            if job.result_offer is not None:  # it may have half-written it: just take it back
                self._regions.give(job.result_offer)
                job.result_offer = None
        for job in reversed(jobs[len(running) :]):  # never started: it runs jobs in order
            if job.state is JobState.RUNNING:
                self._scheduler.requeue(job)
        for job in reversed(running):
            if job.state is JobState.RUNNING:
                self._crashed(worker, job, how, exitcode, intended, state)
        for job in jobs:
            if job.state is JobState.FINISHED:
                self._outcomes.release_memory(job)
        return jobs

    def _crashed(
        self, worker: WorkerHandle, job: Job, how: str, exitcode: int | None, intended: bool, state: PoolState
    ) -> None:
        if state in (PoolState.CLOSING, PoolState.BROKEN) and worker.kill_reason is not None:
            closed = PoolClosedError(f"the pool shut down before job {job.id} ({job.fn_name}) finished")
            self._outcomes.finish(job, False, closed)
        elif intended:
            # We killed the worker for another job of its batch (a timeout,
            # an interrupt): this one is innocent; run it again.
            self._scheduler.requeue(job)
        elif job.retries_left > 0 and state is not PoolState.BROKEN and may_retry(job):
            job.retries_left -= 1
            self.retried += 1
            logger.info("job %d: worker %d %s; retrying (%d retries left)", job.id, worker.id, how, job.retries_left)
            self._scheduler.requeue(job)
        else:
            error = WorkerCrashedError(
                f"worker {worker.id} (pid {worker.pid}) {how} while running job {job.id} "
                f"({job.fn_name} on model {job.model!r})",
                worker_id=worker.id, pid=worker.pid, exitcode=exitcode,
            )  # fmt: skip
            self._outcomes.finish(job, False, with_crash_dump(error, worker))

    def expire(self, now: float) -> None:
        """Fail jobs whose deadline passed. A job its worker is running is only
        noted (``take_late``): its worker's stack is taken outside the lock,
        then ``time_out`` fails it and kills the worker."""
        for job in self._registry.due(now):
            if job.state is JobState.QUEUED:
                self._scheduler.withdraw(job)
                error = JobTimeoutError(f"job {job.id} ({job.fn_name}) timed out in the queue; it never ran")
                self._outcomes.finish(job, False, error)
            elif job.state is JobState.RUNNING:
                worker = job.worker
                assert worker is not None
                if job in running_unit(worker.inflight):
                    self._late.append(job)
                    continue
                message = f"job {job.id} ({job.fn_name}) timed out waiting in worker {worker.id}; it never ran"
                self._outcomes.finish(job, False, JobTimeoutError(message, while_running=False))

    def take_late(self) -> list[tuple[Job, WorkerHandle]]:
        """The running jobs past their deadline, with their workers (each once)."""
        late, self._late = self._late, []
        return [(job, job.worker) for job in late if job.state is JobState.RUNNING and job.worker is not None]

    def time_out(self, late: list[tuple[Job, WorkerHandle]], stacks: dict[int, str]) -> None:
        """Fail the late jobs still running, each error with its worker's stack
        (``stacks``, by pid, taken just before), and kill a worker once no job
        of its running batch is alive."""
        for job, worker in late:
            if job.state is not JobState.RUNNING or job.worker is not worker:
                continue  # it finished meanwhile
            unit = running_unit(worker.inflight)
            stop = last_alive(job, unit)
            if stop:
                message = f"job {job.id} ({job.fn_name}) timed out while running; worker {worker.id} was replaced"
            else:
                message = (f"job {job.id} ({job.fn_name}) timed out while running in a batch; the others of its "
                           "batch run on")  # fmt: skip
            error = with_worker_stack(JobTimeoutError(message, while_running=True), worker, job, stacks.get(worker.pid))
            self._outcomes.finish(job, False, error)
            if stop:
                worker.kill(f"job {job.id} passed its timeout")

    def fail_queued(self, error: BaseException | None) -> None:
        """Every queued job fails with ``error`` (None: is cancelled)."""
        for job in self._scheduler.drain():
            if job.state is JobState.QUEUED:
                if error is None:
                    self._outcomes.cancel(job)
                else:
                    self._outcomes.finish(job, False, error)

    def fail_queued_of(self, models: tuple[str, ...], error: BaseException) -> None:
        """The queued jobs of ``models`` fail with ``error``; the others keep their turn."""
        keep = []
        for job in self._scheduler.drain():
            if job.state is JobState.QUEUED:
                if job.model in models:
                    self._outcomes.finish(job, False, error)
                else:
                    keep.append(job)
        for job in keep:
            self._scheduler.push(job)

    def fail_running(self, workers: list[WorkerHandle], error: BaseException) -> None:
        """Every job the workers run fails with ``error`` (the pool broke)."""
        for worker in workers:
            for job in worker.inflight:
                if job.state is JobState.RUNNING:
                    self._outcomes.finish(job, False, error)


def last_alive(job: Job, unit: list[Job]) -> bool:
    """Whether ``job`` is the last live one of the batch (or single job) its
    worker runs: only then may its timeout or interrupt kill the worker."""
    return all(other is job or other.state is not JobState.RUNNING for other in unit)
