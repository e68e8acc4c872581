"""Per-model queue bounds: a full model refuses (or makes wait) while the others take jobs.

Each model may wait at most ``max_queue_size`` jobs (a :class:`mlpool.Model`'s
own, else the pool's; see ``ModelSettings``). A caller that waits for room in
a full model waits on a future of that model only, resolved when one of its
jobs leaves the queue (taken, cancelled, timed out): no retry on every other
model's movement. Under the engine's lock, except what ``due`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future

from mlpool._api.config import ModelSettings
from mlpool.errors import PoolFullError


class ModelBounds:
    """Whether a model's queue is full, and who waits for room in it."""

    __slots__ = ("_limits", "_queued_of", "_accepting", "waiters", "bounded")

    def __init__(
        self,
        settings: Mapping[str, ModelSettings],
        queued_of: Callable[[str], int],
        pool_limit: int,
        accepting: Callable[[], bool],
    ) -> None:
        """``queued_of(model)``: its jobs waiting now (the scheduler's count);
        ``accepting()``: whether the pool takes jobs. Models whose bound is the
        pool's (``pool_limit``) are never checked here: the pool's own bound
        is reached first."""
        self._limits = {name: s.max_queue_size for name, s in settings.items() if s.max_queue_size < pool_limit}
        self.bounded = bool(self._limits)  # False: full() is always False
        self._queued_of = queued_of
        self._accepting = accepting
        self.waiters: dict[str, list[Future]] = {}  # model -> callers waiting for room in it (read: "any?")

    def full(self, model: str) -> bool:
        limit = self._limits.get(model)
        return limit is not None and self._queued_of(model) >= limit

    def refuse(self, model: str) -> PoolFullError:
        """The error for a job refused by its full model."""
        limit = self._limits[model]
        return PoolFullError(
            f"the queue of model {model!r} is full ({self._queued_of(model)} jobs waiting, its max_queue_size="
            f"{limit}); the other models still take jobs; retry later or create the job with block_until_scheduled=True"
        )

    def wait(self, model: str) -> Future:
        """A future resolved when ``model`` may have room (call enqueue again then)."""
        waiter: Future = Future()
        waiters = self.waiters.setdefault(model, [])
        if len(waiters) >= 64:  # callers that gave up (timed out) leave theirs cancelled
            waiters[:] = [w for w in waiters if not w.done()]
        waiters.append(waiter)
        return waiter

    def due(self) -> list[Future]:
        """The waiters to resolve now (outside the lock): those of models with
        room, or all of them when the pool refuses jobs (they hear why)."""
        if not self.waiters:
            return []
        refusing = not self._accepting()
        due: list[Future] = []
        for model in list(self.waiters):
            if refusing or self._queued_of(model) < self._limits[model]:
                due += self.waiters.pop(model)
        return due
