"""The life of the pool and of its workers: starts, deaths, replacements, deadlines, shutdown.

::

    spawn_due ─► group.launcher.launch(index) ─► add ─► (Ready) on_ready ─► IDLE
    death ─► on_exit: settle exactly the jobs it held ─► replace after a back-off
    check(now): job deadlines, start_timeout, the shutdown ladder
    shutdown ─► CLOSING: drain, Stop, wait, SIGKILL ─► CLOSED

A death settles exactly the jobs the worker held: the one it was running
fails with WorkerCrashedError (or is retried), those behind it never started
and go back to the front of the queue. Deaths by our hand (a timeout, an
interrupt, a shutdown) are not failures; a failed start or a death while
idle is. Too many in a row, with no worker of the group left to serve, take
the group down (its models' jobs fail, restarts go on slowly) while other
groups serve; the pool breaks when none can.

The supervisor owns the pool's state, the workers, their groups (each with
its launcher: spawned processes, a fork template or Ray actors, chosen once;
see ``_processes.launchers``) and the deadlines of starts and of shutdown. It runs
under the engine's lock, except ``spawn_due`` and ``start_templates``, which
run on the manager thread outside it and take the lock to record what they
started. It acts on its sibling parts (the scheduler, the outcomes, the
loans), never on the engine.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, suppress

from mlpool._api.config import PoolConfig
from mlpool._engine.outcomes import WakeClock
from mlpool._engine.recovery import Fates
from mlpool._engine.scheduler import Scheduler
from mlpool._engine.state import PoolState
from mlpool._processes.forking import ForkLauncher
from mlpool._processes.groups import MAX_CONSECUTIVE_FAILURES, WorkerGroup, backoff
from mlpool._processes.launchers import Launched
from mlpool._processes.logs import worker_ready as log_worker_ready
from mlpool._processes.readers import Loans
from mlpool._processes.template import Template, TemplateState
from mlpool._processes.workers import WorkerHandle, WorkerState, describe_exit
from mlpool._wire.protocol import LoadFailed, Ready, Stop, encode
from mlpool._wire.transport import write_all
from mlpool.errors import ModelLoadError, PoolBrokenError, PoolClosedError

logger = logging.getLogger("mlpool._engine.engine")

# Seconds for the workers killed at the end of a timed-out shutdown to be reaped.
TERMINATE_GRACE = 1.0


class Supervisor:
    """The pool's state, its workers and their groups (under the engine's lock)."""

    def __init__(
        self,
        config: PoolConfig,
        groups: list[WorkerGroup],
        *,
        scheduler: Scheduler,
        fates: Fates,
        loans: Loans,
        clock: WakeClock,
        locked: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.config = config
        self.groups = {group.name: group for group in groups}
        self.model_group = {model: group.name for group in groups for model in group.models}
        self._scheduler = scheduler
        self._fates = fates
        self._loans = loans
        self._clock = clock
        self._locked = locked
        self.state = PoolState.STARTING
        self.broken_reason = ""
        self.workers: dict[int, WorkerHandle] = {}
        self.down: dict[str, str] = {}  # model -> why its group cannot serve (the others still do)
        self._down_groups: set[str] = set()
        self.counts = dict.fromkeys(("restarts", "recycled"), 0)
        self.started: Future[None] = Future()  # result: ready; exception: start failed
        self._start_deadline = time.monotonic() + config.start_timeout
        self._stop_deadline: float | None = None
        now = time.monotonic()
        for group in groups:
            group.spawn_at = [(now, index) for index in range(group.size)]

    # ------------------------------------------- manager thread, outside the lock

    def prepare(self) -> None:
        """Ready every launcher (Ray connects); a failure breaks the pool before any worker starts."""
        for group in self.groups.values():
            try:
                group.launcher.prepare()
            except Exception as exc:
                error = ModelLoadError(f"could not start {group.describe()}: {exc!r}")
                with self._locked():
                    self.break_pool(str(error), start_error=error)
                    self.state = self.state.to(PoolState.CLOSED)
                return

    def start_templates(self) -> None:
        """Start the fork templates (share_models) that are due."""
        for group in self.groups.values():
            if self.state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
                return
            try:
                template = group.launcher.start_if_due(time.monotonic())
            except Exception as exc:
                logger.exception("could not start the model template process")
                with self._locked():
                    self._template_failed(group, f"could not start the model template process: {exc!r}")
                continue
            if template is not None:
                self._loans.register(template.fd, ("template", (group, template)))
                self._loans.register(template.sentinel, ("template-exit", (group, template)))

    def spawn_due(self) -> None:
        """Start the workers that are due; a fork template's arrive later as events."""
        now = time.monotonic()
        for group in self.groups.values():
            while group.spawn_at and group.spawn_at[0][0] <= now:
                _, index = heapq.heappop(group.spawn_at)
                if self.state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
                    continue
                try:
                    worker = group.launcher.launch(index)
                except Exception as exc:  # out of processes, memory or file descriptors
                    logger.exception("could not start a worker process")
                    with self._locked():
                        self._start_failed(group, index, f"could not start a worker process: {exc!r}")
                    continue
                if worker is not None:
                    with self._locked():
                        self.add(worker)
                elif not group.launcher.ready:  # the request waits for a template
                    with self._locked():
                        idle = not self.can_serve(group)
                    if idle:  # nothing serves: the next template need not wait out its back-off
                        group.launcher.hurry()

    def death_seen(self, worker: WorkerHandle, now: float) -> tuple[WorkerHandle, int | None] | None:
        """``worker``'s death handle fired: reap it; the exit to settle, or
        None if its code comes later (from its template)."""
        self._loans.unregister(worker.sentinel)
        exitcode = worker.reap()
        if exitcode is None and self.groups[worker.group].launcher.await_exit_code(worker, now):
            return None
        return worker, exitcode

    def template_died(self, group: WorkerGroup, template: Template) -> int | None:
        """A template's death handle fired: stop watching it, reap it."""
        self._loans.unregister(template.fd, template.sentinel)
        return template.reap()

    # ------------------------------------------------------------ under the lock

    def add(self, worker: WorkerHandle) -> None:
        """A new worker: watch its death and its pipe."""
        self._loans.register(worker.sentinel, ("exit", worker))
        self._loans.watch_now(worker)
        self.workers[worker.id] = worker

    def can_serve(self, group: WorkerGroup) -> bool:
        """Whether some worker of ``group`` is ready to take jobs."""
        return any(w.state is WorkerState.IDLE and w.group == group.name for w in self.workers.values())

    def on_ready(self, worker: WorkerHandle, msg: Ready) -> None:
        if worker.state is not WorkerState.STARTING:
            return
        worker.state = worker.state.to(WorkerState.IDLE)
        self._loans.watch_now(worker)
        if worker.group in self._down_groups:  # it serves again
            self._down_groups.discard(worker.group)
            for model in self.groups[worker.group].models:
                self.down.pop(model, None)
        worker.pid = msg.pid
        log_worker_ready(worker, msg.load_seconds, replacement=self.state is not PoolState.STARTING)
        if self.state is PoolState.STARTING and self._all_ready():
            self.state = self.state.to(PoolState.RUNNING)
            self._set_started(None)

    def _all_ready(self) -> bool:
        """Whether every group has all its workers past loading (the pool has started)."""
        ready = dict.fromkeys(self.groups, 0)
        for worker in self.workers.values():
            if worker.state is not WorkerState.STARTING:
                ready[worker.group] += 1
        return all(ready[name] >= group.size for name, group in self.groups.items())

    def on_exit(self, worker: WorkerHandle, exitcode: int | None) -> None:
        """A worker's process is gone: settle the jobs it held, maybe replace it."""
        del self.workers[worker.id]
        group = self.groups[worker.group]
        how = group.launcher.describe(worker, exitcode)
        if worker.start_timed_out:
            how = f"did not load its models within start_timeout={self.config.start_timeout:g}s"
        if worker.fault is not None:
            how = f"was killed: {worker.fault}"
        if (failure := worker.load_failure) is not None:  # it exits (code 0) after saying so
            how = f"failed to load model {failure.model!r}: {failure.error}"
        was = worker.state
        worker.state = worker.state.to(WorkerState.EXITED)
        # A start that timed out, or a worker that broke the protocol, is a failure though we killed it.
        blamed = worker.start_timed_out or worker.fault is not None
        intended = (worker.kill_reason is not None and not blamed) or was is WorkerState.STOPPING
        quiet = failure is not None and self.state is PoolState.STARTING  # the pool's break logs it
        jobs = self._fates.worker_died(worker, how, exitcode, intended, self.state, logged=not quiet)
        if self.state is PoolState.STARTING:
            who = f"worker {worker.id} (pid {worker.pid})" if worker.pid else f"worker {worker.id}"
            self._fail_start(who, failure, how)
            return
        if was in (WorkerState.STOPPING, WorkerState.RETIRING) or self.state is PoolState.BROKEN:
            return  # a retiring worker's replacement is already on its way
        if self.state is PoolState.CLOSING and not self._scheduler.queued:
            return
        # Died holding no job and not by our hand: a failed start (a loader
        # raised) or a death while idle. Only these count toward giving up.
        delay = 0.0
        if not intended and not jobs:
            group.failures += 1
            if group.failures >= MAX_CONSECUTIVE_FAILURES and not self.can_serve(group):
                if self._give_up(group, self._failure_reason(group, worker, how)):
                    return
            delay = backoff(group.failures)
            logger.warning("worker %d %s (%d failures in a row); restarting in %.2fs",
                           worker.id, how, group.failures, delay)  # fmt: skip
        self.counts["restarts"] += 1
        heapq.heappush(group.spawn_at, (time.monotonic() + delay, worker.index))

    def answered(self, worker: WorkerHandle) -> None:
        """``worker`` answered a job: its group serves; recycle it if it is due."""
        self.groups[worker.group].failures = 0
        limit = self.groups[worker.group].max_jobs_per_worker
        if limit is not None and worker.jobs_done >= limit and worker.state is WorkerState.IDLE:
            self.retire(worker, f"it ran max_jobs_per_worker={limit} jobs")
        if worker.state is WorkerState.RETIRING and not worker.inflight:
            self._stop_worker(worker)

    def retire(self, worker: WorkerHandle, reason: str) -> None:
        """Replace ``worker`` gracefully: a replacement starts now; the worker
        takes no more jobs and is stopped once it has answered those it holds."""
        if worker.state is not WorkerState.IDLE:
            return
        logger.info("recycling worker %d (pid %d): %s", worker.id, worker.pid, reason)
        worker.state = worker.state.to(WorkerState.RETIRING)
        self.counts["recycled"] += 1
        if self.state is PoolState.RUNNING:
            heapq.heappush(self.groups[worker.group].spawn_at, (time.monotonic(), worker.index))
            self._clock.soon()
        if not worker.inflight:
            self._stop_worker(worker)

    def _stop_worker(self, worker: WorkerHandle) -> None:
        worker.state = worker.state.to(WorkerState.STOPPING)
        with suppress(OSError):
            write_all(worker.fd, encode(Stop()))

    def _failure_reason(self, group: WorkerGroup, worker: WorkerHandle, how: str) -> str:
        failure = worker.load_failure
        if failure is not None:
            return (f"a replacement worker failed to load model {failure.model!r} "
                    f"{group.failures} times in a row: {failure.error}\n{failure.traceback}")  # fmt: skip
        return f"{group.describe()} died {group.failures} times in a row without finishing a job; the last {how}"

    def _fail_start(self, who: str, failure: LoadFailed | None, how: str) -> None:
        """``who`` ("worker 3 (pid 123)", "the model template (pid 120)") died while the pool was
        starting: it cannot. A loader's error is logged once, its traceback only raised."""
        said: str | None = None
        if failure is None:
            error = ModelLoadError(f"{who} {how} while loading models")
        else:
            said = f"{who} failed to load model {failure.model!r}: {failure.error}"
            error = ModelLoadError(f"{said}\nWorker traceback:\n{failure.traceback}",
                                   model_name=failure.model, remote_traceback=failure.traceback)  # fmt: skip
        self.break_pool(str(error), start_error=error, said=said)

    def _start_failed(self, group: WorkerGroup, index: int, reason: str) -> None:
        """A worker could not be started: try again after a back-off, or give up if the group cannot serve."""
        group.failures += 1
        if self.state is PoolState.STARTING:
            self.break_pool(reason, start_error=ModelLoadError(reason))
        elif group.failures < MAX_CONSECUTIVE_FAILURES or self.can_serve(group) or not self._give_up(group, reason):
            heapq.heappush(group.spawn_at, (time.monotonic() + backoff(group.failures), index))

    def _give_up(self, group: WorkerGroup, reason: str) -> bool:
        """``group`` failed too often and cannot serve. With no other group
        serving, the pool breaks (True). Else only its models are down: their
        queued jobs fail, new ones are refused (``down``), and its restarts go
        on at the slowest back-off until a worker of it is ready again."""
        if not any(self.can_serve(other) for other in self.groups.values() if other is not group):
            self.break_pool(reason)
            return True
        if group.name not in self._down_groups:
            logger.error("%s cannot serve (the other models still do): %s", group.describe(), reason)
        self._down_groups.add(group.name)
        self.down.update(dict.fromkeys(group.models, f"{group.describe()} cannot serve: {reason}"))
        self._fates.fail_queued_of(group.models, PoolBrokenError(f"{group.describe()} cannot serve: {reason}"))
        return False

    def _set_started(self, error: BaseException | None) -> None:
        if not self.started.done():
            self.started.set_result(None) if error is None else self.started.set_exception(error)

    def break_pool(self, reason: str, start_error: BaseException | None = None, said: str | None = None) -> None:
        """Give up: fail every job, kill every worker, refuse new jobs. ``said``: the log's shorter reason."""
        if self.state in (PoolState.BROKEN, PoolState.CLOSED):
            return
        self.state = self.state.to(PoolState.BROKEN)
        self.broken_reason = reason
        logger.error("mlpool is broken: %s", said or reason)
        self._set_started(start_error or PoolBrokenError(reason))
        error = PoolBrokenError(f"the pool broke: {reason}")
        self._fates.fail_queued(error)
        self._fates.fail_running(list(self.workers.values()), error)
        for worker in self.workers.values():
            worker.kill("the pool is broken")
        for group in self.groups.values():
            group.spawn_at.clear()

    # ----------------------------------------------------------- deadlines

    def check(self, now: float) -> None:
        """Act on what is due: job deadlines, starts past start_timeout, the shutdown ladder."""
        self._fates.expire(now)
        self._check_start(now)
        self._advance_shutdown(now)

    def _check_start(self, now: float) -> None:
        limit = self.config.start_timeout
        if self.state is PoolState.STARTING:
            if now >= self._start_deadline:
                error = ModelLoadError(f"workers did not load their models within start_timeout={limit}s")
                self.break_pool(str(error), start_error=error)
            return
        # Replacements get start_timeout too: a loader that hangs (a stuck
        # mount, an actor Ray cannot place) must not leave the pool waiting.
        for worker in self.workers.values():
            if worker.state is WorkerState.STARTING and now - worker.started_at >= limit:
                worker.start_timed_out = True
                worker.kill(f"it did not load its models within start_timeout={limit:g}s")
        for group in self.groups.values():
            template = group.launcher.template
            if template is None:
                continue
            loading = template.state is TemplateState.LOADING
            if loading and not template.start_timed_out and now - template.started_at >= limit:
                template.start_timed_out = True
                template.kill()  # its exit counts as a failure (template_exited)
            elif group.launcher.hung(now):
                logger.warning("the model template (pid %d) answered no fork request within start_timeout=%gs; "
                               "killing it", template.pid, limit)  # fmt: skip
                template.kill()

    def shutdown(self, *, cancel_pending: bool, timeout: float) -> None:
        """Stop taking jobs; start the ladder (drain, Stop, wait, SIGKILL). Asked again, a shorter timeout wins."""
        if self.state in (PoolState.CLOSED, PoolState.BROKEN):
            return
        if self.state is not PoolState.CLOSING:
            self.state, self._stop_deadline = self.state.to(PoolState.CLOSING), time.monotonic() + timeout
        elif self._stop_deadline is not None:  # None: it timed out already
            self._stop_deadline = min(self._stop_deadline, time.monotonic() + timeout)
        if cancel_pending:
            self._fates.fail_queued(None)
        self._clock.soon()

    def _advance_shutdown(self, now: float) -> None:
        if self.state is not PoolState.CLOSING:
            return
        busy = self._scheduler.queued or any(w.inflight for w in self.workers.values())
        if not busy:
            for worker in self.workers.values():
                if worker.state in (WorkerState.IDLE, WorkerState.RETIRING):
                    self._stop_worker(worker)
                elif worker.state is WorkerState.STARTING:
                    worker.kill("the pool is shutting down")
            for group in self.groups.values():
                group.spawn_at.clear()
        if not self.workers and not any(group.spawn_at for group in self.groups.values()):
            self._fates.fail_queued(PoolClosedError("the pool shut down before the job could run"))
            self.state = self.state.to(PoolState.CLOSED)
            return
        if self._stop_deadline is None or now < self._stop_deadline:
            return
        # Past the deadline: whatever still runs is forced to stop. Force is
        # safe here: each worker has its own pipe, so a killed worker cannot
        # leave a shared queue or lock broken for the others. Workers ignore
        # SIGTERM (a signal to the whole process group must not end them under
        # a draining app): Stop was the polite request.
        self._fates.fail_queued(PoolClosedError("the pool shut down before the job could run"))
        for group in self.groups.values():
            group.spawn_at.clear()
        logger.warning("shutdown timed out; killing %d workers", len(self.workers))
        for worker in self.workers.values():
            worker.kill("shutdown timed out")
        self._stop_deadline = None

    def next_deadline(self) -> float | None:
        """The supervisor's next deadline: a start due, a start_timeout, the shutdown's."""
        candidates = []
        for group in self.groups.values():
            if group.spawn_at:
                candidates.append(group.spawn_at[0][0])
            due = group.launcher.next_deadline()
            if due is not None:
                candidates.append(due)
            template = group.launcher.template
            if template is not None and template.state is TemplateState.LOADING and not template.start_timed_out:
                candidates.append(template.started_at + self.config.start_timeout)
        if self.state is PoolState.STARTING:
            candidates.append(self._start_deadline)
        else:
            starts = [w.started_at for w in self.workers.values() if w.state is WorkerState.STARTING]
            if starts:
                candidates.append(min(starts) + self.config.start_timeout)
        if self._stop_deadline is not None and self.state is PoolState.CLOSING:
            candidates.append(self._stop_deadline)
        return min(candidates, default=None)

    def done(self) -> bool:
        """Whether the manager thread has nothing left to do."""
        return self.state in (PoolState.CLOSED, PoolState.BROKEN) and not self.workers

    # ------------------------------------------------------ the fork templates

    def template_events(self, group: WorkerGroup, events: list, death: tuple[int | None] | None = None) -> list:
        """What a group's template sent, and its death if ``death`` holds its
        exit code: add forked workers, count failures; the deaths to settle now."""
        launcher = group.launcher
        assert isinstance(launcher, ForkLauncher)  # only a fork launcher has a template
        launched = launcher.events(events)
        if death is not None:
            launched.exits += self._template_exited(group, death[0])
        elif launcher.ready and not launcher.announced:
            now = time.monotonic()
            for index in launcher.take_awaiting():
                heapq.heappush(group.spawn_at, (now, index))
        return self._launched(group, launched)

    def overdue_exits(self, now: float) -> list:
        """Deaths whose exit code their template did not report in time."""
        return [exit for group in self.groups.values() for exit in group.launcher.overdue_exits(now)]

    def _launched(self, group: WorkerGroup, launched: Launched) -> list:
        for worker in launched.started:
            self.add(worker)
        for index, reason in launched.failed:
            logger.warning("%s", reason)
            self._start_failed(group, index, reason)
        return launched.exits

    def _template_exited(self, group: WorkerGroup, exitcode: int | None) -> list:
        """The template died. Workers it forked keep serving; the deaths it
        never reported are settled now (returned)."""
        launcher = group.launcher
        template = launcher.template
        assert isinstance(launcher, ForkLauncher) and template is not None
        exits = launcher.died().exits
        how = describe_exit(exitcode)
        if template.start_timed_out:
            how = f"did not load the models within start_timeout={self.config.start_timeout:g}s"
        who = f"the model template (pid {template.pid})"
        if self.state is PoolState.STARTING and template.load_seconds is None:
            self._fail_start(who, template.load_failure, how)
            return exits
        failure = template.load_failure
        if failure is not None:
            reason = f"{who} failed to load model {failure.model!r}: {failure.error}\n{failure.traceback}"
        else:
            reason = f"{who} {how}"
        self._template_failed(group, reason)
        return exits

    def _template_failed(self, group: WorkerGroup, reason: str) -> None:
        launcher = group.launcher
        assert isinstance(launcher, ForkLauncher)
        if self.state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
            return
        launcher.failures += 1
        # Workers it forked keep serving: without a template only their
        # replacements wait. The pool breaks when none is left to serve.
        if launcher.failures >= MAX_CONSECUTIVE_FAILURES and not self.can_serve(group):
            why = f"the model template failed {launcher.failures} times in a row; the last time: {reason}"
            if self._give_up(group, why):
                return
        delay = backoff(launcher.failures)
        logger.warning("loading the models in a new template in %.2fs: %s", delay, reason)
        self.counts["restarts"] += 1
        launcher.schedule_restart(delay)

    def close(self) -> None:
        """The manager thread ends: no worker is left."""
        self._set_started(PoolClosedError("the pool was shut down before it finished starting"))
        for group in self.groups.values():
            group.launcher.close()
