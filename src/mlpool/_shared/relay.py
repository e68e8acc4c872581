"""The pool host's side of one API process: its jobs into the host's engine, their outcomes back.

::

    API process ─ SUBMIT ─► Relay (its thread) ─► a RelayJob: the arguments' file and
                                                  the offered room as they came (never
                                                  mapped here), its process as its lane
                                                  ─► the host's engine: queue, worker
    API process ◄─ DONE/FAILED/ERROR/GONE/END ── the job's future settles (any thread)
                ◄─ ITEM ─────────────────────── a stream's item (RelayChannel.push)

A job's outcome goes back as the worker sent it (``Job.forwarded``): the
result stays pickled, in the room the API process offered or in the
worker's own file, whose descriptor is passed on. The host neither maps nor
unpickles a result.

Fairness: every API process is one lane of the host's scheduler (its
sessions share it), so the processes take turns. Its share of the queue is
bounded by the API process itself (``_shared.client``); past the pool's own
bound the host holds the process's jobs, in order, until there is room.

When the API process goes (its socket closes: exit, crash, SIGKILL), its
queued jobs are dropped and its running ones cancelled (interrupted if their
session interrupts); their outcomes go nowhere.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from mlpool._engine.batching import BatchPolicy
from mlpool._engine.jobs import Job
from mlpool._engine.outcomes import ForwardedFailure
from mlpool._engine.regions import ForeignRegion, Payload
from mlpool._engine.streams import StreamChannel
from mlpool._shared.channel import Channel, Outbox, close_all
from mlpool._shared.protocol import ANSWER, CALL, CANCEL, CREDIT, DONE, END, ERROR, FAILED, GONE, ITEM, SUBMIT
from mlpool._shared.submissions import HOST_FUNCTIONS
from mlpool._wire.protocol import NEW_FILE, Credit, Done, Item, StreamEnd
from mlpool._wire.serialization import dumps_by_value

if TYPE_CHECKING:
    from mlpool._engine.engine import ProcessEngine


class Host(Protocol):
    """What a relay asks of its host (``_shared.host.Host``)."""

    engine: ProcessEngine
    now: Callable[[], float]

    def next_id(self) -> int: ...

    def next_function_id(self) -> int: ...

    def call(self, operation: str, arguments: tuple) -> Any: ...

    def ended(self, relay: Relay) -> None: ...

logger = logging.getLogger("mlpool.shared")

DIRECT_PATIENCE = 0.002  # seconds the relay's thread reads a quick job's worker before leaving it to the manager


class RelayJob(Job):
    """A job of an API process: its id there, and whether its session interrupts."""

    __slots__ = ("client_id", "interrupt")
    forwarded = True
    client_id: int
    interrupt: bool


class RelayChannel(StreamChannel):
    """A stream whose items go straight on to the API process consuming it
    (its credits come back from there: ``CREDIT``)."""

    __slots__ = ("_outbox", "_client_id")

    def __init__(self, outbox: Outbox, client_id: int, window_items: int, window_bytes: int) -> None:
        super().__init__(window_items, window_bytes)
        self._outbox = outbox
        self._client_id = client_id

    def push(self, item: Item) -> None:
        """Under the engine's lock: never blocks (the outbox queues)."""
        self.delivered += 1
        fds = [item.fd] if item.fd >= 0 else []
        self._outbox.put((ITEM, len(fds), self._client_id, item.data, item.spans, item.where), fds)


