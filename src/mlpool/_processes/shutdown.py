"""The shutdown ladder: drain, Stop, wait, SIGKILL.

Once asked, the pool takes no new job. While jobs are queued or running, the
workers finish them; then each idle worker gets Stop (one still loading is
killed: it holds no job) and no start is due any more. Past the deadline,
what still runs is killed and the queued jobs fail. Force is safe there:
each worker has its own pipe, so a killed worker cannot leave a shared
queue or lock broken for the others. Workers ignore SIGTERM (a signal to the
whole process group must not end them under a draining app): Stop was the
polite request.

The supervisor owns the pool's state and calls :meth:`ShutdownLadder.advance`
under the engine's lock while the pool is CLOSING.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from mlpool._engine.recovery import JobRecovery
from mlpool._engine.scheduler import Scheduler
from mlpool._processes.groups import WorkerGroup
from mlpool._processes.workers import WorkerHandle, WorkerState
from mlpool.errors import PoolClosedError

logger = logging.getLogger("mlpool._engine.engine")


class ShutdownLadder:
    """The deadline of a shutdown and the steps towards it."""

    def __init__(self, scheduler: Scheduler, recovery: JobRecovery) -> None:
        self._scheduler = scheduler
        self._recovery = recovery
        self.deadline: float | None = None  # None: not asked, or passed (what ran was killed)

    def begin(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout

    def shorten(self, timeout: float) -> None:
        """Asked again: a shorter timeout wins."""
        if self.deadline is not None:
            self.deadline = min(self.deadline, time.monotonic() + timeout)

    def advance(
        self, now: float, workers: dict[int, WorkerHandle], groups: Iterable[WorkerGroup],
        stop: Callable[[WorkerHandle], None],
    ) -> bool:  # fmt: skip
        """Take the steps due at ``now``; True once nothing is left (the pool is closed)."""
        groups = list(groups)
        busy = self._scheduler.queued or any(w.inflight for w in workers.values())
        if not busy:
            for worker in workers.values():
                if worker.state in (WorkerState.IDLE, WorkerState.RETIRING):
                    stop(worker)
                elif worker.state is WorkerState.STARTING:
                    worker.kill("the pool is shutting down")
            for group in groups:
                group.spawn_at.clear()
        if not workers and not any(group.spawn_at for group in groups):
            self._recovery.fail_queued(PoolClosedError("the pool shut down before the job could run"))
            return True
        if self.deadline is None or now < self.deadline:
            return False
        self._recovery.fail_queued(PoolClosedError("the pool shut down before the job could run"))
        for group in groups:
            group.spawn_at.clear()
        logger.warning("shutdown timed out; killing %d workers", len(workers))
        for worker in workers.values():
            worker.kill("shutdown timed out")
        self.deadline = None
        return False
