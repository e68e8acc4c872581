"""How a worker group gets its workers: one launcher per backend, chosen once.

::

    Supervisor ── launch(index) ──► Launcher          spawned process (default)
               ◄── a WorkerHandle   RayLauncher       a Ray actor behind a bridge
               ◄── or None, then    ForkLauncher      a fork of the group's model
                   events(...)                        template (share_models, _forking)

The supervisor never asks which kind it has: every launcher answers the same
calls. Spawned processes and Ray actors are ready to watch when ``launch``
returns; a fork is a request whose worker arrives later in ``events``. Only
the fork launcher has a template, so the calls about it (``start_if_due``,
``events``, ``await_exit_code``...) do nothing here.

``index`` is the worker's place in its group (0 .. workers-1); a replacement
gets the index of the worker it replaces, so ``worker_env(index)`` pins it
to the same device.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlpool._processes.workers import WorkerHandle, describe_exit, spawn_worker
from mlpool._worker.main import WorkerSettings

if TYPE_CHECKING:
    from mlpool._processes.template import Template, TemplateEvent

# The environment a group's worker at an index gets (worker_env, resolved).
EnvFor = Callable[[int], "dict[str, str] | None"]


def no_env(index: int) -> dict[str, str] | None:
    return None


@dataclass(slots=True)
class Launched:
    """What a launcher's events mean for the supervisor."""

    started: list[WorkerHandle] = field(default_factory=list)  # to add to the group
    failed: list[tuple[int, str]] = field(default_factory=list)  # failed starts (index, why): each a failure
    exits: list[tuple[WorkerHandle, int | None]] = field(default_factory=list)  # deaths to settle now


class Launcher:
    """Workers as spawned processes (the default backend)."""

    template: Template | None = None  # the fork template (ForkLauncher only)

    def __init__(
        self,
        group: str,
        context: multiprocessing.context.BaseContext,
        loaders_pickle: bytes,
        settings: WorkerSettings,
        env_for: EnvFor = no_env,
    ) -> None:
        self.group = group
        self._context = context
        self._loaders_pickle = loaders_pickle
        self._settings = settings
        self._env_for = env_for

    def prepare(self) -> None:
        """Once, on the manager thread, before the first launch; raises if the backend is unusable."""

    def launch(self, index: int) -> WorkerHandle | None:
        """Start the worker at ``index`` of the group (manager thread, outside
        the engine's lock): its handle, or None if it arrives later through
        ``events``. Raises when the OS refuses (out of processes, memory, fds)."""
        worker = spawn_worker(self._context, self._loaders_pickle, self.settings_for(index))
        worker.group, worker.index = self.group, index
        return worker

    def settings_for(self, index: int) -> WorkerSettings:
        env = self._env_for(index)
        return self._settings if env is None else dataclasses.replace(self._settings, env=env)

    def describe(self, worker: WorkerHandle, exitcode: int | None) -> str:
        """How ``worker`` died, in words ("killed by SIGSEGV (-11) ...")."""
        return describe_exit(exitcode)

    def close(self) -> None:
        """At the end of the pool, once no worker is left."""

    # ---------------------------------- the fork template's; nothing here

    @property
    def ready(self) -> bool:
        """Whether ``launch`` starts a worker now (a fork launcher's template may not be ready)."""
        return True

    def start_if_due(self, now: float) -> Template | None:
        """A template started now (its descriptors need watching), or None."""
        return None

    def hurry(self) -> None:
        """Nothing serves: start the next template now, not after its back-off."""

    def hung(self, now: float) -> bool:
        """Whether the template answered no fork request within start_timeout."""
        return False

    def events(self, events: list[TemplateEvent]) -> Launched:
        return Launched()

    def await_exit_code(self, worker: WorkerHandle, now: float) -> bool:
        """``worker``'s exit code comes later (from its template): True, and
        it is settled through ``events`` or ``overdue_exits``."""
        return False

    def overdue_exits(self, now: float) -> list[tuple[WorkerHandle, int | None]]:
        return []

    def next_deadline(self) -> float | None:
        return None


class RayLauncher(Launcher):
    """Workers as Ray actors (backend="ray"), each behind a local bridge (see ``_processes.ray``)."""

    def __init__(
        self, group: str, loaders_pickle: bytes, settings: WorkerSettings, *,
        address: str | None, options: dict[str, Any], env_for: EnvFor = no_env,
    ) -> None:  # fmt: skip
        super().__init__(group, multiprocessing.get_context(), loaders_pickle, settings, env_for)
        from mlpool._processes.ray import RaySession

        self._session = RaySession(address)
        self._options = options

    def prepare(self) -> None:
        self._session.connect()

    def launch(self, index: int) -> WorkerHandle:
        from mlpool._processes.ray import spawn_ray_worker
        from mlpool._processes.workers import new_worker_id

        settings = self.settings_for(index)
        process, sock = spawn_ray_worker(new_worker_id(), self._loaders_pickle, settings, self._options)
        worker = WorkerHandle(process, sock)
        worker.group, worker.index = self.group, index
        return worker

    def describe(self, worker: WorkerHandle, exitcode: int | None) -> str:
        return worker.process.death or describe_exit(exitcode)

    def close(self) -> None:
        self._session.close()
