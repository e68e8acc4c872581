"""Worker groups: the shared workers, and each model's own (``Model(workers=N)``).

A group is the workers that load the same models, with its own launcher
(spawned processes, a fork template, Ray actors: chosen here, once, from
the configuration; see ``_processes.launchers``), its own size, and its own
failures in a row. The supervisor keeps every group at its size; the
scheduler gives a job only to a worker of its model's group.

A group's models come in generations: the workers started from one version
of its loaders (one :class:`Generation`, with a launcher of its own). There
is one, until ``reload_models`` rolls a new one out beside it (see
``_processes.rollout``); an old generation ends with its last worker.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mlpool._api.config import PoolConfig, WorkerEnv
from mlpool._processes.forking import ForkLauncher
from mlpool._processes.launchers import EnvFor, Launcher, RayLauncher, Recipe, SpawnLauncher, no_env
from mlpool._processes.workers import WorkerHandle, WorkerState
from mlpool._wire.serialization import dumps_by_value
from mlpool._worker.main import WorkerSettings

_SERVING = (WorkerState.STARTING, WorkerState.IDLE)
# A start due of whatever generation is current when it starts (a replacement, a
# recycling): one asked before a reload's commit starts the new version after it.
CURRENT = 0


@dataclass(slots=True)
class Generation:
    """One version of a group's models: the loaders its workers ran and the
    launcher that starts them."""

    number: int  # 1 for the loaders the pool started with, then one more per reload of the group
    launcher: Launcher
    loaders: dict[str, bytes]  # model -> its pickled loader
    versions: dict[str, int]  # model -> the version its workers serve (ModelStats.version)


@dataclass(slots=True)
class WorkerGroup:
    """Workers that load the same models: the shared workers (name "") or a model's own."""

    name: str
    models: tuple[str, ...]
    size: int  # workers it keeps
    current: Generation  # what its new workers load
    max_jobs_per_worker: int | None = None
    # Starts due, a heap of (when, index, generation or CURRENT): a start of a generation
    # that may start nothing any more (a failed reload's) is dropped.
    spawn_at: list[tuple[float, int, int]] = field(default_factory=list)
    failures: int = 0  # failed starts and idle deaths in a row (see launchers.MAX_CONSECUTIVE_FAILURES)
    coming: Generation | None = None  # a reload's generation, until it is proven (see _processes.rollout)
    generations: dict[int, Generation] = field(default_factory=dict)  # every one with workers or starts left
    abandoned: set[int] = field(default_factory=set)  # failed reloads' generations: their workers are not replaced

    def __post_init__(self) -> None:
        self.generations[self.current.number] = self.current

    @property
    def launcher(self) -> Launcher:
        """The launcher of its current generation."""
        return self.current.launcher

    def launcher_of(self, worker: WorkerHandle) -> Launcher:
        """The launcher that started ``worker``."""
        return self.generations[worker.generation].launcher

    def may_start(self, generation: Generation) -> bool:
        """Whether ``generation``'s launcher may start processes: the current one's and a coming one's."""
        return generation is self.current or generation is self.coming

    def starts(self, number: int) -> bool:
        """Whether generation ``number`` exists and may start processes."""
        generation = self.generations.get(number)
        return generation is not None and self.may_start(generation)

    def unfilled(self, workers: Iterable[WorkerHandle]) -> set[int]:
        """The indices with no worker serving or loading (of any version that is not
        abandoned), and no start of the current generation due or asked for."""
        held = {w.index for w in workers
                if w.group == self.name and w.state in _SERVING and w.generation not in self.abandoned}  # fmt: skip
        held.update(index for _, index, generation in self.spawn_at if generation in (CURRENT, self.current.number))
        held.update(self.launcher.pending())
        return set(range(self.size)) - held

    def drop_ended(self, workers: Iterable[WorkerHandle]) -> list[Generation]:
        """Forget the generations that start nothing more and have no worker left: their launchers, to close."""
        alive = {w.generation for w in workers if w.group == self.name}
        ended = [g for g in self.generations.values() if not self.may_start(g) and g.number not in alive]
        for generation in ended:
            del self.generations[generation.number]
            self.abandoned.discard(generation.number)
        return ended

    def versions(self, workers: Iterable[WorkerHandle]) -> dict[str, tuple[int, dict[int, int]]]:
        """Each of its models' current version, and how many of ``workers``
        (those past loading) serve each version of it."""
        served: dict[int, int] = {}  # generation -> workers
        for worker in workers:
            if worker.group == self.name:
                served[worker.generation] = served.get(worker.generation, 0) + 1
        out = {}
        for model in self.models:
            counts: dict[int, int] = {}
            for number, count in served.items():
                version = self.generations[number].versions[model]
                counts[version] = counts.get(version, 0) + count
            out[model] = (self.current.versions[model], counts)
        return out

    def describe(self) -> str:
        return "the workers" if not self.name else f"the workers of model {self.name!r}"


