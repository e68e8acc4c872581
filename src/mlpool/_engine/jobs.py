"""The parent-side job record and how its caller is told the outcome.

A :class:`Job` lives in the parent only (the wire carries ``Run``: ids and
bytes). Its caller waits on one of two handles:

- a :class:`concurrent.futures.Future` (``submit``, ``create_job``), or
- an :class:`asyncio.Future` on the caller's loop (``score_async``), so the
  manager can settle every result of one wake-up that belongs to a loop with
  a single ``call_soon_threadsafe`` instead of one per job.

A job made in a coroutine may get a concurrent Future as well, later
(:meth:`ProcessEngine.share`): someone in another thread or loop waits for it (a job
id made with ``create_job_async``). Its outcome then goes to both handles: the
asyncio one first, then the Future, read again after, so a Future attached
while the outcome is on its way is settled all the same. An asyncio handle
whose loop is not running (stopped, closed) is settled from the settling
thread: no callback of that loop would ever run.

The manager decides outcomes under its lock and settles handles after
releasing it (:func:`settle`): user callbacks never run under our lock.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED as _CANCELLED
from functools import partial
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from mlpool._engine.results import PickledResult
from mlpool.errors import MLPoolError, SerializationError

if TYPE_CHECKING:
    from mlpool._engine.batching import BatchPolicy
    from mlpool._engine.regions import ForeignRegion, Payload, Region
    from mlpool._engine.streams import StreamChannel
    from mlpool._engine.tracing import JobTrace
    from mlpool._processes.workers import WorkerHandle

logger = logging.getLogger(__name__)

# A job expected to run shorter than this may wait behind others in a worker.
PIPELINE_BUDGET = 0.001


class JobOwner(Protocol):
    """What a job's future calls back into (the engine)."""

    def cancel(self, job: Job, *, interrupt: bool = False) -> bool: ...

    def before_blocking(self) -> None: ...


class ResultFuture(Future):
    """A :class:`concurrent.futures.Future` of a job's result, which arrives
    pickled (see ``_engine.results``): unpickled by the first thread that
    asks for it with :meth:`result` or :meth:`exception`. A result that
    cannot be unpickled is that future's exception."""

    def result(self, timeout: float | None = None) -> Any:
        value = super().result(timeout)
        return value.open() if type(value) is PickledResult else value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = super().exception(timeout)
        value = self._result  # set before the state changed, read after: no lock needed
        if error is None and type(value) is PickledResult:
            try:
                value.open()
            except SerializationError as exc:
                return exc
        return error


class JobFuture(ResultFuture):
    """The caller's :class:`concurrent.futures.Future` of one job.

    Cancelling it frees the job's place in the queue at once (the engine
    hears of it). A thread that blocks on it first gives back any worker
    pipe its own event loop was reading: that loop cannot read while it
    waits. Done-callbacks settled by the manager thread run on the engine's
    callback thread (see :class:`CallbackRunner`), never on the thread that
    alone reads the pipes.
    """

    def __init__(self, job: Job, owner: JobOwner) -> None:
        super().__init__()
        self._job: Job | None = job  # cleared when settled: no cycle outlives the job
        self._owner = owner
        self._callbacks: list[Callable[[Future], object]] | None = []  # None once run

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        job, self._job = self._job, None
        if job is not None:
            try:
                self._owner.cancel(job)
            except MLPoolError:  # a process forked from the pool's: the job is the parent's
                pass
        self.run_callbacks(None)
        return True

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        with self._condition:
            callbacks = self._callbacks
            if callbacks is not None and not super().done():
                callbacks.append(fn)
                return
        _call(fn, self)  # done already: now, in this thread, as Future does

    def run_callbacks(self, runner: CallbackRunner | None) -> None:
        """Once the future is done: run its callbacks here, or on ``runner``."""
        if not self._callbacks:  # none came before it was done, and none can come now
            return
        with self._condition:
            callbacks, self._callbacks = self._callbacks, None
        if not callbacks:
            return
        if runner is not None:
            runner.run(self, callbacks)
        else:
            for fn in callbacks:
                _call(fn, self)

    def result(self, timeout: float | None = None) -> Any:
        if running_loop() is not None and not self.done():
            self._owner.before_blocking()
        value = Future.result(self, timeout)
        return value.open() if type(value) is PickledResult else value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if running_loop() is not None and not self.done():
            self._owner.before_blocking()
        return super().exception(timeout)


def _call(fn: Callable[[Future], object], future: Future) -> None:
    try:
        fn(future)
    except Exception:
        logger.exception("exception calling callback for %r", future)


class JobState(enum.Enum):
    NEW = "new"  # created, not admitted yet (it may wait for room in a full queue)
    QUEUED = "queued"  # in the parent's queue; cancelling it means it never runs
    RUNNING = "running"  # sent to a worker
    FINISHED = "finished"  # outcome decided (result, error, cancelled, timed out)

    moves: tuple[JobState, ...]  # where a job may go from this state (see Job.to)


