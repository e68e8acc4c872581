"""Sessions: jobs grouped by their client, cancelled together when it goes away.

A WebSocket handler serves one client for a long time and sends it many
results; when the client disconnects, its unfinished jobs should stop
costing anything::

    async with pool.session(interrupt=True) as session:
        async for message in websocket.iter_text():
            await websocket.send_json(await session.score_async("iris", score, message))
    # leaving the block (normally, by an error, or by cancellation) cancels
    # every job of the session that has not finished
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from mlpool._errors import PoolClosedError
from mlpool._jobs import Job, JobState

if TYPE_CHECKING:
    from mlpool._pool import MLPool

_PRUNE_AT = 256  # finished jobs are forgotten once the session holds this many


class Session:
    """A group of jobs submitted through one pool and cancelled together.

    Create it with :meth:`MLPool.session`. Its methods are those of the pool
    (same arguments, same errors); :meth:`close` (or leaving the ``with`` /
    ``async with`` block) cancels every job of the session still queued or
    running. With ``interrupt=True`` a running job's worker is killed and
    replaced, so its CPU is freed at once; otherwise its result is discarded.
    """

    def __init__(self, pool: MLPool, *, interrupt: bool = False) -> None:
        self._pool = pool
        self._interrupt = interrupt
        self._jobs: set[Job] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<mlpool.Session {len(self._jobs)} jobs{' closed' if self._closed else ''}>"

    def _track(self, job: Job) -> Job:
        if self._closed:
            raise PoolClosedError("this session is closed")
        if len(self._jobs) >= _PRUNE_AT:
            self._jobs = {j for j in self._jobs if j.state is not JobState.FINISHED}
        self._jobs.add(job)
        return job

    async def score_async(self, model_name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """:meth:`MLPool.score_async`, cancelled with the session."""
        job = self._track(self._pool._make_async_job(model_name, fn, args, kwargs))
        try:
            return await self._pool._run_async_job(job)
        finally:
            self._jobs.discard(job)

    def submit(self, model_name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """:meth:`MLPool.submit`, cancelled with the session."""
        job = self._track(self._pool._make_job(fn, model_name, args, kwargs, None, None))
        self._pool._admit(job, wait=True)
        assert job.future is not None
        return job.future

    def create_job(
        self,
        score_model_function: Callable[..., Any],
        model_name: str,
        args: Any = None,
        kwargs: Any = None,
        *,
        block_until_scheduled: bool = True,
        timeout: float | None = None,
        max_retries: int | None = None,
    ) -> str:
        """:meth:`MLPool.create_job`, cancelled with the session."""
        job = self._track(self._pool._make_job(score_model_function, model_name, args, kwargs, timeout, max_retries))
        self._pool._admit(job, wait=block_until_scheduled, register=True)
        assert job.key is not None
        return job.key

    async def create_job_async(
        self,
        score_model_function: Callable[..., Any],
        model_name: str,
        args: Any = None,
        kwargs: Any = None,
        *,
        block_until_scheduled: bool = True,
        timeout: float | None = None,
        max_retries: int | None = None,
    ) -> str:
        """:meth:`MLPool.create_job_async`, cancelled with the session."""
        job = self._track(self._pool._make_job(score_model_function, model_name, args, kwargs, timeout, max_retries))
        await self._pool._admit_async(job, wait=block_until_scheduled, register=True)
        assert job.key is not None
        return job.key

    def close(self) -> int:
        """Cancel every unfinished job of the session; how many were cancelled. Idempotent."""
        self._closed = True
        jobs, self._jobs = self._jobs, set()
        manager = self._pool._manager
        cancelled = 0
        for job in jobs:
            if job.state is not JobState.FINISHED and manager.cancel(job, interrupt=self._interrupt):
                cancelled += 1
                if job.key is not None:
                    manager.forget(job.key, job)
        return cancelled

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
