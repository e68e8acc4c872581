"""How a worker group gets its workers: one launcher per backend, chosen once.

::

    Supervisor ── launch(index) ──► SpawnLauncher   a spawned process (default)
               ◄── a WorkerHandle   RayLauncher     a Ray actor behind a bridge
               ◄── or None: later   ForkLauncher    a fork of the group's model template
                   in a Launched                    (share_models, ``_processes.forking``)
               ── due(now), next_deadline() ──► what the launcher has to do at a time
               ── reap(worker, now) ──► the exit to settle, or None: reported later
               ◄── Launched: workers started, starts failed, exits, processes of its
                   own to watch, a setback (its template died)

Every launcher answers the :class:`Launcher` protocol, and the supervisor never
asks which kind it has. Spawned processes and Ray actors are ready to watch
when ``launch`` returns and have nothing due; a fork launcher keeps a process
of its own (the template) with its restarts, back-off and timeouts, and its
workers arrive later, in a :class:`Launched` from the template's channel.

``index`` is the worker's place in its group (0 .. workers-1); a replacement
gets the index of the worker it replaces, so ``worker_env(index)`` pins it
to the same device.

A launcher starts workers from one :class:`Recipe` (which loaders, which
settings, how long a load may take). A reload of the models (see
``_processes.rollout``) asks it for a ``renewed`` launcher of the same kind
with a new recipe, which starts the new version's workers while this one's
keep serving.

The restart policy is here too, shared by the supervisor (a group's workers)
and the fork launcher (its templates): ``backoff`` and the failures in a row
after which a group that cannot serve is given up.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlpool._processes.workers import WorkerHandle, describe_exit, spawn_worker
from mlpool._wire.protocol import LoadFailed
from mlpool._worker.main import WorkerSettings

# Consecutive failures of a group's workers (a failed start, a death while
# idle) or of its template before the pool gives up, and the back-off between
# the restarts that lead there. Past that many, a group with no worker that can
# serve goes down (or the pool breaks, see Supervisor._give_up); while some
# serve, a failing restart only delays the replacement, and retries slow down
# to DEGRADED_BACKOFF_MAX.
MAX_CONSECUTIVE_FAILURES = 5
RESTART_BACKOFF_FIRST = 0.05
RESTART_BACKOFF_MAX = 2.0
DEGRADED_BACKOFF_MAX = 30.0

# The environment a group's worker at an index gets (worker_env, resolved).
EnvFor = Callable[[int], "dict[str, str] | None"]
# A death to settle: the worker and its exit code (None: unknown).
Exit = tuple[WorkerHandle, int | None]


def no_env(index: int) -> dict[str, str] | None:
    return None


def backoff(failures: int) -> float:
    """Seconds before the next try after ``failures`` failures in a row."""
    ceiling = RESTART_BACKOFF_MAX if failures < MAX_CONSECUTIVE_FAILURES else DEGRADED_BACKOFF_MAX
    return min(ceiling, RESTART_BACKOFF_FIRST * 2 ** min(failures - 1, 30))


@dataclass(frozen=True, slots=True)
class Setback:
    """What a launcher starts its workers with failed (a fork template died or
    could not start): the workers it started serve on, their replacements wait
    for its next try, which it scheduled ``delay`` seconds from now."""

    reason: str  # what happened, in words
    failures: int  # setbacks in a row
    delay: float  # seconds until the next try
    what: str  # what failed ("the model template")
    retry: str  # what the next try does ("loading the models in a new template")
    # (who, how, what a loader raised) if it failed before the models were ever
    # loaded: then a pool still starting cannot start.
    unloaded: tuple[str, str, LoadFailed | None] | None = None


@dataclass(frozen=True, slots=True)
class Watched:
    """A process of a launcher's own (a fork template) for the supervisor to
    watch: ``fd`` readable calls ``on_read(now)``; ``sentinel`` readable (it
    exited) unwatches both, then calls ``on_exit(now)``. Each returns what it
    means for the supervisor. Both run on the manager thread, outside the lock."""

    fd: int
    sentinel: int
    on_read: Callable[[float], Launched | None]
    on_exit: Callable[[float], Launched | None]


@dataclass(slots=True)
class Launched:
    """What a launcher has for the supervisor, from ``due`` or a process it watches."""

    started: list[WorkerHandle] = field(default_factory=list)  # to add to the group
    failed: list[tuple[int, str]] = field(default_factory=list)  # failed starts (index, why): each a failure
    exits: list[Exit] = field(default_factory=list)  # deaths to settle now
    launch: list[int] = field(default_factory=list)  # indices to launch now (requests that waited)
    watch: list[Watched] = field(default_factory=list)  # acted on at once, outside the lock
    setback: Setback | None = None

    def for_the_lock(self) -> bool:
        """Whether it holds anything the supervisor acts on under the engine's lock (all but ``watch``)."""
        return bool(self.started or self.failed or self.exits or self.launch or self.setback)


