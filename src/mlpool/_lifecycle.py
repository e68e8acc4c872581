"""Worker deaths, restarts, recycling, deadlines and shutdown (part of the Manager).

A death settles exactly the jobs the worker held: the one it was running
fails with WorkerCrashedError (or is retried), those behind it never
started and go back to the front of the queue. Deaths by our hand (a
timeout, an interrupt, a shutdown) are not failures; a failed start or a
death while idle is, and too many in a row break the pool. Shutdown is a
ladder: drain, Stop, wait, SIGTERM, SIGKILL.
"""

from __future__ import annotations

import heapq
import logging
import os
import selectors
import time

from mlpool._errors import (
    JobTimeoutError,
    MLPoolError,
    ModelLoadError,
    PoolBrokenError,
    PoolClosedError,
    WorkerCrashedError,
)
from mlpool._forking import ForkLauncher, ForkOutcome
from mlpool._jobs import CANCELLED, Job, JobState, running_unit
from mlpool._logs import worker_exited as log_worker_exited
from mlpool._manager_parts import ManagerParts
from mlpool._protocol import LoadFailed, Stop, encode
from mlpool._stacks import with_crash_dump, with_worker_stack
from mlpool._state import PoolState
from mlpool._template import Template
from mlpool._transport import write_all
from mlpool._workers import WorkerHandle, WorkerState, describe_exit, ray_worker, spawn_worker

logger = logging.getLogger("mlpool._manager")

# Consecutive worker failures (a failed start, a death while idle) before the
# pool gives up, and the back-off between the restarts that lead there.
# The pool breaks only when, past that many, no worker can serve: while some
# serve, a failing restart (a loader's storage gone, out of descriptors for a
# while) only delays the replacement, and retries slow down to
# DEGRADED_BACKOFF_MAX.
MAX_CONSECUTIVE_FAILURES = 5
RESTART_BACKOFF_FIRST = 0.05
RESTART_BACKOFF_MAX = 2.0
DEGRADED_BACKOFF_MAX = 30.0
# Seconds for the workers killed at the end of a timed-out shutdown to be reaped.
TERMINATE_GRACE = 1.0


