"""The reloads asked of a pool: one rolls at a time (``_processes.rollout``), the others wait in order.

The supervisor hands it its events; with no reload under way each is a no-op.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from mlpool._engine.state import PoolState
from mlpool._processes.groups import WorkerGroup
from mlpool._processes.launchers import Setback
from mlpool._processes.rollout import ReloadPlan, Rollout, Starts
from mlpool._processes.workers import WorkerHandle


class Reloads:
    """The reloads asked of a pool: one rolls at a time, the others wait their turn in order."""

    def __init__(self, starts: Starts, queued_of: Callable[[str], int]) -> None:
        self._starts = starts
        self._queued_of = queued_of  # jobs of a model waiting in the queue
        self.active: Rollout | None = None
        self._waiting: deque[ReloadPlan] = deque()

    def ask(self, plan: ReloadPlan) -> None:
        self._waiting.append(plan)
        self.begin_due()

    def begin_due(self) -> None:
        """Begin the next reload, if none rolls and the pool serves."""
        while self.active is None and self._waiting and self._starts.state is PoolState.RUNNING:
            self.active = Rollout(self._starts, self._waiting.popleft(), self._ended, self._queued_of)
            self.active.begin()

    def _ended(self) -> None:
        self.active = None

    def end(self, error: BaseException) -> None:
        """The pool closes or broke: every reload ends with ``error`` (those that waited too)."""
        active, self.active = self.active, None
        if active is not None:
            active.end(error)
        while self._waiting:
            self._waiting.popleft().future.set_exception(error)

    def replacing(self, worker: WorkerHandle) -> bool:
        return self.active is not None and self.active.replacing(worker)

    def surge(self, group: str) -> int:
        """The workers a reload's step may hold beyond ``group``'s size now."""
        return self.active.surge(group) if self.active is not None else 0

    def check(self) -> None:
        if self.active is not None:
            self.active.check()

    def next_deadline(self) -> float | None:
        return None if self.active is None else self.active.next_deadline()

    def on_ready(self, worker: WorkerHandle) -> None:
        if self.active is not None:
            self.active.on_ready(worker)
        self.begin_due()

    def on_exit(self, worker: WorkerHandle, why: str) -> bool:
        claimed = self.active is not None and self.active.on_exit(worker, why)
        self.begin_due()
        return claimed

    def start_failed(self, group: WorkerGroup, generation: int, index: int, reason: str) -> bool:
        claimed = self.active is not None and self.active.start_failed(group, generation, index, reason)
        self.begin_due()
        return claimed

    def setback(self, group: WorkerGroup, generation: int, setback: Setback) -> bool:
        claimed = self.active is not None and self.active.setback(group, generation, setback)
        self.begin_due()
        return claimed