# A tuple per state, not a dict of sets: an Enum's hash is a Python call, and
# Job.to runs two or three times per job.
# Admitted into the queue, sent at once to an idle worker, or refused or cancelled before.
JobState.NEW.moves = (JobState.QUEUED, JobState.RUNNING, JobState.FINISHED)
JobState.QUEUED.moves = (JobState.RUNNING, JobState.FINISHED)
# Back to the queue when it never started (its worker died first, its pipe broke).
JobState.RUNNING.moves = (JobState.QUEUED, JobState.FINISHED)
JobState.FINISHED.moves = ()


class Job:
    """One scoring call, from submission to outcome."""

    __slots__ = (
        "id", "key", "model", "fn_id", "fn_pickle", "payload", "future", "loop", "afut",
        "deadline", "retries_left", "state", "worker", "future_running", "estimate",
        "submitted_at", "fn_name", "batch_policy", "batch_id", "result_offer", "priority", "lane", "fetcher",
        "stream", "trace",
    )  # fmt: skip
    # A pool host's job (``_shared.relay.RelayJob``): its outcome goes to the API
    # process that made it as the worker sent it, neither mapped nor unpickled here.
    forwarded: ClassVar[bool] = False

    def __init__(
        self,
        job_id: int,
        model: str,
        fn_id: int,
        fn_pickle: bytes,
        payload: Payload,
        fn_name: str,
        *,
        deadline: float | None,
        retries: int,
        loop: asyncio.AbstractEventLoop | None = None,
        batch_policy: BatchPolicy | None = None,
        owner: JobOwner | None = None,
        priority: int = 0,
        lane: object | None = None,
    ) -> None:
        self.id = job_id
        self.key: str | None = None  # the string id of the job-id API
        self.model = model
        self.fn_id = fn_id
        self.fn_pickle = fn_pickle
        self.payload = payload
        self.fn_name = fn_name
        self.deadline = deadline
        self.retries_left = retries
        # Changed only through to(), under the engine's lock. RUNNING: ``worker``
        # holds it (in its ``inflight``); QUEUED: in the Scheduler, ``worker`` None.
        self.state = JobState.NEW
        self.worker: WorkerHandle | None = None  # who holds it, set by WorkerHandle.assign
        self.future_running = False
        self.estimate = 0.0  # seconds it is expected to run: its share of its worker's backlog
        self.submitted_at = time.monotonic()
        self.batch_policy = batch_policy  # set for a batched function's job
        self.batch_id: int | None = None  # while running: the id shared by its batch
        self.result_offer: Region | ForeignRegion | None = None  # shared memory offered for its result
        self.priority = priority  # higher runs first (see _scheduler)
        self.lane = lane  # its session's token (None: outside any session); lanes take turns
        self.stream: StreamChannel | None = None  # a stream's items (pool.stream, see _streams)
        self.trace: JobTrace | None = None  # set when the caller traces (see _tracing)
        self.loop = loop
        # A get_result_async of the job's own loop waiting for its outcome:
        # woken by the call that settles it (see _settle_async).
        self.fetcher: asyncio.Future | None = None
        if loop is None:
            self.future: Future | None = ResultFuture() if owner is None else JobFuture(self, owner)
            self.afut: asyncio.Future | None = None
        else:
            self.future = None
            self.afut = loop.create_future()

    def __repr__(self) -> str:
        return f"<job {self.id} {self.fn_name} on {self.model!r} {self.state.value}>"

    def to(self, new: JobState) -> None:
        """Move to ``new`` (under the engine's lock); a RuntimeError if a job
        may not go there from its state (a bug in mlpool: an outcome decided
        twice, a finished job queued again)."""
        if new not in self.state.moves:
            raise RuntimeError(f"mlpool internal error: job {self.id} cannot go from {self.state.value} to {new.value}")
        self.state = new

    def mark_running(self) -> bool:
        """Move the caller's handles to running; False if the caller cancelled it."""
        if self.afut is not None and self.afut.done():  # cancelled by its task
            return False
        if self.future is not None and not self.future_running:
            if not self.future.set_running_or_notify_cancel():
                return False
            self.future_running = True
        return True


def shared_future(job: Job) -> Future:
    """``job``'s concurrent Future, attached now if it has none (a job made in
    a coroutine): settled with the same outcome as its asyncio handle (see
    :func:`settle`). Call under the engine's lock."""
    future = job.future
    if future is None:
        future = job.future = ResultFuture()
        if job.state is JobState.RUNNING:
            future.set_running_or_notify_cancel()
            job.future_running = True
    return future