class Launcher(Protocol):
    """What the supervisor asks of a group's launcher. Every call comes from
    the manager thread; ``describe``, ``pending`` and ``renewed`` run under
    the engine's lock, the others outside it."""

    recipe: Recipe  # how its workers start

    def prepare(self) -> None:
        """Once, before the first launch; raises if the backend is unusable (Ray cannot connect)."""

    def launch(self, index: int, *, serving: bool) -> WorkerHandle | None:
        """Start the worker at ``index`` of the group: its handle, or None if it
        arrives later, in a Launched. ``serving``: whether some worker of the
        group serves (if none does, nothing waits out a back-off for it).
        Raises when the OS refuses (out of processes, memory, descriptors)."""

    def reap(self, worker: WorkerHandle, now: float) -> Exit | None:
        """``worker``'s death handle fired: reap it; the exit to settle now, or
        None if its exit code comes later, in a Launched (``exits``)."""

    def describe(self, worker: WorkerHandle, exitcode: int | None) -> str:
        """How ``worker`` died, in words ("killed by SIGSEGV (-11) ...")."""

    def due(self, now: float, *, may_start: bool) -> Launched | None:
        """Do what is due at ``now`` (start a template, kill one past its
        timeout; deaths whose code did not come in time); None: nothing to
        report. ``may_start``: False once the pool starts no more workers."""

    def next_deadline(self) -> float | None:
        """When ``due`` has something to do next (monotonic), or None."""

    def close(self) -> None:
        """Once none of its workers is left (at the end of the pool, or its
        version replaced): end what the launcher holds."""

    def pending(self) -> list[int]:
        """The indices of the workers asked of it that have not arrived yet (a fork requested)."""

    def withdraw(self) -> list[int]:
        """Its version was replaced: forget the workers asked of it that have not
        arrived (one that arrives later is killed); their indices, to start anew."""

    def renewed(self, recipe: Recipe) -> Launcher:
        """A launcher of the same kind and backend settings that starts workers
        from ``recipe`` (a new version of the models); it starts nothing yet."""


@dataclass(frozen=True, slots=True)
class Recipe:
    """How a group's workers start: the loaders of one version of its models,
    the workers' settings, and how long a load may take."""

    group: str  # the group's name ("": the shared workers)
    generation: int  # which version of the group's models (see groups.Generation)
    loaders_pickle: bytes  # see groups.pack_loaders
    settings: WorkerSettings
    start_timeout: float  # seconds a worker (a template) has to load the models
    env_for: EnvFor = no_env
    timeout_name: str = "start_timeout"  # the setting start_timeout comes from, for messages

    def settings_for(self, index: int) -> WorkerSettings:
        """The settings of the worker at ``index`` (its worker_env)."""
        env = self.env_for(index)
        return self.settings if env is None else dataclasses.replace(self.settings, env=env)

    def adopt(self, worker: WorkerHandle, index: int) -> WorkerHandle:
        """Mark ``worker`` as started from this recipe, at ``index`` of the group."""
        worker.group, worker.index, worker.generation = self.group, index, self.generation
        worker.start_limit, worker.limit_name = self.start_timeout, self.timeout_name
        return worker


class SpawnLauncher:
    """Workers as spawned processes (the default backend): nothing of its own to watch or time."""

    def __init__(self, recipe: Recipe, context: multiprocessing.context.BaseContext) -> None:
        self.recipe = recipe
        self._context = context

    def renewed(self, recipe: Recipe) -> SpawnLauncher:
        return SpawnLauncher(recipe, self._context)

    def pending(self) -> list[int]:
        return []  # launch() returns the worker

    def withdraw(self) -> list[int]:
        return []

    def prepare(self) -> None:
        """Nothing to prepare: a spawn needs no service."""

    def launch(self, index: int, *, serving: bool) -> WorkerHandle:
        recipe = self.recipe
        return recipe.adopt(spawn_worker(self._context, recipe.loaders_pickle, recipe.settings_for(index)), index)

    def reap(self, worker: WorkerHandle, now: float) -> Exit:
        """The worker is our child: its exit code is ours to read."""
        return worker, worker.reap()

    def describe(self, worker: WorkerHandle, exitcode: int | None) -> str:
        return describe_exit(exitcode)

    def due(self, now: float, *, may_start: bool) -> None:
        """Nothing is ever due: spawned workers are started by ``launch`` alone."""
        return None

    def next_deadline(self) -> None:
        return None

    def close(self) -> None:
        """Nothing to end: every worker is gone."""


class RayLauncher:
    """Workers as Ray actors (backend="ray"), each behind a local bridge (see ``_processes.ray``)."""

    def __init__(self, recipe: Recipe, *, address: str | None, options: dict[str, Any]) -> None:
        from mlpool._processes.ray import RaySession

        self.recipe = recipe
        self._address = address
        self._session = RaySession(address)
        self._options = options

    def renewed(self, recipe: Recipe) -> RayLauncher:
        """A launcher of the new version, already joined to the Ray instance
        (each launcher counts as one of its users, see RaySession)."""
        launcher = RayLauncher(recipe, address=self._address, options=self._options)
        launcher.prepare()
        return launcher

    def pending(self) -> list[int]:
        return []  # launch() returns the worker

    def withdraw(self) -> list[int]:
        return []

    def prepare(self) -> None:
        """Join (or start) the Ray instance."""
        self._session.connect()

    def launch(self, index: int, *, serving: bool) -> WorkerHandle:
        from mlpool._processes.ray import spawn_ray_worker
        from mlpool._processes.workers import new_worker_id

        recipe = self.recipe
        settings = recipe.settings_for(index)
        process, sock = spawn_ray_worker(new_worker_id(), recipe.loaders_pickle, settings, self._options)
        return recipe.adopt(WorkerHandle(process, sock), index)

    def reap(self, worker: WorkerHandle, now: float) -> Exit:
        """The bridge knows how its actor ended (its exit code is ours to read)."""
        return worker, worker.reap()

    def describe(self, worker: WorkerHandle, exitcode: int | None) -> str:
        return worker.process.death or describe_exit(exitcode)

    def due(self, now: float, *, may_start: bool) -> None:
        """Nothing is ever due: Ray places and watches the actors."""
        return None

    def next_deadline(self) -> None:
        return None

    def close(self) -> None:
        """Leave the Ray instance as we found it."""
        self._session.close()
