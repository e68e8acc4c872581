"""The job methods shared by :class:`MLPool` and its sessions, each written once.

::

    caller ── create_job / submit / score ─┐        ┌─ wait_any (threads)
           ── ..._async ───────────────────┤        └─ wait_any_async (coroutines)
                                           ▼                 ▲ the only sync/async difference
      _new_job: the engine's make_job ── _admission: enqueue until admitted,
                                         yielding each "room in the queue" future
                                           │ (a session tracks the job: _session.SessionJobs)
                                           ▼
      the job's handle: a concurrent Future (made in a thread) or an asyncio
      future of the caller's loop (made in a coroutine: score_async, create_job_async)

A job's options come from the call, else its view or session (:meth:`JobAPI.options`),
else its model; a session's jobs carry its lane (its :class:`JobTracker`, the session's jobs).

A sync method and its ``_async`` twin share every step but the wait, which
goes through :mod:`mlpool._api.waiting` (a wait that ends removes what it added).
Jobs made in a coroutine carry its loop, which reads their worker's pipe and
settles their asyncio handle (no thread hop, no lock). A job id made there may
be fetched from anywhere: a thread or another loop asks the engine to
``share`` a concurrent Future of the same outcome, and if the job's loop has
stopped, to take its pipe back (``reclaim_stopped_loans``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import CancelledError, Future
from functools import partial
from typing import Any, Protocol

from mlpool._api.fetching import JobIds, handle_elsewhere, lookup, take, take_settled
from mlpool._api.options import JobOptions, check_priority
from mlpool._api.streams import AsyncStream, Stream, StreamEngine
from mlpool._api.waiting import (
    check_wait,
    concurrent_future,
    done_handle,
    job_key,
    never_queued,
    no_room,
    remaining,
    still_running,
    wait_any,
    wait_any_async,
    wait_done_async,
    wait_here_async,
    warn_if_loop_blocked,
)  # fmt: skip
from mlpool._engine.jobs import Job, running_loop
from mlpool._engine.registry import Settled
from mlpool._engine.results import PickledResult
from mlpool._engine.streams import check_streamable, open_channel
from mlpool.errors import ResultNotReadyError


class Engine(StreamEngine, JobIds, Protocol):
    """What the facade asks of an engine (``_engine.engine.ProcessEngine``, ``_engine.inline.InlineEngine``)."""

    def make_job(
        self,
        model: str,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        *,
        timeout: float | None,
        retries: int | None,
        loop: asyncio.AbstractEventLoop | None = None,
        priority: int = 0,
        lane: object | None = None,
    ) -> Job: ...

    def enqueue(self, job: Job, *, wait: bool, register: bool = False) -> Future | None: ...

    def discard(self, job: Job) -> None: ...

    def run_direct(self, job: Job) -> bool: ...

    def cancel(self, job: Job, *, interrupt: bool = False) -> bool: ...

    config: Any  # stream_buffer, stream_buffer_bytes


class JobTracker(Protocol):
    """What the job methods ask of the session that tracks their jobs (``_api.session.SessionJobs``)."""

    def enter(self, job: Job) -> None: ...

    def leave(self, job: Job) -> None: ...

    def admit(self, job: Job) -> bool: ...


_NO_OPTIONS = JobOptions()


class JobAPI:
    """Every job method of the pool, submitting to ``engine``; with ``group``,
    each job admitted is tracked by that session (see :class:`mlpool.Session`)
    and waits in its lane; ``options`` are the defaults of its jobs.

    Every method is safe to call from any thread.
    """

    def __init__(self, engine: Engine, tracker: JobTracker | None = None, options: JobOptions | None = None) -> None:
        self._engine = engine
        self._tracker = tracker
        self._options = options or _NO_OPTIONS

    def options(
        self, *, priority: int | None = None, timeout: float | None = None, max_retries: int | None = None
    ) -> JobAPI:
        """A view with every job method of this one, its jobs made with these options.

        ``priority`` (an int, default 0): higher runs first, strictly (while
        a group's workers have higher-priority jobs to run, lower ones wait:
        a flood of high priority starves low priority). ``timeout`` and
        ``max_retries``: as :meth:`create_job` takes them. An argument of a
        call through the view wins over the view's option; None keeps the
        option of this pool or session. Checked here (TypeError, ValueError).
        Through a session's view, jobs are still the session's.
        """
        options = JobOptions.checked(priority, timeout, max_retries).over(self._options)
        return JobAPI(self._engine, self._tracker, options)

    # -------------------------------------------------------------- job ids

    def create_job(
        self,
        score_model_function: Callable[..., Any],
        model_name: str,
        args: tuple | list | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        block_until_scheduled: bool = True,
        timeout: float | None = None,
        max_retries: int | None = None,
        priority: int | None = None,
    ) -> str:
        """Queue ``score_model_function(model, *args, **kwargs)``; return its job id.

        Arguments are pickled here, so unpicklable ones raise
        :class:`SerializationError` at once. An unknown ``model_name`` raises
        :class:`UnknownModelError`. When the queue is full, waits for room
        (bounded by the job's deadline, else :class:`JobTimeoutError`), or with
        ``block_until_scheduled=False`` raises :class:`PoolFullError`. A job
        of a session that closes while it waits for room raises
        :class:`PoolClosedError` at once: it was never queued.

        ``timeout`` is the job's deadline in seconds from now (default: the
        pool's ``job_timeout``): expired in the queue, it never runs; expired
        while running, its worker is killed and replaced; either way the job
        fails with :class:`JobTimeoutError`. ``max_retries`` overrides the
        pool's for this job. ``priority`` (an int; TypeError otherwise): higher
        runs first (see :meth:`options`). None, for each of the three: the
        option of the view or session, else the model's setting (priority 0).
        """
        job = self._new_job(score_model_function, model_name, args, kwargs, timeout, max_retries, priority)
        try:
            self._admit(job, wait=block_until_scheduled, register=True, blocking=("create_job", "create_job_async"))
        except CancelledError:
            raise never_queued(job) from None
        return job_key(job)

    async def create_job_async(
        self,
        score_model_function: Callable[..., Any],
        model_name: str,
        args: tuple | list | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        block_until_scheduled: bool = True,
        timeout: float | None = None,
        max_retries: int | None = None,
        priority: int | None = None,
    ) -> str:
        """:meth:`create_job` for coroutines: waits for room without blocking the loop.

        The job's result is read by this event loop (as for :meth:`score_async`)
        and can be fetched with :meth:`get_result_async` here, or with
        :meth:`get_result` from another thread, also after the loop ended.
        """
        loop = asyncio.get_running_loop()
        job = self._new_job(score_model_function, model_name, args, kwargs, timeout, max_retries, priority, loop=loop)
        if not self._admit_now(job, wait=block_until_scheduled, register=True):
            try:
                await self._admit_async(job, wait=block_until_scheduled, register=True)
            except CancelledError:
                raise never_queued(job) from None
        return job.key if job.key is not None else job_key(job)

    def get_result(self, job_id: str, *, wait_if_unavailable: bool = True, timeout: float | None = None) -> Any:
        """Return the job's result and forget the job.

        A job that failed raises its error: the scoring function's own
        exception (worker traceback as ``__cause__``), or
        :class:`WorkerCrashedError`, :class:`JobTimeoutError`...

        Raises:
            UnknownJobError: the id never existed, was already fetched, was
                cancelled, or its result expired (``result_ttl``).
            ResultNotReadyError: unfinished and ``wait_if_unavailable=False``.
            TimeoutError: still unfinished after ``timeout`` seconds of
                waiting; the job goes on and can be fetched later.
            RuntimeError: it would have to wait on the thread of the event
                loop that reads the job's result (use :meth:`get_result_async`).
        """
        check_wait(timeout)
        job = lookup(self._engine, job_id)
        if isinstance(job, Settled):
            return take_settled(self._engine, job_id, job)
        handle = done_handle(job)
        if handle is None:
            if not wait_if_unavailable:
                raise ResultNotReadyError(f"job {job_id} has not finished yet")
            if job.afut is not None and running_loop() is job.loop:
                raise RuntimeError(
                    f"get_result({job_id!r}) would block the event loop that reads this job's result; "
                    "in a coroutine, use await get_result_async(...)"
                )
            future = handle_elsewhere(self._engine, job)
            if future is not None:
                warn_if_loop_blocked("get_result", "get_result_async", stacklevel=3)
            if future is not None and not wait_any([future], timeout):
                raise still_running(job_id, timeout)
        return take(self._engine, job_id, job)

    async def get_result_async(
        self, job_id: str, *, wait_if_unavailable: bool = True, timeout: float | None = None
    ) -> Any:
        """:meth:`get_result` for coroutines. Cancelling the awaiting task does
        not cancel the job (use :meth:`cancel_job`); a wait that ends (result,
        timeout or cancellation) leaves nothing behind on the job."""
        if timeout is not None:
            check_wait(timeout)
        job = lookup(self._engine, job_id)
        if isinstance(job, Settled):
            return take_settled(self._engine, job_id, job)
        afut = job.afut
        if (afut is None or not afut.done()) and done_handle(job) is None:
            if not wait_if_unavailable:
                raise ResultNotReadyError(f"job {job_id} has not finished yet")
            if afut is not None and job.loop is running_loop():  # made here: no Future, no thread hop
                done = await wait_here_async(job, timeout)
            else:
                future = handle_elsewhere(self._engine, job)
                done = future is None or await wait_done_async(future, timeout)
            if not done:
                raise still_running(job_id, timeout)
        return take(self._engine, job_id, job)

    def cancel_job(self, job_id: str, *, interrupt: bool = False) -> bool:
        """Cancel a job; True if it was queued or running, False if already finished.

        A queued job never runs. A running job's result is discarded; with
        ``interrupt=True`` its worker is killed at once and replaced, so the
        CPU it was burning is freed. A cancelled id is forgotten (a later
        :meth:`get_result` raises :class:`UnknownJobError`); a finished job
        keeps its result. Raises :class:`UnknownJobError` for an unknown id.
        """
        job = lookup(self._engine, job_id)
        if isinstance(job, Settled):
            return False
        cancelled = self._engine.cancel(job, interrupt=interrupt)
        if cancelled:
            self._engine.forget(job_id, job)
        return cancelled

    # -------------------------------------------------- futures, one call

    def submit(self, model_name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(model, *args, **kwargs)``; a :class:`concurrent.futures.Future` of its result.

        Waits for room when the queue is full. Cancelling the future before
        the job starts means it never runs. Raises
        :class:`concurrent.futures.CancelledError` if its session closes while
        it waits for room.
        """
        job = self._new_job(fn, model_name, args, kwargs, None, None, None)
        self._admit(job, wait=True, blocking=("submit", "score_async"))
        return concurrent_future(job)

    def score(self, model_name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(model, *args, **kwargs)`` in a worker and return its result (blocks).

        Called on a thread whose event loop is running (a sync call inside
        ``async def``), it blocks that loop for the whole job: a
        RuntimeWarning, once per call site, names :meth:`score_async`.
        """
        if running_loop() is not None:
            warn_if_loop_blocked("score", "score_async", stacklevel=3)
        job = self._new_job(fn, model_name, args, kwargs, None, None, None)
        # An idle worker's pipe is read by this thread (one hop fewer); a
        # session's jobs go through the queue, where the session tracks them.
        if self._tracker is not None or not self._engine.run_direct(job):
            self._admit(job, wait=True)
        future = job.future
        assert future is not None  # made outside a coroutine
        return future.result()

    async def score_async(self, model_name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(model, *args, **kwargs)`` in a worker; the event loop stays free.

        Cancelling the awaiting task cancels the job (as :meth:`cancel_job`).
        """
        loop = asyncio.get_running_loop()
        job = self._new_job(fn, model_name, args, kwargs, None, None, None, loop=loop)
        if not self._admit_now(job, wait=True):
            try:
                await self._admit_async(job, wait=True)
            except CancelledError as exc:  # its session closed while it waited for room
                raise asyncio.CancelledError(*exc.args) from None
        afut = job.afut
        assert afut is not None  # a job made with a loop
        try:
            value = await afut
        except asyncio.CancelledError:
            self._engine.cancel(job)
            raise
        return value.open() if type(value) is PickledResult else value

    # -------------------------------------------------------------- streams

    def stream(self, model_name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Stream:
        """Run generator ``fn(model, *args, **kwargs)`` in a worker; iterate its items
        as they come (a :class:`~mlpool._api.streams.Stream`: its docstring has
        the rules: backpressure, closing, errors). Waits for room when the
        queue is full. Raises TypeError for a batched ``fn``, and what
        :meth:`submit` raises."""
        check_streamable(fn)
        job = self._new_job(fn, model_name, args, kwargs, None, None)
        config = self._engine.config
        open_channel(job, config.stream_buffer, config.stream_buffer_bytes)
        self._admit(job, wait=True, blocking=("stream", "stream_async"))
        return Stream(job, self._engine)

    def stream_async(self, model_name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> AsyncStream:
        """:meth:`stream` for coroutines: ``async for item in pool.stream_async(...)``
        or ``async with pool.stream_async(...) as items``. Bad arguments raise
        here; the job is queued when the iteration (or block) starts."""
        check_streamable(fn)
        loop = asyncio.get_running_loop()
        job = self._new_job(fn, model_name, args, kwargs, None, None, loop=loop)
        config = self._engine.config
        open_channel(job, config.stream_buffer, config.stream_buffer_bytes)
        return AsyncStream(job, self._engine, partial(self._admit_stream, job))

    async def _admit_stream(self, job: Job) -> None:
        try:
            await self._admit_async(job, wait=True)
        except CancelledError as exc:  # its session closed while it waited for room
            raise asyncio.CancelledError(*exc.args) from None

    # ------------------------------------------------------------ the steps

    def _new_job(
        self,
        fn: Callable[..., Any],
        model_name: str,
        args: Any,
        kwargs: Any,
        timeout: float | None,
        max_retries: int | None,
        priority: int | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Job:
        """A job from a caller's arguments (pickled now). ``loop``: made in a
        coroutine of that loop, which reads its result; its handle is an
        asyncio future of that loop. Unset options: this view's."""
        if type(args) is not tuple:
            if args is None:
                args = ()
            elif isinstance(args, (tuple, list)):
                args = tuple(args)
            else:
                raise TypeError(f"args must be a tuple or list, not {type(args).__name__}")
        if type(kwargs) is not dict:
            if kwargs is None:
                kwargs = {}
            elif isinstance(kwargs, Mapping):
                kwargs = dict(kwargs)
            else:
                raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
        options = self._options
        if priority is None:
            priority = options.priority or 0
        else:
            check_priority(priority)
        return self._engine.make_job(
            model_name, fn, args, kwargs,
            timeout=options.timeout if timeout is None else timeout,
            retries=options.max_retries if max_retries is None else max_retries,
            loop=loop, priority=priority, lane=self._tracker,
        )  # fmt: skip

    def _admission(self, job: Job, *, wait: bool, register: bool) -> Generator[Future, None, None]:
        """Admit ``job`` into the engine's queue: yields each future that
        resolves when the full queue has room (the driver waits on it or on the
        job's own handle, which a closing session cancels); returns once
        admitted. Raises CancelledError if the job was cancelled first."""
        tracker = self._tracker
        try:
            if tracker is not None:
                tracker.enter(job)
            while (room := self._engine.enqueue(job, wait=wait, register=register)) is not None:
                try:
                    yield room
                finally:
                    room.cancel()  # no one waits for it any more (a no-op once it resolved)
        except BaseException:
            if tracker is not None:
                tracker.leave(job)
            self._engine.discard(job)
            raise
        # Only a session cancels a job before it has an id: no tracker, no race.
        if tracker is not None and not tracker.admit(job):
            raise CancelledError(
                f"job {job.id} was cancelled (its session closed) while it waited for room in the queue"
            )

    def _admit_now(self, job: Job, *, wait: bool, register: bool = False) -> bool:
        """Admit ``job`` if the queue has room now and no session tracks it
        (the common case, without the steps of :meth:`_engine.admission`); False:
        admit it with :meth:`_admit` or :meth:`_admit_async`. Raises what
        they raise without waiting (PoolFullError without ``wait``...)."""
        if self._tracker is not None:
            return False
        room = self._engine.enqueue(job, wait=wait, register=register)
        if room is None:
            return True
        room.cancel()  # the slow path asks again, and waits
        return False

    def _admit(self, job: Job, *, wait: bool, register: bool = False, blocking: tuple[str, str] | None = None) -> None:
        """Admit ``job``, waiting for room in this thread. ``blocking``: the
        caller's method and its async twin, named in the warning if this waits
        on the thread of a running event loop."""
        if self._admit_now(job, wait=wait, register=register):
            return
        handle = concurrent_future(job)
        steps = self._admission(job, wait=wait, register=register)
        try:
            for room in steps:
                if blocking is not None:
                    warn_if_loop_blocked(*blocking, stacklevel=4)
                if not wait_any([room, handle], remaining(job)):
                    raise no_room(job)
        finally:
            steps.close()

    async def _admit_async(self, job: Job, *, wait: bool, register: bool = False) -> None:
        """:meth:`_admit` for a coroutine (hot paths try :meth:`_admit_now` first)."""
        handle: Future | asyncio.Future = job.afut if job.afut is not None else concurrent_future(job)
        steps = self._admission(job, wait=wait, register=register)
        try:
            for room in steps:
                if not await wait_any_async([room, handle], remaining(job)):
                    raise no_room(job)
        finally:
            steps.close()
