"""The life of the pool and of its workers: starts, deaths, replacements, deadlines, shutdown.

::

    start_due ─► group.launcher.launch(index) ─► add ─► (Ready) on_ready ─► IDLE
    a launcher's news (a fork template's events, its death) ─► launcher_events
    death ─► on_exit: settle exactly the jobs it held ─► replace after a back-off
    check(now): job deadlines, start_timeout, the shutdown ladder
    shutdown ─► CLOSING: drain, Stop, wait, SIGKILL (_processes.shutdown) ─► CLOSED
    reload_models ─► reloads: a new generation, rolled one worker at a time (_processes.rollout)

A death settles exactly the jobs the worker held: the one it was running
fails with WorkerCrashedError (or is retried), those behind it never started
and go back to the front of the queue. Deaths by our hand (a timeout, an
interrupt, a shutdown) are not failures; a failed start or a death while
idle is. Too many in a row, with no worker of the group left to serve, take
the group down (its models' jobs fail, restarts go on slowly) while other
groups serve; the pool breaks when none can.

The supervisor owns the pool's state, the workers, their groups (each with
its launchers: spawned processes, a fork template or Ray actors, chosen once;
see ``_processes.launchers``) and the deadlines of starts. It never asks which
launcher a group has: what a launcher reports (workers started, starts
failed, deaths, a setback such as its template's death) comes as a
``Launched``. It runs under the engine's lock, except ``start_due``,
``death_seen`` and ``launcher_readable``, on the manager thread outside it
(``start_due`` takes the lock to record what it started). It acts on its
sibling parts (the scheduler, the outcomes, the loans), never on the engine.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, suppress

from mlpool._api.config import PoolConfig
from mlpool._engine.outcomes import ManagerAlarm
from mlpool._engine.recovery import JobRecovery
from mlpool._engine.scheduler import Scheduler
from mlpool._engine.state import PoolState
from mlpool._processes.groups import CURRENT, Generation, WorkerGroup, group_surplus
from mlpool._processes.launchers import MAX_CONSECUTIVE_FAILURES, Exit, Launched, Setback, Watched, backoff
from mlpool._processes.logs import worker_ready as log_worker_ready
from mlpool._processes.readers import PipeReaders
from mlpool._processes.reloads import Reloads
from mlpool._processes.shutdown import ShutdownLadder
from mlpool._processes.workers import WorkerHandle, WorkerState
from mlpool._wire.protocol import LoadFailed, Ready, Stop, encode
from mlpool._wire.transport import write_all
from mlpool.errors import ModelLoadError, PoolBrokenError, PoolClosedError

logger = logging.getLogger("mlpool._engine.engine")

# Seconds for the workers killed at the end of a timed-out shutdown to be reaped.
TERMINATE_GRACE = 1.0

# The pool's states in which it starts workers (and launchers their own processes).
_STARTS = frozenset({PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING})


class Supervisor:
    """The pool's state, its workers and their groups (under the engine's lock)."""

    def __init__(
        self,
        config: PoolConfig,
        groups: list[WorkerGroup],
        *,
        scheduler: Scheduler,
        recovery: JobRecovery,
        readers: PipeReaders,
        alarm: ManagerAlarm,
        locked: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.config = config
        self.groups = {group.name: group for group in groups}
        self.model_group = {model: group.name for group in groups for model in group.models}
        self._scheduler = scheduler
        self._recovery = recovery
        self._readers = readers
        self._alarm = alarm
        self._locked = locked
        self.state = PoolState.STARTING
        self.broken_reason = ""
        self.workers: dict[int, WorkerHandle] = {}
        self.unservable: dict[str, str] = {}  # model -> why its group cannot serve (the others still do)
        self._down_groups: set[str] = set()
        self.counts = dict.fromkeys(("restarts", "recycled"), 0)
        self.started: Future[None] = Future()  # result: ready; exception: start failed
        self._start_deadline = time.monotonic() + config.start_timeout
        self._ladder = ShutdownLadder(scheduler, recovery)  # drain, Stop, wait, SIGKILL
        self._news: list[tuple[WorkerGroup, int, Launched]] = []  # (group, generation, news) for launcher_events
        self.reloads = Reloads(self, scheduler.queued_of)  # reload_models, one at a time (see _processes.rollout)
        self._watching: dict[tuple[str, int], list[Watched]] = {}  # (group, generation) -> its processes watched
        # (group, generation, replaced): a generation gone, to close, or replaced, to withdraw (on the manager thread)
        self._ended: list[tuple[WorkerGroup, Generation, bool]] = []
        now = time.monotonic()
        for group in groups:
            group.spawn_at = [(now, index, CURRENT) for index in range(group.size)]

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

    def start_due(self) -> None:
        """Do what is due: each launcher's own (a fork template to start), then
        the workers; a fork template's workers arrive later, as its news."""
        now = time.monotonic()
        ended: list[tuple[WorkerGroup, Generation, bool]] = []
        if self._ended:
            with self._locked():
                ended, self._ended = self._ended, []
        for group, generation, replaced in ended:
            if replaced:  # what it was asked for and has not started: the current version's now
                with self._locked():
                    for index in generation.launcher.withdraw():
                        self.launch_soon(group, index, CURRENT)
                continue
            for watched in self._watching.pop((group.name, generation.number), []):
                self._readers.unregister(watched.fd, watched.sentinel)
            generation.launcher.close()
        for group in self.groups.values():
            for generation in list(group.generations.values()):
                may_start = self.state in _STARTS and group.may_start(generation)
                launched = generation.launcher.due(now, may_start=may_start)
                if launched is not None:
                    self._take(group, generation.number, launched)
        for group in self.groups.values():
            if not group.spawn_at or group.spawn_at[0][0] > now:
                continue
            with self._locked():
                serving = self.can_serve(group)
            while group.spawn_at and group.spawn_at[0][0] <= now:
                _, index, number = heapq.heappop(group.spawn_at)
                of = group.generations.get(number or group.current.number)
                if self.state not in _STARTS or of is None or not group.may_start(of):
                    continue  # a reload that failed took its generation back
                try:
                    worker = of.launcher.launch(index, serving=serving)
                except Exception as exc:  # out of processes, memory or file descriptors
                    logger.exception("could not start a worker process")
                    with self._locked():
                        self._start_failed(group, index, f"could not start a worker process: {exc!r}", number)
                    continue
                if worker is not None:
                    with self._locked():
                        self.add(worker)

    def death_seen(self, worker: WorkerHandle, now: float) -> Exit | None:
        """``worker``'s death handle fired: reap it; the exit to settle, or
        None if its launcher reports it later (a fork template, its parent)."""
        self._readers.unregister(worker.sentinel)
        return self.groups[worker.group].launcher_of(worker).reap(worker, now)

    def launcher_readable(self, subject: tuple[WorkerGroup, int, Watched, bool], now: float) -> None:
        """A process a launcher asked to be watched (a fork template) sent something, or exited (then it is
        watched no more): the launcher reads it; what it means is acted on in ``launcher_events``."""
        group, number, watched, exited = subject
        if exited:
            self._readers.unregister(watched.fd, watched.sentinel)
            self._watching[(group.name, number)].remove(watched)
        launched = (watched.on_exit if exited else watched.on_read)(now)
        if launched is not None:
            self._take(group, number, launched)

    def _take(self, group: WorkerGroup, number: int, launched: Launched) -> None:
        """Watch what the launcher of ``group``'s generation ``number`` started; keep the rest for launcher_events."""
        for watched in launched.watch:
            self._watching.setdefault((group.name, number), []).append(watched)
            self._readers.register(watched.fd, ("launcher", (group, number, watched, False)))
            self._readers.register(watched.sentinel, ("launcher", (group, number, watched, True)))
        if launched.for_the_lock():
            self._news.append((group, number, launched))

    # ------------------------------------------------------------ under the lock

    def add(self, worker: WorkerHandle) -> None:
        """A new worker: watch its death and its pipe."""
        self._readers.register(worker.sentinel, ("exit", worker))
        self._readers.watch_now(worker)
        self.workers[worker.id] = worker

    def can_serve(self, group: WorkerGroup) -> bool:
        """Whether some worker of ``group`` is ready to take jobs."""
        return any(w.state is WorkerState.IDLE and w.group == group.name for w in self.workers.values())

    def on_ready(self, worker: WorkerHandle, msg: Ready) -> None:
        if worker.state is not WorkerState.STARTING:
            return
        worker.state = worker.state.to(WorkerState.IDLE)
        self._readers.watch_now(worker)
        if worker.group in self._down_groups:  # it serves again
            self._down_groups.discard(worker.group)
            for model in self.groups[worker.group].models:
                self.unservable.pop(model, None)
        worker.pid = msg.pid
        log_worker_ready(worker, msg.load_seconds, replacement=self.state is not PoolState.STARTING)
        if self.state is PoolState.STARTING and self._all_ready():
            self.state = self.state.to(PoolState.RUNNING)
            self._set_started(None)
        self.reloads.on_ready(worker)
        for extra in group_surplus(self.groups[worker.group], self.workers.values(), self.reloads.surge(worker.group)):
            self.retire(extra, "its group has more workers than it keeps", replace=False)

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
        how = group.launcher_of(worker).describe(worker, exitcode)
        if worker.start_timed_out:
            how = f"did not load its models within {worker.load_limit()}"
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
        jobs = self._recovery.worker_died(worker, how, exitcode, intended, self.state, logged=not quiet)
        if self.state is PoolState.STARTING:
            who = f"worker {worker.id} (pid {worker.pid})" if worker.pid else f"worker {worker.id}"
            self._fail_start(who, failure, how)
            return
        # A reload's step fills its slot; a failed reload's worker had it refilled already.
        claimed = self.reloads.on_exit(worker, how) or worker.generation in group.abandoned
        self.end_generations(group)
        if claimed:
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
        heapq.heappush(group.spawn_at, (time.monotonic() + delay, worker.index, CURRENT))

    def answered(self, worker: WorkerHandle) -> None:
        """``worker`` answered a job: its group serves; recycle it if it is due."""
        self.groups[worker.group].failures = 0
        limit = self.groups[worker.group].max_jobs_per_worker
        if limit is not None and worker.jobs_done >= limit and worker.state is WorkerState.IDLE:
            self.retire(worker, f"it ran max_jobs_per_worker={limit} jobs")
        if worker.state is WorkerState.RETIRING and not worker.inflight:
            self._stop_worker(worker)

    def retire(self, worker: WorkerHandle, reason: str, *, replace: bool = True) -> None:
        """Let ``worker`` go gracefully: it takes no more jobs and is stopped
        once it has answered those it holds. ``replace`` (recycling): a
        replacement starts now, unless a reload's step replaces it already."""
        if worker.state is not WorkerState.IDLE:
            return
        worker.state = worker.state.to(WorkerState.RETIRING)
        if replace and not self.reloads.replacing(worker):
            logger.info("recycling worker %d (pid %d): %s", worker.id, worker.pid, reason)
            self.counts["recycled"] += 1
            if self.state is PoolState.RUNNING:
                self.launch_soon(self.groups[worker.group], worker.index, CURRENT)
        if not worker.inflight:
            self._stop_worker(worker)

    def launch_soon(self, group: WorkerGroup, index: int, generation: int, delay: float = 0.0) -> None:
        """Start a worker of ``group``'s ``generation`` at ``index``, ``delay`` seconds from now."""
        heapq.heappush(group.spawn_at, (time.monotonic() + delay, index, generation))
        self._alarm.soon()

    def end_generations(self, group: WorkerGroup) -> None:
        """Close (on the manager thread, see start_due) the launchers of ``group``'s
        generations that start nothing more and have no worker left."""
        ended = group.drop_ended(self.workers.values())
        if ended:
            self._ended += [(group, generation, False) for generation in ended]
            self._alarm.soon()

    def replaced(self, group: WorkerGroup, generation: Generation) -> None:
        """A reload made ``generation`` no longer current: its launcher's starts asked go to the new one."""
        self._ended.append((group, generation, True))
        self._alarm.soon()

    def _stop_worker(self, worker: WorkerHandle) -> None:
        worker.state = worker.state.to(WorkerState.STOPPING)
        with suppress(OSError):
            write_all(worker.pipe.fd, encode(Stop()))

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

    def _start_failed(self, group: WorkerGroup, index: int, reason: str, generation: int) -> None:
        """A worker could not be started: try again after a back-off, or give up if the group cannot serve."""
        if self.reloads.start_failed(group, generation, index, reason):
            return
        group.failures += 1
        if self.state is PoolState.STARTING:
            self.break_pool(reason, start_error=ModelLoadError(reason))
        elif group.failures < MAX_CONSECUTIVE_FAILURES or self.can_serve(group) or not self._give_up(group, reason):
            heapq.heappush(group.spawn_at, (time.monotonic() + backoff(group.failures), index, CURRENT))

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
        self.unservable.update(dict.fromkeys(group.models, f"{group.describe()} cannot serve: {reason}"))
        self._recovery.fail_queued_of(group.models, PoolBrokenError(f"{group.describe()} cannot serve: {reason}"))
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
        self.reloads.end(error)
        self._recovery.fail_queued(error)
        self._recovery.fail_running(list(self.workers.values()), error)
        for worker in self.workers.values():
            worker.kill("the pool is broken")
        for group in self.groups.values():
            group.spawn_at.clear()

    # ----------------------------------------------------------- deadlines

    def check(self, now: float) -> None:
        """Act on what is due: job deadlines, starts past start_timeout, the shutdown ladder, a paced reload."""
        self._recovery.expire(now)
        self._check_start(now)
        self._advance_shutdown(now)
        self.reloads.check()

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
            if worker.state is WorkerState.STARTING and now - worker.started_at >= worker.start_limit:
                worker.start_timed_out = True
                worker.kill(f"it did not load its models within {worker.load_limit()}")

    def shutdown(self, *, cancel_pending: bool, timeout: float) -> None:
        """Stop taking jobs; start the ladder (drain, Stop, wait, SIGKILL). Asked again, a shorter timeout wins."""
        if self.state in (PoolState.CLOSED, PoolState.BROKEN):
            return
        if self.state is not PoolState.CLOSING:
            self.state = self.state.to(PoolState.CLOSING)
            self._ladder.begin(timeout)
            self.reloads.end(PoolClosedError("the pool shut down during the reload"))
        else:
            self._ladder.shorten(timeout)
        if cancel_pending:
            self._recovery.fail_queued(None)
        self._alarm.soon()

    def _advance_shutdown(self, now: float) -> None:
        if self.state is PoolState.CLOSING and self._ladder.advance(now, self.workers, self.groups.values(),
                                                                    self._stop_worker):  # fmt: skip
            self.state = self.state.to(PoolState.CLOSED)

    def next_deadline(self) -> float | None:
        """The supervisor's next deadline: a start due, a launcher's, a start_timeout,
        the shutdown's; now if launchers reported something before the wait."""
        candidates = [time.monotonic()] if self._news else []
        if (paced := self.reloads.next_deadline()) is not None:
            candidates.append(paced)
        for group in self.groups.values():
            if group.spawn_at:
                candidates.append(group.spawn_at[0][0])
            for generation in group.generations.values():
                due = generation.launcher.next_deadline()
                if due is not None:
                    candidates.append(due)
        if self.state is PoolState.STARTING:
            candidates.append(self._start_deadline)
        else:
            starting = [w for w in self.workers.values() if w.state is WorkerState.STARTING]
            candidates += [w.started_at + w.start_limit for w in starting]
        if self._ladder.deadline is not None and self.state is PoolState.CLOSING:
            candidates.append(self._ladder.deadline)
        return min(candidates, default=None)

    def done(self) -> bool:
        """Whether the manager thread has nothing left to do."""
        return self.state in (PoolState.CLOSED, PoolState.BROKEN) and not self.workers

    # ------------------------------------------------------ the launchers' news

    def launcher_events(self) -> list[Exit]:
        """Act on what the launchers reported since the last turn (workers
        started, starts failed, setbacks, requests to launch now); the deaths
        to settle now."""
        if not self._news:
            return []
        exits: list[Exit] = []
        news, self._news = self._news, []
        for group, number, launched in news:
            if launched.setback is not None:
                self._setback(group, number, launched.setback)
            for worker in launched.started:
                self.add(worker)
            for index, reason in launched.failed:
                logger.warning("%s", reason)
                self._start_failed(group, index, reason, number)
            for index in launched.launch:  # a reload's coming version keeps its own; else the current one
                self.launch_soon(group, index, number if group.coming is group.generations.get(number) else CURRENT)
            exits += launched.exits
        return exits

    def _setback(self, group: WorkerGroup, number: int, setback: Setback) -> None:
        """What starts ``group``'s workers failed (its launcher scheduled the next try): a pool still
        starting cannot start if the models never loaded; a group that fails too often and cannot serve
        is given up (a reload's failure is the reload's). The workers it started keep serving."""
        if self.reloads.setback(group, number, setback) or not group.starts(number):
            return  # a reload's, or a replaced version's launcher: it starts nothing again
        if setback.unloaded is not None and self.state is PoolState.STARTING:
            who, how, failure = setback.unloaded
            self._fail_start(who, failure, how)
            return
        if self.state not in _STARTS:
            return
        if setback.failures >= MAX_CONSECUTIVE_FAILURES and not self.can_serve(group):
            why = f"{setback.what} failed {setback.failures} times in a row; the last time: {setback.reason}"
            if self._give_up(group, why):
                return
        logger.warning("%s in %.2fs: %s", setback.retry, setback.delay, setback.reason)
        self.counts["restarts"] += 1

    def close(self) -> None:
        """The manager thread ends: no worker is left."""
        self._set_started(PoolClosedError("the pool was shut down before it finished starting"))
        self.reloads.end(PoolClosedError("the pool shut down during the reload"))
        ended = [generation for _, generation, replaced in self._ended if not replaced]
        for generation in ended + [g for group in self.groups.values() for g in group.generations.values()]:
            generation.launcher.close()
