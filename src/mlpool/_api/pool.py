"""MLPool: the public facade. Validates input, delegates to the engine, owns no loop.

The pool's lifecycle is here; its job methods are :class:`~mlpool._api.jobapi.JobAPI`'s,
shared with :class:`~mlpool._api.session.Session`. The engine is the process
engine (``_engine.engine``) or, with ``nb_workers=0``, the inline one (``_engine.inline``).
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from mlpool._api.config import Model, PoolConfig, WorkerEnv
from mlpool._api.jobapi import JobAPI
from mlpool._api.loaders import check_loaders, check_reload
from mlpool._api.mainguard import check_main_guard
from mlpool._api.options import JobOptions
from mlpool._api.session import Session
from mlpool._api.waiting import warn_if_loop_blocked, warn_loop_blocked
from mlpool._engine.engine import ProcessEngine
from mlpool._engine.inline import InlineEngine
from mlpool._engine.state import PoolState, PoolStats
from mlpool._processes.stacks import STACKS_TIMEOUT
from mlpool._processes.supervisor import TERMINATE_GRACE
from mlpool._shared.client import SharedEngine
from mlpool._shared.spec import check_share

_JOIN_MARGIN = 10.0  # beyond a shutdown's own timeout and grace, for reaping
# A shutdown's timeout: a day is more than any drain needs, and waits past it overflow.
_MAX_SHUTDOWN_TIMEOUT = 86400.0


class MLPool(JobAPI):
    """A pool of worker processes that each load their models once and score jobs.

    Args:
        models_to_load: ``{model name: loader}``. Each worker calls every loader
            once, with no arguments, and keeps what it returns (it must not be
            None). Use :func:`functools.partial` to bind a path. A value may
            be a :class:`Model` (a loader with settings of its own): with
            ``workers=N``, the model has N workers of its own that load only
            it; the other models are loaded by every shared worker.
        nb_workers: shared worker processes (those that load the plain
            loaders). None: one per usable core (CPU affinity and cgroup
            quota, not the host's count), less one for the API process, less
            the models' own workers, at least one while a plain loader needs
            them (none when every model has its own workers). 0: no processes;
            jobs run in the calling thread, at submission, with the same API
            and errors (for an app's unit tests and debugger sessions; see
            ``_engine.inline``); a :class:`Model` is loaded once there too, its
            per-model settings (``max_queue_size``, ``job_timeout``,
            ``max_retries``) apply and its group settings (``workers``,
            ``worker_env``...) are checked but unused.
        worker_env: environment variables of the shared workers, set before
            their loaders run: a dict, or a callable of the worker's index
            (0..nb_workers-1) returning one (see :class:`Model`).
        result_ttl: seconds a finished job's result is kept for
            :meth:`get_result` before it is dropped.
        max_queue_size: jobs that may wait for a worker (None: 10,000).
            When full, submitting waits, or raises :class:`PoolFullError`
            with ``create_job(..., block_until_scheduled=False)``.
        job_timeout: default deadline of every job in seconds, counted from
            submission (None: no deadline). See :meth:`create_job`.
        max_retries: default number of times a job whose worker crashed is
            run again (user exceptions and timeouts are never retried).
        max_jobs_per_worker: replace a worker after this many jobs (None: never).
        max_memory_per_worker: replace a worker whose resident memory, checked
            after each job, passes this many bytes (None: never). Recycling is
            graceful: the replacement starts at once, the old worker finishes
            the jobs it holds, then stops; no job is lost. With
            ``share_models``, only the worker's private memory counts (the
            pages it does not share with the model template).
        threads_per_worker: cap on BLAS/OpenMP/PyTorch threads in each worker.
            None: usable cores // nb_workers, at least 1.
        share_models: load the models once, in a *template* process, and fork
            every worker from it (Linux and macOS): workers share the models'
            memory copy-on-write (N workers cost about one copy), and a
            worker that crashes, times out or is recycled is replaced in
            milliseconds, without loading anything. If the template dies the
            workers keep serving and a new template loads the models once.
            See "Sharing models" in docs/reference.md for the libraries that need
            care with fork (OpenMP, PyTorch threads).
        fork_with_threads: with ``share_models``, a loader that leaves Python
            threads running makes the pool refuse to start
            (:class:`ModelLoadError` naming each thread and where it was
            started): a fork copies only the forking thread, and a worker
            that needs the others hangs. True says those threads are not
            needed in the workers (fork anyway).
        start_method: how the workers (the template with ``share_models``)
            are started: ``"spawn"`` (default) or ``"forkserver"``.
        start_timeout: seconds a worker (or the model template) has to load
            the models, at start and when it is replaced. A replacement that
            takes longer is killed and counts as a failed start; 5 failed
            starts in a row break the pool (:class:`PoolBrokenError`).
        worker_nice: added to each worker's niceness (POSIX, 0-19). When the
            cores are saturated, the API process, which only needs a little
            CPU now and then, gets it at once instead of waiting for a
            worker's time slice: its event loop stays responsive. The workers
            still get every cycle the API process leaves. 0 disables.
        shared_memory_threshold: buffers of arguments and results this large or
            larger (NumPy arrays, pandas and PyArrow data, bytes-likes) cross in
            shared memory instead of the pipe (Linux; see ``_engine.regions``). None: never.
        shared_memory_limit: bytes of shared memory one message may use; a
            larger one goes through the pipe, with one log line. None: no limit.
        shared_memory_cache: bytes of idle shared memory the API process keeps
            for reuse (at most 16 regions; 256 MiB by default): a region
            kept costs no page faults the next time (a new 64 MB one costs
            about 20 ms to map and fill). What a burst leaves beyond this is
            given back to the system. 0 keeps none.
        backend: ``"local"`` (worker processes on this machine) or ``"ray"``:
            each worker is a Ray actor (Ray: the ``ray`` extra), on
            this machine or a cluster, behind the same scheduler and API.
            Each actor asks for ``threads_per_worker`` CPUs.
        ray_address: with ``backend="ray"``: None joins the Ray instance this
            process is connected to, or starts a local one (stopped at
            shutdown); ``"auto"`` or ``"ray://host:10001"`` joins a cluster.
        ray_options: extra ``actor.options(...)`` for each worker actor, such
            as ``{"resources": {"model-host": 1}}`` or ``{"memory": 2**30}``.
        stream_buffer, stream_buffer_bytes: how far the worker of a stream
            (:meth:`stream`) may run ahead of its consumer: at most this many
            items and bytes (always at least one item) produced and not yet
            taken; then its generator waits at its ``yield``.

    The constructor returns when every worker has loaded every model. A loader
    that raises (or returns None) makes it raise :class:`ModelLoadError` with
    the worker's traceback, after stopping every process it started. Called
    inside a running event loop, it returns at once instead: use
    ``async with MLPool(...)`` (or ``await pool.wait_ready()``), which waits
    without blocking the loop; jobs submitted before then wait in the queue.

    The job methods (``create_job``, ``get_result``, ``submit``, ``score``,
    their ``_async`` twins, ``cancel_job``) are those of
    :class:`~mlpool._api.jobapi.JobAPI`. Every method is safe to call from any
    thread. Create the pool under
    ``if __name__ == "__main__":`` (workers are spawned and import the main
    module).
    """

    def __init__(
        self,
        models_to_load: Mapping[str, Callable[[], Any] | Model],
        nb_workers: int | None = None,
        *,
        result_ttl: float = 300.0,
        max_queue_size: int | None = None,
        job_timeout: float | None = None,
        max_retries: int = 0,
        max_jobs_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        threads_per_worker: int | None = None,
        share_models: bool = False,
        fork_with_threads: bool = False,
        start_method: str | None = None,
        start_timeout: float = 600.0,
        worker_nice: int = 5,
        shared_memory_threshold: int | None = 65536,
        shared_memory_limit: int | None = None,
        shared_memory_cache: int = 256 * 2**20,
        backend: str = "local",
        ray_address: str | None = None,
        ray_options: dict[str, Any] | None = None,
        worker_env: WorkerEnv | None = None,
        stream_buffer: int = 16,
        stream_buffer_bytes: int = 8 * 2**20,
        share_across_processes: bool | str = False,
    ) -> None:
        loaders = check_loaders(models_to_load)
        options: dict[str, Any] = {
            "nb_workers": nb_workers,
            "threads_per_worker": threads_per_worker,
            "share_models": share_models,
            "fork_with_threads": fork_with_threads,
            "result_ttl": result_ttl,
            "max_queue_size": max_queue_size,
            "job_timeout": job_timeout,
            "max_retries": max_retries,
            "max_jobs_per_worker": max_jobs_per_worker,
            "max_memory_per_worker": max_memory_per_worker,
            "start_method": start_method,
            "start_timeout": start_timeout,
            "worker_nice": worker_nice,
            "shared_memory_threshold": shared_memory_threshold,
            "shared_memory_limit": shared_memory_limit,
            "shared_memory_cache": shared_memory_cache,
            "backend": backend,
            "ray_address": ray_address,
            "ray_options": ray_options,
            "models_to_load": models_to_load,
            "worker_env": worker_env,
            "stream_buffer": stream_buffer,
            "stream_buffer_bytes": stream_buffer_bytes,
        }
        self._config = PoolConfig.resolve(**options)
        share = check_share(share_across_processes, self._config)
        engine: _Engine
        if share:
            engine = SharedEngine(self._config, loaders, share, options)
        elif self._config.inline:
            engine = InlineEngine(self._config, loaders)
        else:
            if self._config.backend == "local":
                check_main_guard()
            engine = ProcessEngine(self._config, loaders)
        super().__init__(engine)
        self._manager = engine  # the same engine as self._engine, with its lifecycle methods
        engine.start()
        _track(engine)
        weakref.finalize(self, engine.shutdown, cancel_pending=False, timeout=30.0)
        if not _in_event_loop():
            self._wait_started()

    def __repr__(self) -> str:
        return f"<MLPool {self._manager.state.value} nb_workers={self._config.nb_workers}>"

    # ----------------------------------------------------------- lifecycle

    @property
    def nb_workers(self) -> int:
        """How many shared worker processes the pool keeps (those that load the
        plain loaders; a :class:`Model`'s own workers are not counted)."""
        return self._config.nb_workers

    @property
    def healthy(self) -> bool:
        """False once the pool is broken (see :class:`PoolBrokenError`) or shut down."""
        return self._manager.state in (PoolState.STARTING, PoolState.RUNNING)

    @property
    def ready(self) -> bool:
        """True while every worker has loaded its models and the pool serves jobs."""
        return self._manager.state is PoolState.RUNNING

    def stats(self) -> PoolStats:
        """A consistent snapshot of workers, queue and job counters."""
        return self._manager.stats()

    def worker_stacks(self, *, timeout: float = STACKS_TIMEOUT) -> dict[int, str]:
        """The Python stack of every thread of every worker, by worker pid.

        Taken while the jobs run, without stopping them: each worker's
        ``faulthandler`` writes its stacks into a pipe of its own when the pool
        sends it SIGUSR2. Blocks the calling thread for at most ``timeout``
        seconds (about a millisecond normally); a worker that does not answer
        in time (stopped, or its own code took SIGUSR2) gets a sentence saying
        so instead. Workers still loading their models are left out. With
        ``nb_workers=0`` (jobs run in the caller's threads) and
        ``backend="ray"`` (actors, perhaps on other machines: use ``ray stack``)
        it returns ``{}``.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ValueError(f"timeout must be a number of seconds in (0, 3600], got {timeout!r}")
        return self._manager.worker_stacks(timeout)

    def reload_models(
        self,
        models_to_load: Mapping[str, Callable[[], Any]] | None = None,
        *,
        timeout: float | None = None,
        surge: int = 1,
    ) -> None:
        """Roll a new version of the models out to every worker, one worker at
        a time per group, with no failed job and no loss of capacity.

        ``models_to_load``: None reruns every model's loader (a new file at the
        same path); a dict ``{name: loader}`` replaces the loaders of the models
        it names, each keeping its group and settings (an unknown name is an
        :class:`UnknownModelError`, and nothing changes). Only the groups that
        load a named model roll.

        With ``surge=1`` each new worker loads beside an old one, which is
        retired (no new jobs; stopped after those it holds) once the new one
        is ready: the pool never has fewer ready workers than it keeps, and at
        most one more process per group. ``surge=0`` retires first (one fewer
        worker per group while each loads), for hosts without memory for one
        more. With ``share_models``, a new template loads the new version once
        and the new workers are forked from it; the old template ends with
        its last worker.

        Returns when every worker of every affected group serves the new
        version and the old ones have exited: jobs made after that run on the
        new version; jobs made during it run on either, and a job never sees
        its model change. ``stats().models[name].version`` goes up by one.

        Raises :class:`ModelLoadError` (with the loader's traceback) if the new
        version raises, crashes, or is not loaded within ``timeout`` seconds
        (None: ``start_timeout``) on its first worker: the half-started
        processes are gone and the old version serves on every worker. (A new
        worker that fails after the first one loaded is retried; 5 failures in
        a row end the reload with ModelLoadError, the workers not yet rolled
        keeping the old version.) A second call waits for the first reload to
        finish, then runs; ``shutdown()`` ends a reload with
        :class:`PoolClosedError`. An interrupted wait (Ctrl-C) leaves the
        reload running. With ``nb_workers=0`` the loaders run in this thread
        and the new models are swapped in between jobs.
        """
        loaders = check_reload(models_to_load, self._manager.models, timeout, surge)
        if not self._config.inline:
            warn_if_loop_blocked("reload_models", "reload_models_async", stacklevel=3)
        self._manager.reload(loaders, timeout=timeout, surge=surge).result()

    async def reload_models_async(
        self,
        models_to_load: Mapping[str, Callable[[], Any]] | None = None,
        *,
        timeout: float | None = None,
        surge: int = 1,
    ) -> None:
        """:meth:`reload_models`, awaited without blocking the event loop. A
        cancelled await leaves the reload running."""
        loaders = check_reload(models_to_load, self._manager.models, timeout, surge)
        if self._config.inline:  # the loaders run in the calling thread: not the loop's
            future = await asyncio.to_thread(self._manager.reload, loaders, timeout=timeout, surge=surge)
        else:
            future = self._manager.reload(loaders, timeout=timeout, surge=surge)
        await asyncio.shield(asyncio.wrap_future(future))

    def _wait_started(self) -> None:
        try:
            self._manager.started.result(timeout=self._config.start_timeout + _JOIN_MARGIN)
        except BaseException:
            self._shutdown(True, True, 5.0)  # __enter__ warned already, or no loop runs here
            raise

    async def wait_ready(self) -> None:
        """Wait, without blocking the event loop, until every worker is ready.

        Raises :class:`ModelLoadError` (after stopping the workers) if a loader fails.
        """
        try:
            await asyncio.wrap_future(self._manager.started)
        except BaseException:
            await self.shutdown_async(cancel_pending=True, timeout=5.0)
            raise

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float = 30.0) -> None:
        """Stop the pool. Idempotent; safe from any thread.

        New jobs are refused at once (:class:`PoolClosedError`). Queued and
        running jobs finish, or with ``cancel_pending`` queued ones are
        cancelled. Then each worker is asked to stop. After ``timeout``
        seconds (finite, >= 0: else ValueError, and nothing changes), what
        still runs is killed and its jobs fail with :class:`PoolClosedError`.
        With ``wait``, returns once every worker process is reaped; called
        so in a coroutine (a running event loop in this thread) it blocks
        that loop meanwhile: a RuntimeWarning, once per call site, names
        :meth:`shutdown_async` (not when the pool has already finished).
        """
        _check_shutdown_timeout(timeout)
        if wait and not self._config.inline and not self._manager.finished.done():
            warn_if_loop_blocked("shutdown", "shutdown_async", stacklevel=3)
        self._shutdown(wait, cancel_pending, timeout)

    def _shutdown(self, wait: bool, cancel_pending: bool, timeout: float) -> None:
        """:meth:`shutdown` without its warning: for callers that gave their own."""
        self._manager.shutdown(cancel_pending=cancel_pending, timeout=timeout)
        if wait:
            self._manager.join(timeout + TERMINATE_GRACE + _JOIN_MARGIN)

    async def shutdown_async(self, *, cancel_pending: bool = False, timeout: float = 30.0) -> None:
        """:meth:`shutdown` with ``wait=True``, awaited without blocking the loop."""
        _check_shutdown_timeout(timeout)
        self._manager.shutdown(cancel_pending=cancel_pending, timeout=timeout)
        await asyncio.wait_for(
            asyncio.shield(asyncio.wrap_future(self._manager.finished)), timeout + TERMINATE_GRACE + _JOIN_MARGIN
        )

    def __enter__(self) -> MLPool:
        """Wait until every worker is ready (ModelLoadError if a loader fails).

        In a coroutine (a running event loop in this thread), it blocks that
        loop while the workers load, and ``__exit__`` while they stop: a
        RuntimeWarning, once per call site, names ``async with``.
        """
        if not self._config.inline and _in_event_loop():  # inline: the models are loaded already
            warn_loop_blocked("`with MLPool(...)`", "`async with MLPool(...)`", stacklevel=2)
        self._wait_started()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._shutdown(True, False, 30.0)  # in a coroutine, __enter__ warned already

    async def __aenter__(self) -> MLPool:
        await self.wait_ready()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown_async()

    def session(
        self,
        *,
        interrupt: bool = False,
        priority: int | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
    ) -> Session:
        """A :class:`Session`: jobs submitted through it are cancelled together
        when it closes (``with`` / ``async with`` block, or ``close()``).

        For a WebSocket client: its unfinished jobs are cancelled when it goes
        away. With ``interrupt=True`` running ones also have their worker
        killed and replaced, which frees the CPU at once. Its jobs wait in a
        lane of their own: within a model, sessions (and the jobs outside
        any) take turns, so one client's backlog delays another's job by
        about one job per worker at most. ``priority``, ``timeout`` and
        ``max_retries`` apply to each of its jobs, as :meth:`options` does.
        """
        return Session(self._engine, interrupt=interrupt, options=_options(priority, timeout, max_retries))


def _options(priority: int | None, timeout: float | None, max_retries: int | None) -> JobOptions | None:
    if priority is None and timeout is None and max_retries is None:
        return None
    return JobOptions.checked(priority, timeout, max_retries)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_Engine = ProcessEngine | InlineEngine | SharedEngine
_live: weakref.WeakSet[_Engine] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False


def _track(manager: _Engine) -> None:
    """Shut the pool down at interpreter exit if its owner did not."""
    global _atexit_registered
    with _atexit_lock:
        _live.add(manager)
        if not _atexit_registered:
            # Registered after multiprocessing's own exit hook, so it runs
            # before it (which joins the processes in its table of children:
            # the pool's are kept out of it, see _workers.untrack). Its hook
            # is registered when multiprocessing.util is first imported,
            # which the manager thread may not have done yet: import it here, first.
            import multiprocessing.util  # noqa: F401

            atexit.register(_shutdown_all)
            _atexit_registered = True


def _shutdown_all() -> None:
    managers = list(_live)
    for manager in managers:
        manager.shutdown(cancel_pending=True, timeout=5.0)
    for manager in managers:
        manager.join(5.0 + TERMINATE_GRACE + _JOIN_MARGIN)


def _check_shutdown_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not (0 <= timeout <= _MAX_SHUTDOWN_TIMEOUT):  # also refuses nan
        raise ValueError(f"timeout must be between 0 and {_MAX_SHUTDOWN_TIMEOUT:g} seconds, got {timeout!r}")
