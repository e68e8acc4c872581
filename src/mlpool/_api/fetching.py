"""Fetching a job id's result: the steps ``get_result`` and ``get_result_async`` share.

::

    lookup(job_id) ──► the Job (not finished, or its outcome not delivered yet)
                   └─► its Settled outcome (kept by the registry once delivered)
    waiting, from the job's own loop: its asyncio handle (``_api.waiting.wait_here_async``)
             from elsewhere: handle_elsewhere() ──► a concurrent Future of the same outcome
    take() / take_settled(): the result (or the job's error), and the id forgotten

An id is fetched once: of two callers racing for it, one gets the result and
the other ``UnknownJobError`` ("already fetched").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any, Protocol

from mlpool._api.waiting import concurrent_future, done_handle
from mlpool._engine.jobs import Job
from mlpool._engine.registry import Settled
from mlpool._engine.results import opened
from mlpool.errors import UnknownJobError


class JobIds(Protocol):
    """What fetching asks of the engine (``_engine.engine.ProcessEngine``, ``_engine.inline.InlineEngine``)."""

    def lookup(self, key: str) -> Job | Settled | None: ...

    def forget(self, key: str, job: Job | Settled) -> bool: ...

    def share(self, job: Job) -> Future: ...

    def reclaim_stopped_loans(self) -> None: ...


def lookup(engine: JobIds, job_id: str) -> Job | Settled:
    """The job of ``job_id`` or its outcome; raises TypeError or UnknownJobError."""
    if not isinstance(job_id, str):
        raise TypeError(f"job_id must be a str, not {type(job_id).__name__}")
    job = engine.lookup(job_id)
    if job is None:
        raise UnknownJobError(f"unknown job {job_id!r}: never created, already fetched, cancelled or expired")
    return job


def handle_elsewhere(engine: JobIds, job: Job) -> Future | None:
    """The concurrent Future a thread (or another loop) waits on for ``job``;
    None if its outcome can be read already."""
    afut = job.afut
    if afut is None:
        return concurrent_future(job)
    _read_elsewhere(engine, job)
    future = engine.share(job)
    # Checked after sharing: an outcome settled before has reached the asyncio handle.
    return None if afut.done() else future


def _read_elsewhere(engine: JobIds, job: Job) -> None:
    """Before waiting, from another thread or loop, on a job made in a
    coroutine: if its loop stopped (``asyncio.run`` returned), the manager
    takes the worker's pipe back, or nobody would read the result. (A loop
    that stops later, while we wait, is seen at the engine's next dispatch.)"""
    loop = job.loop
    if loop is not None and not loop.is_running():
        engine.reclaim_stopped_loans()


def take_settled(engine: JobIds, job_id: str, settled: Settled) -> Any:
    """The outcome the registry kept for a finished job, forgetting it."""
    return _take_once(engine, job_id, settled, settled.result)


def take(engine: JobIds, job_id: str, job: Job) -> Any:
    """The result of a finished job (or its error), forgetting the job."""
    afut = job.afut
    handle = afut if afut is not None and afut.done() else done_handle(job)
    assert handle is not None  # callers waited until it is done
    return _take_once(engine, job_id, job, lambda: opened(handle.result()))


def _take_once(engine: JobIds, job_id: str, entry: Job | Settled, read: Callable[[], Any]) -> Any:
    """``read()`` the outcome, then forget the id: only the first caller gets
    it. A Ctrl-C while the result is unpickled leaves the id for another try."""
    try:
        value = read()
    except KeyboardInterrupt:
        raise
    except (CancelledError, asyncio.CancelledError):
        engine.forget(job_id, entry)
        raise UnknownJobError(f"job {job_id!r} was cancelled") from None
    except BaseException:
        if not engine.forget(job_id, entry):
            raise UnknownJobError(f"job {job_id!r} was already fetched") from None
        raise
    if not engine.forget(job_id, entry):
        raise UnknownJobError(f"job {job_id!r} was already fetched")
    return value
