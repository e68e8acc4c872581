"""What the Manager's mixins (``_lifecycle.WorkerLifecycle``, ``_pipes.PipeReaders``)
use of the Manager, declared for the type checker.

The mixins are methods of ``_manager.Manager`` kept in other modules: they
read and write its attributes and call its methods. Both inherit from
:class:`ManagerParts`, which only declares those (annotations without
values, method stubs under ``TYPE_CHECKING``): at run time it is an empty
class, so nothing changes; mypy checks every use in the mixins, and
checks the Manager's own definitions against these declarations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import selectors
    import threading
    from concurrent.futures import Future
    from multiprocessing.context import BaseContext

    from mlpool._config import PoolConfig
    from mlpool._forking import ForkLauncher
    from mlpool._jobs import CallbackRunner, Job
    from mlpool._ray import RaySession
    from mlpool._registry import Registry
    from mlpool._scheduler import Scheduler
    from mlpool._shm import RegionPool
    from mlpool._state import PoolState
    from mlpool._worker_main import WorkerSettings
    from mlpool._workers import WorkerHandle


class ManagerParts:
    """The Manager's attributes and methods the mixins use (set and defined in ``_manager``)."""

    config: PoolConfig
    started: Future[None]
    finished: Future[None]
    _loaders_pickle: bytes
    _context: BaseContext
    _worker_settings: WorkerSettings
    _callbacks: CallbackRunner
    _regions: RegionPool
    _lock: threading.Lock
    # under the lock
    _state: PoolState
    _scheduler: Scheduler
    _workers: dict[int, WorkerHandle]
    _registry: Registry[Job]
    _need_wake: bool
    _failures: int
    _broken_reason: str
    _stop_deadline: float | None
    _counts: dict[str, int]
    # manager thread only
    _selector: selectors.BaseSelector
    _selector_lock: threading.Lock
    _spawn_at: list[float]
    _forks: ForkLauncher | None
    _ray: RaySession | None
    _start_deadline: float
    _wake_r: int
    _wake_w: int

    if TYPE_CHECKING:

        def before_blocking(self) -> None: ...
        def _check_accepting(self) -> None: ...
        def _release_memory(self, job: Job, *, keep_offer: bool = False) -> None: ...
        def _watch_deadline(self, job: Job) -> None: ...
        def _release(self) -> None: ...
        def _finish(self, job: Job, ok: bool, value: Any) -> None: ...
        def _dispatch(self) -> None: ...
        def _run_frame(self, worker: WorkerHandle, jobs: list[Job]) -> tuple[bytes, list[int]]: ...
        def _refuse(self, jobs: list[Job], exc: Exception) -> None: ...
        def _send(self, worker: WorkerHandle, frames: list[tuple[bytes, list[int], int]]) -> None: ...
        def _on_message(self, worker: WorkerHandle, msg: Any) -> None: ...
        def _watch(self, worker: WorkerHandle) -> None: ...  # PipeReaders', for WorkerLifecycle