class WorkerLifecycle(ManagerParts):
    """The Manager's methods about the life and death of workers and jobs;
    they use its state and run under the rules written in ``_manager``."""

    def _on_exit(self, worker: WorkerHandle, exitcode: int | None) -> None:
        """A worker's process is gone: settle the jobs it held, maybe replace it."""
        del self._workers[worker.id]
        how = getattr(worker.process, "death", None) or describe_exit(exitcode)
        if worker.start_timed_out:
            how = f"did not load its models within start_timeout={self.config.start_timeout:g}s"
        if worker.fault is not None:
            how = f"was killed: {worker.fault}"
        was = worker.state
        worker.state = worker.state.to(WorkerState.EXITED)
        # A start that timed out, or a worker that broke the protocol, is a failure though we killed it.
        blamed = worker.start_timed_out or worker.fault is not None
        intended = (worker.kill_reason is not None and not blamed) or was is WorkerState.STOPPING
        jobs = list(worker.inflight)
        worker.inflight.clear()
        running = running_unit(jobs)  # the job (or batch) it was running...
        begun = worker.started.read()
        if running and begun >= 0 and begun != running[0].id:
            running = []  # ...unless it died before it took it: then none of them ran
        log_worker_exited(worker, how, running, intended=intended)
        for job in jobs:
            job.worker = None
            if job.result_offer is not None:  # it may have half-written it: just take it back
                self._regions.give(job.result_offer)
                job.result_offer = None
        for job in reversed(jobs[len(running) :]):  # never started: it runs jobs in order
            if job.state is JobState.RUNNING:
                self._scheduler.requeue(job)
        for job in reversed(running):
            if job.state is JobState.RUNNING:
                self._settle_crashed(worker, job, how, exitcode, intended)
        for job in jobs:
            if job.state is JobState.FINISHED:
                self._release_memory(job)
        # Died holding no job and not by our hand: a failed start (a loader
        # raised) or a death while idle. Only these count toward giving up.
        unexplained = not intended and not jobs
        if self._state is PoolState.STARTING:
            who = f"worker {worker.id} (pid {worker.pid})" if worker.pid else f"worker {worker.id}"
            self._fail_start(who, worker.load_failure, how)
            return
        if was in (WorkerState.STOPPING, WorkerState.RETIRING) or self._state is PoolState.BROKEN:
            return  # a retiring worker's replacement is already on its way
        if self._state is PoolState.CLOSING and not self._scheduler.queued:
            return
        if unexplained:
            self._failures += 1
            if self._failures >= MAX_CONSECUTIVE_FAILURES and not self._can_serve():
                self._break(self._failure_reason(worker, how))
                return
            delay = _backoff(self._failures)
            logger.warning(
                "worker %d %s (%d failures in a row); restarting in %.2fs", worker.id, how, self._failures, delay
            )
        else:
            delay = 0.0
        self._counts["restarts"] += 1
        heapq.heappush(self._spawn_at, time.monotonic() + delay)

    def _can_serve(self) -> bool:
        """Whether some worker is ready to take jobs (under the lock)."""
        return any(w.state is WorkerState.IDLE for w in self._workers.values())

    def _settle_crashed(
        self, worker: WorkerHandle, job: Job, how: str, exitcode: int | None, intended: bool
    ) -> None:
        if self._state in (PoolState.CLOSING, PoolState.BROKEN) and worker.kill_reason is not None:
            error = PoolClosedError(f"the pool shut down before job {job.id} ({job.fn_name}) finished")
            self._finish(job, False, error)
            return
        if intended:
            # We killed the worker for another job of its batch (a timeout,
            # an interrupt): this one is innocent; run it again.
            self._scheduler.requeue(job)
            return
        if job.retries_left > 0 and self._state is not PoolState.BROKEN:
            job.retries_left -= 1
            self._counts["retried"] += 1
            logger.info("job %d: worker %d %s; retrying (%d retries left)", job.id, worker.id, how, job.retries_left)
            self._scheduler.requeue(job)
            return
        crashed = WorkerCrashedError(
            f"worker {worker.id} (pid {worker.pid}) {how} while running job {job.id} "
            f"({job.fn_name} on model {job.model!r})",
            worker_id=worker.id,
            pid=worker.pid,
            exitcode=exitcode,
        )
        self._finish(job, False, with_crash_dump(crashed, worker))

    def _failure_reason(self, worker: WorkerHandle, how: str) -> str:
        failure = worker.load_failure
        if failure is not None:
            return (
                f"a replacement worker failed to load model {failure.model!r} "
                f"{self._failures} times in a row: {failure.error}\n{failure.traceback}"
            )
        return f"workers died {self._failures} times in a row without finishing a job; the last {how}"

    def _fail_start(self, who: str, failure: LoadFailed | None, how: str) -> None:
        """``who`` ("worker 3 (pid 123)", "the model template (pid 120)") died
        while the pool was starting: the pool cannot start."""
        if failure is not None:
            error: MLPoolError = ModelLoadError(
                f"{who} failed to load model {failure.model!r}: {failure.error}\n"
                f"Worker traceback:\n{failure.traceback}",
                model_name=failure.model,
                remote_traceback=failure.traceback,
            )
        else:
            error = ModelLoadError(f"{who} {how} while loading models")
        self._break(str(error), start_error=error)

    def _check_start(self, now: float) -> None:
        if self._state is PoolState.STARTING:
            if now >= self._start_deadline:
                error = ModelLoadError(
                    f"workers did not load their models within start_timeout={self.config.start_timeout}s"
                )
                self._break(str(error), start_error=error)
            return
        # Replacements get start_timeout too: a loader that hangs (a stuck
        # mount, an actor Ray cannot place) must not leave the pool waiting.
        limit = self.config.start_timeout
        for worker in self._workers.values():
            if worker.state is WorkerState.STARTING and now - worker.started_at >= limit:
                worker.start_timed_out = True
                worker.kill(f"it did not load its models within start_timeout={limit:g}s")
        forks = self._forks
        template = None if forks is None else forks.template
        if template is not None and template.ready is None and not template.start_timed_out \
                and now - template.started_at >= limit:
            template.start_timed_out = True
            template.kill()  # its exit counts as a failure (_on_template_exit)
        elif forks is not None and forks.hung(now):
            assert template is not None
            logger.warning("the model template (pid %d) answered no fork request within start_timeout=%gs; "
                           "killing it", template.pid, limit)
            template.kill()

    def _next_start_deadline(self) -> float | None:
        """When a starting worker (or template) passes start_timeout, if any does."""
        if self._state is PoolState.STARTING:
            return self._start_deadline
        starts = [w.started_at for w in self._workers.values() if w.state is WorkerState.STARTING]
        template = None if self._forks is None else self._forks.template
        if template is not None and template.ready is None and not template.start_timed_out:
            starts.append(template.started_at)
        return min(starts) + self.config.start_timeout if starts else None

    def _set_started(self, error: BaseException | None) -> None:
        if self.started.done():
            return
        if error is None:
            self.started.set_result(None)
        else:
            self.started.set_exception(error)

    def _break(self, reason: str, start_error: BaseException | None = None) -> None:
        """Give up: fail every job, kill every worker, refuse new jobs."""
        if self._state in (PoolState.BROKEN, PoolState.CLOSED):
            return
        self._state = self._state.to(PoolState.BROKEN)
        self._broken_reason = reason
        logger.error("mlpool is broken: %s", reason)
        self._set_started(start_error or PoolBrokenError(reason))
        error = PoolBrokenError(f"the pool broke: {reason}")
        self._fail_queued(error)
        for worker in self._workers.values():
            for job in worker.inflight:
                if job.state is JobState.RUNNING:
                    self._finish(job, False, error)
            worker.kill("the pool is broken")
        self._spawn_at.clear()

    def _fail_queued(self, error: BaseException) -> None:
        for job in self._scheduler.drain():
            if job.state is JobState.QUEUED:
                self._finish(job, False, error)

    def _cancel_queued(self) -> None:
        for job in self._scheduler.drain():
            if job.state is JobState.QUEUED:
                self._finish(job, False, CANCELLED)

    def _maybe_retire(self, worker: WorkerHandle) -> None:
        limit = self.config.max_jobs_per_worker
        if limit is not None and worker.jobs_done >= limit and worker.state is WorkerState.IDLE:
            self._retire(worker, f"it ran max_jobs_per_worker={limit} jobs")
        if worker.state is WorkerState.RETIRING and not worker.inflight:
            self._stop_worker(worker)

    def _retire(self, worker: WorkerHandle, reason: str) -> None:
        """Replace ``worker`` gracefully: a replacement starts now; the worker
        takes no more jobs and is stopped once it has answered those it holds."""
        if worker.state is not WorkerState.IDLE:
            return
        logger.info("recycling worker %d (pid %d): %s", worker.id, worker.pid, reason)
        worker.state = worker.state.to(WorkerState.RETIRING)
        self._counts["recycled"] += 1
        if self._state is PoolState.RUNNING:
            heapq.heappush(self._spawn_at, time.monotonic())
            self._need_wake = True
        if not worker.inflight:
            self._stop_worker(worker)

    def _stop_worker(self, worker: WorkerHandle) -> None:
        worker.state = worker.state.to(WorkerState.STOPPING)
        try:
            write_all(worker.fd, encode(Stop()))
        except OSError:
            pass

    def _expire_jobs(self, now: float) -> None:
        """Fail jobs whose deadline passed; kill a worker running one."""
        for job in self._registry.due(now):
            if job.state is JobState.QUEUED:
                self._scheduler.left(job)
                error = JobTimeoutError(f"job {job.id} ({job.fn_name}) timed out in the queue; it never ran")
                self._finish(job, False, error)
            elif job.state is JobState.RUNNING:
                worker = job.worker
                assert worker is not None
                unit = running_unit(worker.inflight)
                running = job in unit
                stop = running and _last_alive(job, unit)
                if stop:
                    message = f"job {job.id} ({job.fn_name}) timed out while running; worker {worker.id} was replaced"
                elif running:
                    message = (f"job {job.id} ({job.fn_name}) timed out while running in a batch; the others of its "
                               "batch run on")  # fmt: skip
                else:
                    message = f"job {job.id} ({job.fn_name}) timed out waiting in worker {worker.id}; it never ran"
                error = JobTimeoutError(message, while_running=running)  # with the line it hung on, if it ran
                self._finish(job, False, with_worker_stack(error, worker, job) if running else error)
                if stop:
                    worker.kill(f"job {job.id} passed its timeout")

    def _expire_results(self, now: float) -> None:
        """Forget results nobody fetched within result_ttl (oldest first, no scan)."""
        self._registry.expire(now)

    def _advance_shutdown(self, now: float) -> None:
        if self._state is not PoolState.CLOSING:
            return
        busy = self._scheduler.queued or any(w.inflight for w in self._workers.values())
        if not busy:
            for worker in self._workers.values():
                if worker.state in (WorkerState.IDLE, WorkerState.RETIRING):
                    self._stop_worker(worker)
                elif worker.state is WorkerState.STARTING:
                    worker.kill("the pool is shutting down")
            self._spawn_at.clear()
        if not self._workers and not self._spawn_at:
            self._fail_queued(PoolClosedError("the pool shut down before the job could run"))
            self._state = self._state.to(PoolState.CLOSED)
            return
        if self._stop_deadline is None or now < self._stop_deadline:
            return
        # Past the deadline: whatever still runs is forced to stop. Force is
        # safe here: each worker has its own pipe, so a killed worker cannot
        # leave a shared queue or lock broken for the others.
        self._fail_queued(PoolClosedError("the pool shut down before the job could run"))
        self._spawn_at.clear()
        # Workers ignore SIGTERM (a signal to the whole process group must
        # not end them under a draining app): Stop was the polite request.
        logger.warning("shutdown timed out; killing %d workers", len(self._workers))
        for worker in self._workers.values():
            worker.kill("shutdown timed out")
        self._stop_deadline = None

    def _spawn_due_workers(self) -> None:
        """Start the workers that are due (manager thread, outside the lock).
        With a template, a worker is a fork request: it arrives as an event."""
        now = time.monotonic()
        while self._spawn_at and self._spawn_at[0] <= now:
            heapq.heappop(self._spawn_at)
            if self._state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
                continue
            if self._forks is not None:
                self._request_fork(self._forks)
                continue
            try:
                if self._ray is not None:
                    options = {"num_cpus": self.config.threads_per_worker, **dict(self.config.ray_options)}
                    worker = ray_worker(self._loaders_pickle, self._worker_settings, options)
                else:
                    worker = spawn_worker(self._context, self._loaders_pickle, self._worker_settings)
            except Exception as exc:  # out of processes, memory or file descriptors
                logger.exception("could not start a worker process")
                self._report_start_failure(f"could not start a worker process: {exc!r}")
                continue
            self._lock.acquire()
            try:
                self._add_worker(worker)
            finally:
                self._release()

    def _request_fork(self, forks: ForkLauncher) -> None:
        """Ask the template for a worker (manager thread, outside the lock)."""
        try:
            requested = forks.request()
        except OSError as exc:  # out of descriptors or memory, for now
            logger.warning("could not ask the model template for a worker: %r", exc)
            self._report_start_failure(f"could not ask the model template for a worker: {exc!r}")
            return
        if not requested:
            with self._lock:
                idle = not self._can_serve()
            if idle:  # nothing serves: the next template need not wait out its back-off
                forks.hurry()

    def _report_start_failure(self, reason: str) -> None:
        """_start_failed, from outside the lock."""
        self._lock.acquire()
        try:
            self._start_failed(reason)
        finally:
            self._release()

    def _add_worker(self, worker: WorkerHandle) -> None:
        """A new worker process: watch its death and its pipe (under the lock)."""
        with self._selector_lock:
            self._selector.register(worker.sentinel, selectors.EVENT_READ, ("exit", worker))
        with worker.read_lock:
            self._watch(worker)
        self._workers[worker.id] = worker

    def _start_failed(self, reason: str) -> None:
        """A worker could not be started (under the lock): try again after a
        back-off, or give up if nothing can serve."""
        self._failures += 1
        if self._state is PoolState.STARTING or (
            self._failures >= MAX_CONSECUTIVE_FAILURES and not self._can_serve()
        ):
            self._break(reason, start_error=ModelLoadError(reason))
        else:
            heapq.heappush(self._spawn_at, time.monotonic() + _backoff(self._failures))

    # ---------------------------------------------------- the model template

    def _start_template_if_due(self) -> None:
        """Start the template (share_models) when none runs and one is due. Manager thread."""
        forks = self._forks
        if forks is None or self._state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
            return
        try:
            template = forks.start_if_due(time.monotonic())
        except Exception as exc:
            logger.exception("could not start the model template process")
            self._lock.acquire()
            try:
                self._on_template_failure(f"could not start the model template process: {exc!r}")
            finally:
                self._release()
            return
        if template is not None:
            with self._selector_lock:
                self._selector.register(template.fd, selectors.EVENT_READ, ("template", template))
                self._selector.register(template.sentinel, selectors.EVENT_READ, ("template-exit", template))

    def _on_fork_outcome(self, outcome: ForkOutcome) -> list[tuple[WorkerHandle, int | None]]:
        """Under the lock: add forked workers, count failed forks; the deaths to settle."""
        for worker in outcome.started:
            self._add_worker(worker)
        for reason in outcome.failed:
            logger.warning("%s", reason)
            self._start_failed(reason)
        return outcome.exits

    def _on_template_ready(self) -> None:
        """Under the lock, after the template said it is ready: fork what waits for it."""
        forks = self._forks
        assert forks is not None and forks.template is not None
        template = forks.template
        assert template.ready is not None
        logger.debug("model template (pid %d) ready in %.3fs", template.pid, template.ready.load_seconds)
        now = time.monotonic()
        for _ in range(forks.take_awaiting()):
            heapq.heappush(self._spawn_at, now)

    def _on_template_exit(self, template: Template, exitcode: int | None) -> list[tuple[WorkerHandle, int | None]]:
        """Under the lock: the template died. Workers it forked keep serving;
        the deaths it never reported are settled now (returned)."""
        assert self._forks is not None
        exits = self._forks.died().exits
        how = describe_exit(exitcode)
        if template.start_timed_out:
            how = f"did not load the models within start_timeout={self.config.start_timeout:g}s"
        who = f"the model template (pid {template.pid})"
        if self._state is PoolState.STARTING and template.ready is None:
            self._fail_start(who, template.load_failure, how)
            return exits
        if template.load_failure is not None:
            failure = template.load_failure
            reason = f"{who} failed to load model {failure.model!r}: {failure.error}\n{failure.traceback}"
        else:
            reason = f"{who} {how}"
        self._on_template_failure(reason)
        return exits

    def _on_template_failure(self, reason: str) -> None:
        forks = self._forks
        if forks is None or self._state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
            return
        forks.failures += 1
        # Workers it forked keep serving: without a template only their
        # replacements wait. The pool breaks when none is left to serve.
        if forks.failures >= MAX_CONSECUTIVE_FAILURES and not self._can_serve():
            self._break(f"the model template failed {forks.failures} times in a row; the last time: {reason}")
            return
        delay = _backoff(forks.failures)
        logger.warning("loading the models in a new template in %.2fs: %s", delay, reason)
        self._counts["restarts"] += 1
        forks.schedule_restart(delay)

    def _close_resources(self) -> None:
        self._callbacks.stop()
        self._set_started(PoolClosedError("the pool was shut down before it finished starting"))
        if self._forks is not None:
            self._forks.close()
        if self._ray is not None:
            self._ray.close()
        self._regions.close()
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
        if not self.finished.done():
            self.finished.set_result(None)


def _last_alive(job: Job, unit: list[Job]) -> bool:
    """Whether ``job`` is the last live one of the batch (or single job) its
    worker runs: only then may its timeout or interrupt kill the worker."""
    return all(other is job or other.state is not JobState.RUNNING for other in unit)


def _backoff(failures: int) -> float:
    """Seconds before the next try after ``failures`` failures in a row."""
    ceiling = RESTART_BACKOFF_MAX if failures < MAX_CONSECUTIVE_FAILURES else DEGRADED_BACKOFF_MAX
    return min(ceiling, RESTART_BACKOFF_FIRST * 2 ** min(failures - 1, 30))
