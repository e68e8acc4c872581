"""``nb_workers=0``: the pool's API with no processes, for users' own tests.

Models load once, in the calling process, when the pool is created. Each job
runs in the thread that submits it, at submission, one at a time, and goes
through the same checks as with workers: arguments and results are pickled
(so what would fail to cross a pipe fails here too), errors cross the same
boundary as a worker's (user exceptions come back as themselves with their
traceback as ``__cause__``; ``SystemExit``, ``KeyboardInterrupt`` and other
BaseExceptions become an :class:`MLPoolError` naming them), and job ids,
``get_result``, ``cancel_job``, result expiry and shutdown behave the same.

:class:`InlineEngine` answers the facade's calls as the process engine does,
and owns nothing it does not use: no thread, no selector, no pipe, no
subreaper flag (``share_models`` has nothing to fork here). Results expire
after ``result_ttl`` without a thread: each call into the engine first drops
the results whose time passed (oldest first, no scan), so an expired id is
unknown to ``get_result`` and absent from ``stats()``.

What cannot be had without a process: a job's ``timeout`` cannot interrupt
it (it is not enforced), and ``score_async`` blocks the event loop while the
job runs.
"""

from __future__ import annotations

import pickle
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from typing import Any

from mlpool._api.config import PoolConfig
from mlpool._engine.jobmaker import JobMaker
from mlpool._engine.jobs import Job, JobState, Outcome, settle, shared_future
from mlpool._engine.metrics import LatencyRecorder, ModelRecorders
from mlpool._engine.registry import Settled, new_job_key
from mlpool._engine.state import PoolState, PoolStats, refusal
from mlpool._engine.streams import StreamChannel
from mlpool._engine.tracing import end as end_trace
from mlpool._wire.protocol import Item
from mlpool._wire.serialization import dumps, pack_exception, unpack_exception
from mlpool.errors import MLPoolError, ModelLoadError, PoolClosedError, RemoteError

_OUTCOMES = ("completed", "failed", "cancelled")


