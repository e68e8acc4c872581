"""``reload_models``: a new version of the models, rolled out one worker at a time per group.

::

    ask(plan) ─► waits for the reload before it ─► begin: each affected group gets a
    coming Generation (its loaders, a renewed launcher) and starts its first worker
      (surge=1: beside an old worker; surge=0: once that worker has gone)
    every group's first new worker ready ─► commit: the coming generation is current
      (replacements load it), each model's version +1
    then per group, one step at a time: a new worker ready ─► the old one retires after
      its running jobs (surge=1), or the old one gone ─► the new one starts (surge=0)
    no old worker left in any group ─► the reload's future: done

A first new worker that fails (its loader raises, it crashes, it is not ready
within the reload's ``timeout``, a fork template that cannot load) aborts the
reload before anything changed: the coming generation's processes are let go,
a slot the reload emptied is filled again with the current version, and the
future gets a ModelLoadError. After the commit, a failed start is retried with
the usual back-off; ``MAX_CONSECUTIVE_FAILURES`` in a row end the reload with
an error and leave the workers not yet rolled on the old version.

A job never sees a model change under it: a worker loads one version for its
life, and an old worker is retired (takes no new job, stops after those it
holds) rather than killed; only one still loading is killed.

Loading costs CPU that the serving workers would use: on a host whose cores
are busy, jobs queue up while a new worker loads. So a step after the first
starts once the group's queue is back to where it was when the reload began
(plus one job per worker), or once it has waited as long as the last load
took, whichever comes first: jobs never wait for more than one load's backlog,
and a reload under load takes at most about twice as long.

Runs under the engine's lock (``_processes.reloads`` queues the reloads), on the supervisor's events: a worker ready
(``on_ready``), a worker gone (``on_exit``: True when the reload fills its slot,
so the supervisor does not), a start that failed (``start_failed``), a
launcher's setback (``setback``). The supervisor starts the processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from mlpool._engine.state import PoolState
from mlpool._processes import logs
from mlpool._processes.groups import CURRENT, Generation, WorkerGroup, pack_loaders
from mlpool._processes.launchers import MAX_CONSECUTIVE_FAILURES, Recipe, Setback, backoff
from mlpool._processes.workers import WorkerHandle, WorkerState
from mlpool.errors import ModelLoadError

if TYPE_CHECKING:
    from mlpool._wire.protocol import LoadFailed

logger = logging.getLogger("mlpool._engine.engine")

_LIVE = (WorkerState.STARTING, WorkerState.IDLE)  # a worker that serves or will: not on its way out
PACE_POLL = 0.05  # seconds between two looks at a group's queue while its next step waits for it


@dataclass(slots=True)
class ReloadPlan:
    """One ``reload_models`` call, as the engine gets it."""

    loaders: dict[str, bytes] | None  # model -> its new pickled loader; None: rerun every model's loader
    timeout: float  # seconds the first new worker (its template) has to load the models
    surge: int  # 1: a new worker starts beside the old one; 0: once the old one has gone
    start_timeout: float  # the pool's: the new version's starts get it once it is proven
    future: Future[None] = field(default_factory=Future)  # done when every affected worker is rolled
    asked_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.future.set_running_or_notify_cancel()  # nobody may cancel it: a roll ends by itself


class Starts(Protocol):
    """What a rollout asks of the supervisor (under the engine's lock)."""

    state: PoolState
    workers: dict[int, WorkerHandle]
    groups: dict[str, WorkerGroup]

    def launch_soon(self, group: WorkerGroup, index: int, generation: int, delay: float = 0.0) -> None: ...

    def retire(self, worker: WorkerHandle, reason: str, *, replace: bool = True) -> None: ...

    def end_generations(self, group: WorkerGroup) -> None: ...

    def replaced(self, group: WorkerGroup, generation: Generation) -> None: ...


class _Roll:
    """One group's part of a reload: the step it is at (an old worker and the new one for its slot)."""

    __slots__ = (
        "group", "new", "old", "index", "loading", "ready", "proven", "failures", "rolled", "done", "calm",
        "launched_at", "last_load", "hold_until",
    )  # fmt: skip

    def __init__(self, group: WorkerGroup, new: Generation) -> None:
        self.group = group
        self.new = new
        self.old: WorkerHandle | None = None  # the worker this step replaces (None: no step under way)
        self.index = -1  # its slot
        self.loading = False  # the new worker of the step is asked for or loading
        self.ready = False  # the new worker of the step is ready
        self.proven = False  # a worker of the new version was ready (the commit waits for every group's)
        self.failures = 0  # failed starts of the new version in a row
        self.rolled = 0
        self.done = False
        self.calm = 0  # the group's queue, as calm as it was when the reload began (see the module's docstring)
        self.launched_at = 0.0  # when the step's new worker was asked for
        self.last_load = 0.0  # seconds the last step's new worker took to be ready
        self.hold_until: float | None = None  # the next step waits for the queue until then


class Rollout:
    """One reload under way (see the module's docstring)."""

    def __init__(
        self, starts: Starts, plan: ReloadPlan, on_end: Callable[[], None], queued_of: Callable[[str], int]
    ) -> None:
        self._starts = starts
        self._queued_of = queued_of
        self.plan = plan
        self._on_end = on_end
        self.committed = False
        # After an abort: the slots it emptied, started again; the error waits until each is ready or failed.
        self._refilling: set[tuple[str, int]] = set()
        self._error: BaseException | None = None
        self.rolls: list[_Roll] = []
        self.models: list[str] = []  # the models it reloads

    # ------------------------------------------------------------ begin, end

    def begin(self) -> None:
        """Give each affected group its coming generation and start its first step."""
        named = self.plan.loaders
        try:
            for group in self._starts.groups.values():
                reloaded = [m for m in group.models if named is None or m in named]
                if reloaded:
                    self.models += reloaded
                    roll = _Roll(group, self._coming(group, reloaded))
                    roll.calm = self._backlog(group) + group.size
                    self.rolls.append(roll)
        except Exception as exc:  # a backend that cannot start the new version (Ray gone)
            self._fail(ModelLoadError(f"could not prepare the reload: {exc!r}"), abort=True)
            return
        logs.reload_started(self.models, self.plan.surge, self.plan.timeout)
        self._progress()

    def _coming(self, group: WorkerGroup, reloaded: list[str]) -> Generation:
        current = group.current
        loaders = dict(current.loaders)
        if self.plan.loaders is not None:
            loaders.update((m, self.plan.loaders[m]) for m in reloaded)
        number = max(group.generations) + 1
        old = current.launcher.recipe
        recipe = Recipe(group.name, number, pack_loaders(loaders), old.settings, self.plan.timeout, old.env_for,
                        "the reload's timeout")  # fmt: skip
        versions = {m: v + (m in reloaded) for m, v in current.versions.items()}
        coming = Generation(number, current.launcher.renewed(recipe), loaders, versions)
        group.generations[number] = group.coming = coming
        return coming

    def end(self, error: BaseException) -> None:
        """The pool is closing or broke: stop here; the pool's own shutdown ends the processes."""
        for roll in self.rolls:
            if roll.group.coming is roll.new:
                roll.group.coming = None
        self._finish(self._error or error)

    def _fail(self, error: ModelLoadError, *, abort: bool) -> None:
        """Stop rolling. ``abort`` (before the commit): let the coming generation go."""
        for roll in self.rolls:
            group = roll.group
            if abort:
                group.coming = None
                group.abandoned.add(roll.new.number)  # its starts due are dropped when due (start_due)
                for worker in list(self._starts.workers.values()):
                    if worker.group == group.name and worker.generation == roll.new.number:
                        self._let_go(worker, "the reload failed")
            roll.old = None
            # The slots it emptied serve the current version again; the error waits for them.
            for index in group.unfilled(self._starts.workers.values()):
                self._starts.launch_soon(group, index, CURRENT)
                self._refilling.add((group.name, index))
            self._starts.end_generations(group)
        self._error = error
        if not self._refilling:
            self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        seconds = time.monotonic() - self.plan.asked_at
        versions = {m: r.group.current.versions[m] for r in self.rolls for m in r.group.models if m in self.models}
        logs.reload_ended(self.models, seconds, versions, error)
        if error is None:
            self.plan.future.set_result(None)
        else:
            self.plan.future.set_exception(error)
        self._on_end()

    # ------------------------------------------------------------- the steps

    def _progress(self) -> None:
        """Start the next step of each group that has none; finish when every group is rolled."""
        for roll in self.rolls:
            if not roll.done and roll.old is None:
                self._step(roll)
            if self.plan.future.done():
                return
        if all(roll.done for roll in self.rolls):
            self._finish(None)

    def _step(self, roll: _Roll) -> None:
        group, number = roll.group, roll.new.number
        if self.committed or not roll.rolled:
            olds = [w for w in self._starts.workers.values() if w.group == group.name and w.generation != number]
            waiting = sorted((w for w in olds if w.state in _LIVE), key=lambda w: (len(w.inflight), w.index))
            if not waiting:
                if not olds:  # else some still finish their jobs: their exits bring the end
                    self._until_full(roll)
                return
        else:
            return  # its first new worker is ready: the others' decide the commit
        if roll.rolled and self._busy(roll):
            return  # check() looks again
        old = roll.old = waiting[0]
        roll.index, roll.loading, roll.ready = old.index, False, False
        if self.plan.surge:
            self._launch(roll)
        else:
            self._let_go(old, f"it makes room for version {_versions(roll.new)}")

    def _until_full(self, roll: _Roll) -> None:
        """No old worker is left: the group is rolled once it has as many new ones, ready or loading
        (replacements of those that died meanwhile), as it keeps, or failed if they keep failing."""
        group = roll.group
        if not self.committed:
            return  # its old workers all died, their replacements not started yet: one will be an old to roll
        live = [w for w in self._starts.workers.values() if w.group == group.name and w.state in _LIVE]
        if len(live) >= group.size:
            roll.done = True
            self._starts.end_generations(group)
        elif group.failures >= MAX_CONSECUTIVE_FAILURES:
            reason = f"{group.describe()} failed to start {group.failures} times in a row"
            self._fail(self._load_error(roll, reason, None), abort=False)

    def _busy(self, roll: _Roll) -> bool:
        """Whether the group's next step waits: its queue is longer than when
        the reload began, and it has not waited as long as the last load took."""
        if self._backlog(roll.group) <= roll.calm:
            roll.hold_until = None
            return False
        now = time.monotonic()
        if roll.hold_until is None:
            roll.hold_until = now + roll.last_load
        if now < roll.hold_until:
            return True
        roll.hold_until = None
        return False

    def _backlog(self, group: WorkerGroup) -> int:
        return sum(self._queued_of(model) for model in group.models)

    def check(self) -> None:
        """A step held back by a long queue may start now."""
        if any(roll.hold_until is not None and roll.old is None for roll in self.rolls):
            self._progress()

    def next_deadline(self) -> float | None:
        """When to look at the queue again, if a step waits for it."""
        holds = [roll.hold_until for roll in self.rolls if roll.hold_until is not None and roll.old is None]
        return min(min(holds), time.monotonic() + PACE_POLL) if holds else None

    def _launch(self, roll: _Roll, delay: float = 0.0) -> None:
        roll.launched_at = time.monotonic() + delay
        roll.loading = True
        self._starts.launch_soon(roll.group, roll.index, roll.new.number, delay)

    def _let_go(self, worker: WorkerHandle, reason: str) -> None:
        """Retire ``worker`` after the jobs it holds (kill it if it is still loading: it holds none)."""
        if worker.state is WorkerState.IDLE:
            logger.info("reload: retiring worker %d (pid %d): %s", worker.id, worker.pid, reason)
            self._starts.retire(worker, reason, replace=False)
        elif worker.state is WorkerState.STARTING:
            worker.kill(reason)

    def _stepped(self, roll: _Roll) -> None:
        """The step's slot serves the new version and its old worker is gone."""
        roll.rolled += 1
        roll.old, roll.loading, roll.ready = None, False, False
        roll.failures = 0

    # ------------------------------------------------- the supervisor's events

    def replacing(self, worker: WorkerHandle) -> bool:
        """Whether a step of this reload replaces ``worker`` (its slot is the reload's to fill)."""
        return any(roll.old is worker for roll in self.rolls)

    def surge(self, group: str) -> int:
        return self.plan.surge if any(r.old is not None and r.group.name == group for r in self.rolls) else 0

    def _refilled(self, group: str, index: int) -> None:
        """The start at a slot an abort emptied is ready, or failed: the error is raised after the last."""
        if (group, index) in self._refilling:
            self._refilling.discard((group, index))
            if not self._refilling and self._error is not None:
                self._finish(self._error)

    def on_ready(self, worker: WorkerHandle) -> None:
        if self._error is not None:
            self._refilled(worker.group, worker.index)
            return
        roll = self._roll_of(worker)
        if roll is None or roll.done:
            return
        if not roll.loading or worker.index != roll.index or worker.generation != roll.new.number:
            if roll.old is None:
                self._progress()  # a replacement is ready: the group may be full, or it is an old one to roll
            return
        roll.loading, roll.ready, roll.proven = False, True, True
        roll.last_load = time.monotonic() - roll.launched_at
        logs.worker_rolled(worker, roll.new.versions, roll.rolled + 1, roll.group.size, roll.group.describe())
        if not self.committed:
            if not all(r.proven for r in self.rolls):
                return
            self._commit()
        for ready in [r for r in self.rolls if r.ready and r.old is not None]:
            self._retire_stepped(ready)
        self._progress()

    def _commit(self) -> None:
        """Every group's first new worker is ready: the new versions are the groups' current ones."""
        self.committed = True
        for roll in self.rolls:
            old, roll.group.current, roll.group.coming = roll.group.current, roll.new, None
            self._starts.replaced(roll.group, old)
            launcher = roll.new.launcher  # the reload's timeout was for the first load: now the pool's
            launcher.recipe = replace(launcher.recipe, start_timeout=self.plan.start_timeout,
                                      timeout_name="start_timeout")  # fmt: skip

    def _retire_stepped(self, roll: _Roll) -> None:
        old = roll.old
        assert old is not None
        if old.state is WorkerState.EXITED:
            self._stepped(roll)  # it died meanwhile: the new worker took its slot
        elif self.plan.surge:
            self._let_go(old, f"replaced by version {_versions(roll.new)}")
        else:
            self._stepped(roll)  # surge=0: it went first

    def on_exit(self, worker: WorkerHandle, why: str) -> bool:
        """``worker`` is gone: True if this reload fills its slot (the supervisor must not)."""
        if self._error is not None:
            if worker.generation not in self._starts.groups[worker.group].abandoned:
                self._refilled(worker.group, worker.index)
            return False
        roll = self._roll_of(worker)
        if roll is None:
            return False
        if worker is roll.old:
            if roll.ready or not self.plan.surge:
                if roll.ready:
                    self._stepped(roll)
                else:
                    self._launch(roll)  # surge=0: its slot is free for the new version
            self._progress()
            return True
        if worker.generation == roll.new.number and worker.index == roll.index and roll.loading:
            self._start_failed(roll, why, worker.load_failure)
            return True
        if not self.committed and worker.generation == roll.new.number:
            self._start_failed(roll, f"worker {worker.id} {why}", worker.load_failure)  # the ready canary died
            return True
        if roll.old is None and not roll.done:
            self._progress()  # an old worker it waited for has gone, or a replacement failed
        return False

    def start_failed(self, group: WorkerGroup, generation: int, index: int, reason: str) -> bool:
        """A start the supervisor could not make (or a fork that failed): True if it was this reload's."""
        if self._error is not None:
            self._refilled(group.name, index)
            return False
        roll = self._roll_of_group(group)
        if roll is None or generation != roll.new.number or index != roll.index or not roll.loading:
            return False
        self._start_failed(roll, reason, None)
        return True

    def setback(self, group: WorkerGroup, generation: int, setback: Setback) -> bool:
        """A launcher of a coming generation failed (its template did not load): True if this reload handles it."""
        if self._error is not None:  # a refill waits on this template: the error need not wait for its next try
            for waiting in [slot for slot in self._refilling if slot[0] == group.name]:
                self._refilled(*waiting)
            return False
        roll = self._roll_of_group(group)
        if roll is None or generation != roll.new.number:
            return False
        failure = setback.unloaded[2] if setback.unloaded is not None else None
        if not self.committed:
            self._start_failed(roll, setback.reason, failure)
            return True
        roll.failures += 1
        if roll.failures >= MAX_CONSECUTIVE_FAILURES:
            self._fail(self._load_error(roll, setback.reason, failure), abort=False)
        return False  # the launcher retries (its back-off); the supervisor logs it

    def _start_failed(self, roll: _Roll, reason: str, failure: LoadFailed | None) -> None:
        if not self.committed:
            self._fail(self._load_error(roll, reason, failure), abort=True)
            return
        roll.failures += 1
        if roll.failures >= MAX_CONSECUTIVE_FAILURES:
            self._fail(self._load_error(roll, reason, failure), abort=False)
            return
        delay = backoff(roll.failures)
        logger.warning("reload: a new worker of %s failed (%s); trying again in %.2fs", roll.group.describe(),
                       reason, delay)  # fmt: skip
        self._launch(roll, delay)

    def _load_error(self, roll: _Roll, reason: str, failure: LoadFailed | None) -> ModelLoadError:
        where = ("on its first worker; the old version keeps serving" if not self.committed else
                 f"{roll.failures} times in a row after {roll.rolled} of {roll.group.size} workers of "
                 f"{roll.group.describe()} were rolled; the others keep the old version")  # fmt: skip
        head = f"the new version of {_names(list(roll.new.versions))} failed to load {where}: {reason}"
        if failure is None:
            return ModelLoadError(head)
        return ModelLoadError(f"{head}\nWorker traceback:\n{failure.traceback}", model_name=failure.model,
                              remote_traceback=failure.traceback)  # fmt: skip

    def _roll_of(self, worker: WorkerHandle) -> _Roll | None:
        return next((roll for roll in self.rolls if roll.group.name == worker.group), None)

    def _roll_of_group(self, group: WorkerGroup) -> _Roll | None:
        return next((roll for roll in self.rolls if roll.group is group), None)


def _names(models: list[str]) -> str:
    return ", ".join(repr(m) for m in models) if len(models) != 1 else f"model {models[0]!r}"


def _versions(generation: Generation) -> str:
    return ", ".join(f"{m!r} v{v}" for m, v in generation.versions.items())
