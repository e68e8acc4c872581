"""Dynamic batching: many callers' single items, one vectorised call.

A scoring function marked with :func:`batched` takes ``(model, items)`` and
returns one result per item, in order. Callers still submit one item per job;
the pool gathers queued jobs for the same model and function into a batch.

When a job waits, exactly:

- it waits in the queue while no worker can take it; batches form there,
  up to ``max_batch_size`` items;
- when a worker is free, the batch goes at once if it is full, or if no
  other worker is busy (an idle pool adds no latency to a lone job);
- otherwise (a free worker while others are busy: the pool is under load and
  more items are likely on their way) it waits for more items, but never
  longer than ``max_wait_ms`` after its oldest item was queued.

This module is pure logic (no processes, an injected clock); the manager
applies it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    pass

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__mlpool_batch__"


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a batched function's batches form (see the module docstring)."""

    max_batch_size: int
    max_wait: float  # seconds

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, not {type(self.max_batch_size).__name__}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not (isinstance(self.max_wait, (int, float)) and self.max_wait >= 0 and math.isfinite(self.max_wait)):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {self.max_wait * 1000!r}")

    def should_hold(self, size: int, oldest: float, now: float, others_busy: bool) -> bool:
        """Whether a batch of ``size`` items, the oldest queued at ``oldest``,
        should wait for more although a worker could take it now."""
        return size < self.max_batch_size and others_busy and now < oldest + self.max_wait

    def hold_until(self, oldest: float) -> float:
        return oldest + self.max_wait


def batched(fn: F | None = None, *, max_batch_size: int = 32, max_wait_ms: float = 5.0) -> Any:
    """Mark a scoring function as batched: ``fn(model, items: list) -> list``.

    Use as ``@mlpool.batched`` or ``@mlpool.batched(max_batch_size=64,
    max_wait_ms=2.0)``. Submit one item per job (``pool.score(name, fn,
    item)``, ``create_job(fn, name, args=(item,))``): exactly one positional
    argument, no keyword arguments. The function must return a list (or any
    sequence) with one result per item, in order; each caller gets its own.

    A batch that raises fails every job in it with that exception; a result
    of the wrong length fails them all with :class:`MLPoolError`. The
    function object itself is marked (not wrapped), so it still pickles by
    reference and can be called directly.
    """
    policy = BatchPolicy(max_batch_size, max_wait_ms / 1000.0)

    def mark(function: F) -> F:
        if not callable(function):
            raise TypeError(f"@batched needs a callable, got {type(function).__name__}")
        try:
            setattr(function, _MARK, policy)
        except (AttributeError, TypeError):
            raise TypeError(f"@batched cannot mark {function!r}: wrap it in a def first") from None
        return function

    return mark(fn) if fn is not None else mark


def batch_policy(fn: Callable) -> BatchPolicy | None:
    """The policy ``fn`` was marked with, or None."""
    policy = getattr(fn, _MARK, None)
    return policy if isinstance(policy, BatchPolicy) else None