class InlineEngine:
    """The engine of ``nb_workers=0``: its only "worker" is the submitting thread."""

    def __init__(self, config: PoolConfig, loaders: dict[str, Callable[[], Any]]) -> None:
        self.config = config
        self.models = frozenset(loaders)
        self._loaders = loaders
        self._maker = JobMaker(config, loaders)
        self.make_job = self._maker.make
        self._models: dict[str, Any] = {}
        self._versions = dict.fromkeys(loaders, 1)  # model -> its version (reload)
        self._reload_lock = threading.Lock()  # one reload at a time
        self._functions: dict[int, Callable] = {}
        self._run_lock = threading.Lock()  # one job at a time, as in one worker
        self._lock = threading.Lock()
        # --- under the lock ---
        self._state = PoolState.STARTING
        self._registry: dict[str, Job] = {}
        self._expiring: OrderedDict[str, float] = OrderedDict()  # key -> expiry, in finishing order
        self._counts = dict.fromkeys(_OUTCOMES, 0)
        self._latency = LatencyRecorder()
        self._per_model = ModelRecorders(config.model_groups(), self._latency)
        self.started: Future[None] = Future()
        self.finished: Future[None] = Future()

    @property
    def state(self) -> PoolState:
        return self._state

    def start(self) -> None:
        """Load every model in this thread; ``started`` tells how it went."""
        try:
            self._models = _load(self._loaders)
        except ModelLoadError as error:
            with self._lock:
                self._state = PoolState.BROKEN
            self.started.set_exception(error)
            self.finished.set_result(None)
            return
        with self._lock:
            if self._state is PoolState.STARTING:
                self._state = PoolState.RUNNING
        self.started.set_result(None)

    def reload(
        self, loaders: dict[str, Callable[[], Any]] | None, *, timeout: float | None, surge: int
    ) -> Future[None]:
        """Load the new version in this thread (one reload at a time), then
        swap it in between jobs: a job holds the model it started with. A
        done future; ModelLoadError (nothing changes) if a loader fails.
        ``timeout`` and ``surge`` have no process to apply to."""
        future: Future[None] = Future()
        with self._reload_lock:
            current = dict(self._loaders)
            chosen = current if loaders is None else {**current, **loaders}
            try:
                fresh = _load({name: chosen[name] for name in (current if loaders is None else loaders)})
            except ModelLoadError as error:
                future.set_exception(error)
                return future
            with self._lock:
                if (refused := refusal(self._state)) is not None:
                    future.set_exception(refused)
                    return future
                self._models = {**self._models, **fresh}  # one reference swap: a running job keeps its model
                self._loaders = chosen
                for name in fresh:
                    self._versions[name] += 1
        future.set_result(None)
        return future

    # ---------------------------------------------------------------- jobs

    def discard(self, job: Job) -> None:
        """Nothing to give back: an inline job's arguments are in private memory."""

    def enqueue(self, job: Job, *, wait: bool, register: bool = False) -> None:
        """Run ``job`` now, in this thread; the queue is never full here."""
        with self._lock:
            self._expire(time.monotonic())
            if job.state is not JobState.NEW:  # cancelled before it was admitted
                return None
            if self._state is not PoolState.RUNNING:
                raise refusal(self._state) or PoolClosedError("the pool has not finished loading its models")
            if register:
                job.key = new_job_key()
                self._registry[job.key] = job
            if not job.mark_running():
                self._cancelled(job)
                return None
            job.to(JobState.RUNNING)
            if job.stream is not None:  # runs item by item as its consumer asks (_pump)
                job.stream.pump = partial(self._pump, job)
                return None
        ok, value, seconds = self._execute(job)
        if job.trace is not None:
            end_trace(job, None, ok, value, "completed" if ok else "failed")
        with self._lock:
            finished = job.state is JobState.RUNNING  # not cancelled meanwhile
            if finished:
                self._finish(job, ok, value, seconds)
        if finished:
            settle([Outcome(job, ok, value)])
        return None

    def _execute(self, job: Job) -> tuple[bool, Any, float]:
        """Run the job's function as a worker would; (ok, result or error, seconds)."""
        with self._run_lock:
            started = time.perf_counter()
            try:
                fn = self._functions.get(job.fn_id)
                if fn is None:
                    fn = self._functions[job.fn_id] = pickle.loads(job.fn_pickle)
                args, kwargs = job.payload.loads("the job's arguments")
                model = self._models[job.model]
                if job.batch_policy is not None:
                    results = list(fn(model, [args[0]]))
                    if len(results) != 1:
                        raise MLPoolError(
                            f"batched function {job.fn_name} returned {len(results)} results for 1 item; "
                            "it must return exactly one result per item, in order"
                        )
                    result = results[0]
                else:
                    result = fn(model, *args, **kwargs)
                del args, kwargs
                value = pickle.loads(dumps(result, f"the result of {job.fn_name}"))
                return True, value, time.perf_counter() - started
            except BaseException as exc:  # the boundary a worker has: nothing ends the caller's thread
                seconds = time.perf_counter() - started
                return False, _as_caller_error(exc, job), seconds

    # -------------------------------------------------------------- streams

    def _pump(self, job: Job) -> None:
        """A stream's next item, made in the consumer's thread as a worker
        would make it (pickled both ways), or its end."""
        channel = job.stream
        assert channel is not None
        outcome = None
        with self._run_lock:
            settled_elsewhere = job.state is not JobState.RUNNING
            if not settled_elsewhere:
                outcome = self._next_item(job, channel)
        if settled_elsewhere:  # cancelled: the thread that did it settles it, which ends the channel
            channel.wait()
            return
        if outcome is not None:
            with self._lock:
                finished = job.state is JobState.RUNNING
                if finished:
                    self._finish(job, *outcome)
            if finished:  # settle ends the channel; else the thread that cancelled it does
                settle([Outcome(job, *outcome)])

    def _next_item(self, job: Job, channel: StreamChannel) -> tuple[bool, Any] | None:
        """Push the stream's next item (under the run lock); its outcome once it ended."""
        try:
            if channel.source is None:
                channel.source = self._start_stream(job)
            item = next(channel.source, _END)
            if item is _END:
                return True, None
            channel.push(Item(job.id, dumps(item, f"an item of {job.fn_name}")))
            return None
        except BaseException as exc:  # the boundary a worker has
            _close_source(channel)
            return False, _as_caller_error(exc, job)

    def _start_stream(self, job: Job) -> Iterator:
        fn = self._functions.get(job.fn_id)
        if fn is None:
            fn = self._functions[job.fn_id] = pickle.loads(job.fn_pickle)
        args, kwargs = job.payload.loads("the stream's arguments")
        produced = fn(self._models[job.model], *args, **kwargs)
        try:
            return iter(produced)
        except TypeError:
            raise TypeError(
                f"{job.fn_name} was called by pool.stream, which iterates what it returns, but it returned "
                f"{type(produced).__name__}, which is not iterable; make it a generator function (yield each item)"
            ) from None

    def send_control(self, job: Job, msg: Any) -> None:
        pass  # the consumer runs the generator itself: no credit needed

    def read_item(self, job: Job, item: Item) -> Any:
        return pickle.loads(item.data)

    def call_soon(self, fn: Callable[[], object]) -> None:
        fn()

    def before_blocking(self) -> None:
        pass

    def run_direct(self, job: Job) -> bool:
        return False  # no pipe to lend: the facade enqueues, which runs it

    def cancel(self, job: Job, *, interrupt: bool = False) -> bool:
        """True if ``job`` will never report an outcome (a running one's result
        is discarded; a stream's generator is closed)."""
        with self._lock:
            if job.state is JobState.FINISHED:
                return False
            self._cancelled(job)
        if job.stream is not None:
            with self._run_lock:
                _close_source(job.stream)
        settle([Outcome(job, False, None, cancelled=True)])
        return True

    def _cancelled(self, job: Job) -> None:
        job.to(JobState.FINISHED)
        self._counts["cancelled"] += 1

    def _finish(self, job: Job, ok: bool, value: Any, seconds: float | None = None) -> None:
        """Record ``job``'s outcome (under the lock); the caller settles it after."""
        job.to(JobState.FINISHED)
        now = time.monotonic()
        self._counts["completed" if ok else "failed"] += 1
        self._latency.observe(now - job.submitted_at, seconds)
        self._per_model.observe(job.model, now - job.submitted_at, ok)
        if job.key is not None:
            self._expiring[job.key] = now + self.config.result_ttl

    def share(self, job: Job) -> Future:
        """A concurrent Future of ``job``'s outcome (see ``ProcessEngine.share``)."""
        with self._lock:
            return shared_future(job)

    def reclaim_stopped_loans(self) -> None:
        pass  # no pipe is ever lent: a job's outcome is known when enqueue returns

    def lookup(self, key: str) -> Job | None:
        with self._lock:
            self._expire(time.monotonic())
            return self._registry.get(key)

    def forget(self, key: str, job: Job | Settled) -> bool:
        """Drop a fetched or cancelled job from the registry; False if already gone."""
        with self._lock:
            if self._registry.get(key) is not job:
                return False
            del self._registry[key]
            self._expiring.pop(key, None)
            return True

    def _expire(self, now: float) -> None:
        """Drop results whose result_ttl passed (under the lock; oldest first, no scan)."""
        expiring = self._expiring
        while expiring:
            key, expiry = next(iter(expiring.items()))
            if expiry > now:
                break
            del expiring[key]
            self._registry.pop(key, None)

    # ----------------------------------------------------------- lifecycle

    def shutdown(self, *, cancel_pending: bool, timeout: float) -> None:
        """Refuse new jobs; a job running in another thread finishes. Idempotent."""
        with self._lock:
            if self._state is not PoolState.BROKEN:
                self._state = PoolState.CLOSED
        if not self.started.done():
            self.started.set_exception(PoolClosedError("the pool was shut down before it finished starting"))
        if not self.finished.done():
            self.finished.set_result(None)

    def join(self, timeout: float | None) -> bool:
        return True

    def worker_stacks(self, timeout: float) -> dict[int, str]:
        """No worker processes: jobs run in the callers' own threads."""
        return {}

    def stats(self) -> PoolStats:
        with self._lock:
            self._expire(time.monotonic())
            counts = self._counts
            return PoolStats(
                state=self._state.value,
                workers_alive=0,
                workers_busy=0,
                queue_depth=0,
                jobs_running=0,
                jobs_completed=counts["completed"],
                jobs_failed=counts["failed"],
                jobs_crashed=0,
                jobs_timed_out=0,
                jobs_cancelled=counts["cancelled"],
                jobs_retried=0,
                worker_restarts=0,
                workers_recycled=0,
                results_unfetched=len(self._expiring),
                **self._latency.stats_fields(),
                models=self._per_model.stats(
                    lambda model: 0, (), counts, {}, {}, {m: (v, {}) for m, v in self._versions.items()}
                ),
            )


