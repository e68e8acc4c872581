"""Worker groups: the shared workers, and each model's own (``Model(workers=N)``).

A group is the workers that load the same models, with its own launcher
(spawned processes, a fork template, Ray actors: chosen here, once, from
the configuration), its own size, and its own failures in a row. The
supervisor keeps every group at its size; the scheduler gives a job only to
a worker of its model's group.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlpool._config import PoolConfig
from mlpool._forking import ForkLauncher
from mlpool._launchers import Launcher, RayLauncher
from mlpool._serialization import dumps_by_value
from mlpool._worker_main import WorkerSettings


@dataclass(slots=True)
class WorkerGroup:
    """Workers that load the same models: the shared workers (name "") or a model's own."""

    name: str
    models: tuple[str, ...]
    size: int  # workers it keeps
    launcher: Launcher
    max_jobs_per_worker: int | None = None
    spawn_at: list[tuple[float, int]] = field(default_factory=list)  # heap: (when, index)
    failures: int = 0  # failed starts and idle deaths in a row

    def describe(self) -> str:
        return "the workers" if not self.name else f"the workers of model {self.name!r}"


def build_groups(config: PoolConfig, loaders: dict[str, Callable[[], Any]]) -> list[WorkerGroup]:
    """The worker groups of a pool, each with its launcher (chosen once, here)."""
    settings = WorkerSettings(
        parent_pid=os.getpid(),
        threads=config.threads_per_worker,
        memory_limit=config.max_memory_per_worker,
        nice=config.worker_nice,
        shm_threshold=config.shared_memory_threshold,
        shm_limit=config.shared_memory_limit,
        private_memory=config.share_models,
    )
    loaders_pickle = dumps_by_value(loaders, "models_to_load")
    launcher: Launcher
    if config.backend == "ray":
        options = {"num_cpus": config.threads_per_worker, **dict(config.ray_options)}
        launcher = RayLauncher("", loaders_pickle, settings, address=config.ray_address, options=options)
    elif config.share_models:
        launcher = ForkLauncher(
            "", multiprocessing.get_context(config.start_method), loaders_pickle, settings,
            start_timeout=config.start_timeout, fork_with_threads=config.fork_with_threads,
        )  # fmt: skip
    else:
        launcher = Launcher("", multiprocessing.get_context(config.start_method), loaders_pickle, settings)
    return [WorkerGroup("", tuple(loaders), config.nb_workers, launcher, config.max_jobs_per_worker)]
