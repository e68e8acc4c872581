"""The API process's calls to its pool host (stats, worker_stacks, reload), and small future helpers."""

from __future__ import annotations

import itertools
import pickle
import threading
from concurrent.futures import Future
from functools import partial
from typing import Any

from mlpool._engine.state import PoolState, PoolStats
from mlpool._shared.protocol import CALL
from mlpool.errors import PoolBrokenError, PoolFullError


class HostCalls:
    """Calls waiting for the host's ANSWER, by id. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Future] = {}
        self._ids = itertools.count(1)

    def call(self, connection: Any, refused: BaseException | None, operation: str, arguments: tuple) -> Future:
        """Send a CALL on ``connection`` (a ``_shared.connection.Connection``); a
        future of the answer (None for a reload), or of the error that stops it."""
        future: Future = Future()
        if refused is None and connection is None:
            refused = PoolBrokenError("the pool host is not attached (it died and no new one could be started)")
        if refused is not None:
            future.set_exception(refused)
            return future
        call_id = next(self._ids)
        with self._lock:
            self._waiting[call_id] = future
        connection.send((CALL, 0, call_id, operation, arguments))  # a lost connection fails it (fail_all)
        if operation != "reload":
            return future
        done: Future = Future()  # reload_models returns None, not the host's stats
        future.add_done_callback(partial(chain, done))
        return done

    def answered(self, call_id: int, ok: bool, data: bytes) -> None:
        """The host's ANSWER (its pickle: from our own host, past the uid check)."""
        with self._lock:
            future = self._waiting.pop(call_id, None)
        if future is None:
            return
        value = pickle.loads(data)
        if ok:
            set_quietly(future, value)
        elif not future.done():
            future.set_exception(value)

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for future in waiting:
            if not future.done():
                future.set_exception(error)


def set_quietly(future: Future, value: Any = None) -> None:
    """Resolve ``future`` unless it is done already."""
    if not future.done():
        try:
            future.set_result(value)
        except Exception:  # resolved meanwhile (InvalidStateError)
            pass


def chain(to: Future, future: Future) -> None:
    """Settle ``to`` as ``future`` was, without its value."""
    error = future.exception()
    if error is not None:
        to.set_exception(error)
    else:
        set_quietly(to)


def wake(rooms: list[Future]) -> None:
    for room in rooms:
        set_quietly(room)


def empty_stats(state: PoolState) -> PoolStats:
    """What ``stats()`` shows of the pool while no host answers."""
    return PoolStats(
        state=state.value, workers_alive=0, workers_busy=0, queue_depth=0, jobs_running=0, jobs_completed=0,
        jobs_failed=0, jobs_crashed=0, jobs_timed_out=0, jobs_cancelled=0, jobs_retried=0, worker_restarts=0,
        workers_recycled=0, results_unfetched=0, latency_p50=None, latency_p95=None, latency_p99=None,
        run_seconds_mean=None, latency_buckets=(), latency_sum=0.0, latency_count=0,
    )  # fmt: skip


def unpickled_error(data: bytes) -> BaseException:
    """The exception in an ERROR from the host (a PoolBrokenError if it is none)."""
    try:
        error = pickle.loads(data)
    except Exception as exc:
        return PoolBrokenError(f"the pool host sent an error that cannot be unpickled: {exc!r}")
    return error if isinstance(error, BaseException) else PoolBrokenError(f"the pool host sent {error!r}")


def share_full(share: int, processes: int, max_queue_size: int) -> PoolFullError:
    """The error for a job beyond this API process's share of the queue."""
    return PoolFullError(
        f"this API process's share of the shared pool's queue is full ({share} jobs in flight, {processes} "
        f"processes share max_queue_size={max_queue_size}); retry later or create the job with "
        "block_until_scheduled=True"
    )