def group_surplus(group: WorkerGroup, workers: Iterable[WorkerHandle], allowed: int) -> list[WorkerHandle]:
    """The idle workers to retire so that ``group`` has no more serving or loading workers than it
    keeps plus ``allowed`` (a reload's step): those of older versions first, then the least busy."""
    live = [w for w in workers if w.group == group.name and w.state in _SERVING]
    idle = [w for w in live if w.state is WorkerState.IDLE]
    idle.sort(key=lambda w: (w.generation == group.current.number, len(w.inflight), w.index))
    return idle[: max(0, len(live) - group.size - allowed)]


def pack_loaders(loaders: dict[str, bytes]) -> bytes:
    """What a worker gets to load its models: ``{name: pickled loader}`` pickled
    (no user code runs here; each loader is unpickled in the worker, by name)."""
    return pickle.dumps(loaders, protocol=pickle.HIGHEST_PROTOCOL)


def build_groups(config: PoolConfig, loaders: dict[str, Callable[[], Any]]) -> list[WorkerGroup]:
    """The worker groups of a pool (``config.groups``), each with its launcher
    (chosen once, here) and only its own models' loaders."""
    context = multiprocessing.get_context(config.start_method)
    pickled = {name: dumps_by_value(loader, f"the loader of model {name!r}") for name, loader in loaders.items()}
    groups = []
    for group in config.groups:
        settings = WorkerSettings(
            parent_pid=os.getpid(),
            threads=group.threads_per_worker,
            memory_limit=group.max_memory_per_worker,
            nice=config.worker_nice,
            shm_threshold=config.shared_memory_threshold,
            shm_limit=config.shared_memory_limit,
            private_memory=group.share_models,
        )
        own = {name: pickled[name] for name in group.models}
        env_for = _env_for(group.worker_env, group.workers)
        recipe = Recipe(group.name, 1, pack_loaders(own), settings, config.start_timeout, env_for)
        launcher: Launcher
        if config.backend == "ray":
            options = {"num_cpus": group.threads_per_worker, **dict(config.ray_options), **(group.ray_options or {})}
            launcher = RayLauncher(recipe, address=config.ray_address, options=options)
        elif group.share_models:
            launcher = ForkLauncher(recipe, context, fork_with_threads=config.fork_with_threads)
        else:
            launcher = SpawnLauncher(recipe, context)
        first = Generation(1, launcher, own, dict.fromkeys(group.models, 1))
        groups.append(WorkerGroup(group.name, group.models, group.workers, first, group.max_jobs_per_worker))
    return groups


def _env_for(worker_env: WorkerEnv | None, workers: int) -> EnvFor:
    """Each index's environment, computed now (a callable runs here, in the
    constructor's thread, once per index: never on the manager thread)."""
    if worker_env is None:
        return no_env
    if isinstance(worker_env, dict):
        env = dict(worker_env)
        return lambda index: env
    envs = [dict(worker_env(index)) for index in range(workers)]
    return lambda index: envs[index]