_END = object()


def _load(loaders: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run each loader here: the models by name, or a ModelLoadError naming the one that failed."""
    models, name = {}, ""
    try:
        for name, loader in loaders.items():
            model = loader()
            if model is None:
                raise ValueError(f"the loader of model {name!r} returned None; it must return the model")
            models[name] = model
    except Exception as exc:
        tb = traceback.format_exc()
        raise ModelLoadError(f"failed to load model {name!r}: {type(exc).__name__}: {exc}\n{tb}",
                             model_name=name, remote_traceback=tb) from None  # fmt: skip
    return models


def _close_source(channel: StreamChannel) -> None:
    """Close an inline stream's generator (its ``finally`` runs); errors there are dropped."""
    source, channel.source = channel.source, None
    close = getattr(source, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def _as_caller_error(exc: BaseException, job: Job) -> Exception:
    """The error a worker would send for ``exc``, as the caller receives it."""
    data, tb = pack_exception(exc)
    error = unpack_exception(data, tb)
    if isinstance(error, Exception):
        return error
    # A SystemExit or KeyboardInterrupt must not end the caller's thread or loop.
    wrapped = RemoteError(
        f"{job.fn_name} raised {type(error).__name__}: {error}",
        type_name=f"{type(error).__module__}.{type(error).__qualname__}",
    )
    wrapped.__cause__ = error.__cause__
    return wrapped
