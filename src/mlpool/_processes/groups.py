"""Worker groups: the shared workers, and each model's own (``Model(workers=N)``).

A group is the workers that load the same models, with its own launcher
(spawned processes, a fork template, Ray actors: chosen here, once, from
the configuration; see ``_processes.launchers``), its own size, and its own
failures in a row. The supervisor keeps every group at its size; the
scheduler gives a job only to a worker of its model's group.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlpool._api.config import PoolConfig, WorkerEnv
from mlpool._processes.forking import ForkLauncher
from mlpool._processes.launchers import EnvFor, Launcher, RayLauncher, SpawnLauncher, no_env
from mlpool._wire.serialization import dumps_by_value
from mlpool._worker.main import WorkerSettings


@dataclass(slots=True)
class WorkerGroup:
    """Workers that load the same models: the shared workers (name "") or a model's own."""

    name: str
    models: tuple[str, ...]
    size: int  # workers it keeps
    launcher: Launcher
    max_jobs_per_worker: int | None = None
    spawn_at: list[tuple[float, int]] = field(default_factory=list)  # heap: (when, index)
    failures: int = 0  # failed starts and idle deaths in a row (see launchers.MAX_CONSECUTIVE_FAILURES)

    def describe(self) -> str:
        return "the workers" if not self.name else f"the workers of model {self.name!r}"


def build_groups(config: PoolConfig, loaders: dict[str, Callable[[], Any]]) -> list[WorkerGroup]:
    """The worker groups of a pool (``config.groups``), each with its launcher
    (chosen once, here) and only its own models' loaders."""
    context = multiprocessing.get_context(config.start_method)
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
        loaders_pickle = dumps_by_value({name: loaders[name] for name in group.models}, "models_to_load")
        env_for = _env_for(group.worker_env, group.workers)
        launcher: Launcher
        if config.backend == "ray":
            options = {"num_cpus": group.threads_per_worker, **dict(config.ray_options), **(group.ray_options or {})}
            launcher = RayLauncher(
                group.name, loaders_pickle, settings, address=config.ray_address, options=options, env_for=env_for
            )
        elif group.share_models:
            launcher = ForkLauncher(
                group.name, context, loaders_pickle, settings, start_timeout=config.start_timeout,
                fork_with_threads=config.fork_with_threads, env_for=env_for,
            )  # fmt: skip
        else:
            launcher = SpawnLauncher(group.name, context, loaders_pickle, settings, env_for)
        groups.append(WorkerGroup(group.name, group.models, group.workers, launcher, group.max_jobs_per_worker))
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