class Relay:
    """One API process's connection, served by a thread of its own."""

    def __init__(self, host: Host, channel: Channel, pid: int) -> None:
        self._host = host
        self._engine: ProcessEngine = host.engine
        self.channel = channel
        self.pid = pid
        self.outbox = Outbox(channel, f"mlpool-host-send-{pid}")
        self._lock = threading.Lock()
        self._jobs: dict[int, RelayJob] = {}  # by the API process's id, until answered
        self._held: deque[RelayJob] = deque()  # waiting for room in the pool's queue
        self._waiting_room = False
        self._ended = False
        # The API process sends a function's pickle the first time, and again once
        # both sides forgot it: the same LRU rule on both, in message order.
        self._functions: OrderedDict[int, tuple[int, bytes]] = OrderedDict()

    # ------------------------------------------------------------ reading

    def serve(self, first: list[tuple[tuple, list[int]]]) -> None:
        """Read and act until the API process goes; then drop what it left."""
        try:
            messages: list | None = first
            while messages is not None:
                for msg, fds in messages:
                    self._take(msg, fds)
                messages = self.channel.receive()
        except (OSError, ValueError) as exc:
            logger.debug("API process %d: connection ended: %r", self.pid, exc)
        except Exception:
            logger.exception("mlpool pool host: the connection of API process %d failed", self.pid)
        finally:
            self._end()

    def _take(self, msg: tuple, fds: list[int]) -> None:
        kind = msg[0]
        if kind == SUBMIT:
            self._submit(msg, fds)
        elif kind == CANCEL:
            job = self._jobs.get(msg[2])
            if job is not None:
                self._engine.cancel(job, interrupt=msg[3])
        elif kind == CREDIT:
            job = self._jobs.get(msg[2])
            if job is not None:
                self._engine.send_control(job, Credit(job.id, msg[3], msg[4]))
        elif kind == CALL:
            threading.Thread(target=self._call, args=msg[2:5], name="mlpool-host-call", daemon=True).start()
        else:
            close_all(fds)
            raise ValueError(f"unexpected message kind {kind}")

    def _submit(self, msg: tuple, fds: list[int]) -> None:
        (_, _, cid, model, fn_id, fn_pickle, fn_name, data, spans, has_args, has_offer,
         timeout, retries, priority, batch, stream, interrupt) = msg  # fmt: skip
        args_fd = fds.pop(0) if has_args else -1
        offer_fd = fds.pop(0) if has_offer else -1
        payload = Payload.foreign(data, spans, args_fd) if args_fd >= 0 else Payload(data)
        function = self._function(fn_id, fn_pickle)
        if function is None:  # never sent, or forgotten: this job fails, the connection serves on
            close_all([offer_fd] if offer_fd >= 0 else [])
            payload.abandon()
            error = RuntimeError(f"mlpool internal error: the pool host does not know function {fn_id} of {fn_name}")
            self.outbox.put((ERROR, 0, cid, _pickled_error(error)))
            return
        deadline = None if timeout is None else self._host.now() + timeout
        job = RelayJob(
            self._host.next_id(), model, function[0], function[1], payload, fn_name,
            deadline=deadline, retries=retries, batch_policy=None if batch is None else BatchPolicy(*batch),
            priority=priority, lane=self,
        )  # fmt: skip
        job.client_id = cid
        job.interrupt = interrupt
        if offer_fd >= 0:
            job.result_offer = ForeignRegion(offer_fd)
        if stream is not None:
            job.stream = RelayChannel(self.outbox, cid, *stream)
        future = job.future
        assert future is not None
        with self._lock:
            if self._ended:  # its descriptors are closed with it
                job.payload.abandon()
                if job.result_offer is not None:
                    job.result_offer.close()
                return
            self._jobs[cid] = job
        future.add_done_callback(partial(self._answered, job))
        self._admit(job)

    def _function(self, fn_id: int, fn_pickle: bytes | None) -> tuple[int, bytes] | None:
        """The host's id and the pickle of the API process's function ``fn_id`` (None: unknown)."""
        functions = self._functions
        entry = functions.get(fn_id)
        if fn_pickle is not None and entry is None:
            entry = functions[fn_id] = (self._host.next_function_id(), fn_pickle)
        if entry is not None:
            functions.move_to_end(fn_id)
            if len(functions) > HOST_FUNCTIONS:
                functions.popitem(last=False)
        return entry

    # ------------------------------------------------------------ admission

    def _admit(self, job: RelayJob) -> None:
        """Into the engine's queue, else held (in order) until there is room. A
        quick job (under a millisecond lately) that finds an idle worker and
        nothing queued is sent by this thread, which reads the answer itself
        (one thread hop fewer); a worker that takes longer than
        ``DIRECT_PATIENCE`` is left to the manager thread, and this thread
        reads this process's next messages."""
        with self._lock:
            if self._held:
                self._held.append(job)
                return
        if job.stream is None and self._engine.is_quick(job.fn_id):
            try:
                if self._engine.run_direct(job, DIRECT_PATIENCE):
                    return
            except Exception as exc:  # closed, broken: the job's answer is the error
                self._refused(job, exc)
                return
        self._admit_held(job)

    def _admit_held(self, first: RelayJob | None = None) -> None:
        pending = [first] if first is not None else []
        while True:
            if not pending:
                with self._lock:
                    if not self._held:
                        self._waiting_room = False
                        return
                    pending.append(self._held.popleft())
            job = pending.pop()
            try:
                room = self._engine.enqueue(job, wait=True)
            except Exception as exc:  # closed, broken, shut down: the job's answer is the error
                self._refused(job, exc)
                continue
            if room is not None:
                with self._lock:
                    self._held.appendleft(job)
                    if self._waiting_room:
                        room.cancel()
                        return
                    self._waiting_room = True
                room.add_done_callback(lambda _: self._engine.call_soon(self._retry))
                return

    def _retry(self) -> None:
        with self._lock:
            self._waiting_room = False
        self._admit_held()

    def _refused(self, job: RelayJob, exc: Exception) -> None:
        """The engine refused ``job`` (and closed our descriptors of its memory)."""
        with self._lock:
            self._jobs.pop(job.client_id, None)
        self.outbox.put((ERROR, 0, job.client_id, _pickled_error(exc)))

    # ------------------------------------------------------------ answers

    def _answered(self, job: RelayJob, future: Future) -> None:
        """The job settled (in whichever thread settled it): its one answer."""
        cid = job.client_id
        with self._lock:
            if self._jobs.pop(cid, None) is None:
                return
        if future.cancelled():
            self.outbox.put((GONE, 0, cid))
            return
        error = future.exception()
        if error is None:
            value = future.result()
            if type(value) is Done:
                fds = [value.fd] if value.where == NEW_FILE and value.fd >= 0 else []
                self.outbox.put((DONE, len(fds), cid, value.result, value.spans, value.where), fds)
            elif type(value) is StreamEnd:
                self.outbox.put((END, 0, cid))
            else:  # not sent by a worker: an mlpool bug, said plainly
                self.outbox.put((ERROR, 0, cid, _pickled_error(RuntimeError(f"unexpected outcome {value!r}"))))
        elif type(error) is ForwardedFailure:
            failed = error.failed
            self.outbox.put((FAILED, 0, cid, failed.error, failed.traceback))
        else:
            self.outbox.put((ERROR, 0, cid, _pickled_error(error)))

    # ------------------------------------------------------------ calls

    def _call(self, call_id: int, operation: str, arguments: tuple) -> None:
        """stats, worker_stacks or reload, answered when done (in a thread of its own)."""
        try:
            value: Any = self._host.call(operation, arguments)
            answer = (True, dumps_by_value(value, f"the answer to {operation}"))
        except BaseException as exc:
            answer = (False, _pickled_error(exc))
        self.outbox.put((ANSWER, 0, call_id, *answer))

    # ------------------------------------------------------------ the end

    def _end(self) -> None:
        """The API process went: drop its held jobs, cancel the others."""
        with self._lock:
            self._ended = True
            jobs = list(self._jobs.values())
            self._jobs.clear()
            held = list(self._held)
            self._held.clear()
        self.outbox.close()
        for job in held:
            self._engine.cancel(job)
        for job in jobs:
            self._engine.cancel(job, interrupt=job.interrupt)
        self.outbox.join(5.0)
        self.channel.close()
        self._host.ended(self)
        if jobs or held:
            logger.info("API process %d left: %d of its jobs were cancelled", self.pid, len(jobs) + len(held))


def _pickled_error(exc: BaseException) -> bytes:
    try:
        return dumps_by_value(exc, "an error")
    except Exception:
        return dumps_by_value(RuntimeError(f"{type(exc).__name__}: {exc}"), "an error")