class Outcome(NamedTuple):
    """What a job ended with, handed to its caller by :func:`settle`: its
    result (``ok``), its exception, or ``cancelled``. Until decoded (see
    ``_engine.outcomes``), ``value`` may be the worker's raw Done or Failed;
    after, a result from a worker is a ``PickledResult`` its caller opens."""

    job: Job
    ok: bool
    value: Any
    cancelled: bool = False


# ``new_outcome((job, ok, value, cancelled))``: an Outcome without the Python
# frame of a NamedTuple's ``__new__`` (two per job on the hot path).
new_outcome = partial(tuple.__new__, Outcome)


def settle(outcomes: list[Outcome], callbacks: CallbackRunner | None = None) -> None:
    """Give each caller its outcome.

    Call without holding any lock. Results for asyncio callers are grouped
    per loop into one ``call_soon_threadsafe``. With ``callbacks`` (on the
    thread that reads the pipes), done-callbacks run on the runner's thread
    instead of this one: a callback may wait on the pool.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        job = outcome.job
        if job.stream is not None:  # its end, from here: the loop that made it may have stopped
            job.stream.end(outcome)
        if job.afut is not None:
            by_loop.setdefault(job.loop, []).append(outcome)  # type: ignore[arg-type]
            continue
        future = job.future
        assert future is not None
        _settle_future(future, outcome)
        if type(future) is JobFuture:
            future._job = None
            future.run_callbacks(callbacks)
    here = running_loop()
    for loop, items in by_loop.items():
        if loop is here:  # settled by the loop's own reader: no thread hop
            _settle_async(items)
            continue
        if loop.is_running():
            try:
                loop.call_soon_threadsafe(_settle_async, items)
                continue
            except RuntimeError:  # closed meanwhile
                pass
        # Stopped or closed: its callbacks would never run. Settled here, the
        # outcome can still be read (a job id fetched after asyncio.run returned).
        _settle_async(items)


def _settle_async(items: list[Outcome]) -> None:
    """In the caller's event loop (or any thread, if that loop is not running)."""
    for outcome in items:
        job = outcome.job
        afut = job.afut
        assert afut is not None
        if not afut.done():
            try:
                if outcome.cancelled:
                    afut.cancel()
                elif outcome.ok:
                    afut.set_result(outcome.value)
                else:
                    afut.set_exception(outcome.value)
            except RuntimeError:  # a closed loop cannot schedule its callbacks; the outcome is set
                pass
            if not outcome.ok and not outcome.cancelled and (job.key is not None or job.stream is not None):
                afut.exception()  # read through the registry or the stream: no "exception was never retrieved" log
        fetcher = job.fetcher
        if fetcher is not None and not fetcher.done():
            fetcher.set_result(None)
        if job.future is not None:  # read after the asyncio handle: see ProcessEngine.share
            _settle_future(job.future, outcome)


def _settle_future(future: Future, outcome: Outcome) -> None:
    try:
        if outcome.cancelled:
            if Future.cancel(future):
                _notify_cancelled(future)
            else:  # already running: tell waiters all the same
                future.set_exception(CancelledError())
        elif outcome.ok:
            future.set_result(outcome.value)
        else:
            future.set_exception(outcome.value)
    except InvalidStateError:  # the caller cancelled it meanwhile, or it was settled already
        pass


def _notify_cancelled(future: Future) -> None:
    """Move a cancelled Future on to CANCELLED_AND_NOTIFIED, as an executor
    does with a work item it skips: only then do ``concurrent.futures.wait``
    and ``as_completed`` count it as done. (Already so if the dispatcher
    skipped it: ``mark_running``.)"""
    with future._condition:
        if future._state == _CANCELLED:
            future.set_running_or_notify_cancel()


class CallbackRunner:
    """A thread that runs the done-callbacks of futures the manager thread settled.

    A callback runs in the thread that settles its future; one that calls
    the pool from there (``f.add_done_callback(lambda f: pool.score(...))``)
    would wait forever on the thread that alone reads the pipes. The future
    itself is settled at once (its waiters wake); only its callbacks wait
    their turn here. Started at the first such future; ends when the engine
    stops it, after the callbacks queued before.
    """

    def __init__(self) -> None:
        self._queue: SimpleQueue[tuple[Future, list[Callable[[Future], object]]] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, future: Future, callbacks: list[Callable[[Future], object]]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="mlpool-callbacks", daemon=True)
            self._thread.start()
        self._queue.put((future, callbacks))

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            future, callbacks = item
            for fn in callbacks:
                _call(fn, future)


def running_unit(inflight: deque[Job] | list[Job]) -> list[Job]:
    """The jobs a worker is running now: its first job, with its batch mates."""
    if not inflight:
        return []
    head = inflight[0]
    if head.batch_id is None:
        return [head]
    unit = []
    for job in inflight:
        if job.batch_id != head.batch_id:
            break
        unit.append(job)
    return unit


# The event loop running in this thread, or None (the C fast path of
# asyncio.get_running_loop, without the exception).
running_loop = asyncio.events._get_running_loop
