"""What a worker sends, whoever read it: one place, under the engine's lock.

::

    a reader: the manager thread, a caller thread lent the pipe, an event loop
      ─► Replies.take(worker, messages)
           Done / Failed / StreamEnd ─► the worker's oldest job: its run time
                                        (Scheduler), its memory, its outcome
                                        (Outcomes); the worker may be recycled
           Item                      ─► its stream's channel
           Ready, LoadFailed, OverMemory, Exiting, a broken protocol
                                     ─► the Supervisor (the process's life)

Readers only read (``_processes.readers``) and decide what to do after (the
manager dispatches, a lent caller ends its loan); what a message means is
decided here. Outcomes are decided here and delivered after the lock is
released (``_engine.lock``); a result is unpickled later still, in the
thread of the caller who asks for it (``_engine.results``).
"""

from __future__ import annotations

import os

from mlpool._engine.jobs import JobState
from mlpool._engine.outcomes import Outcomes
from mlpool._engine.scheduler import Scheduler
from mlpool._engine.streams import on_item
from mlpool._processes.readers import PipeReaders, ProtocolBroken
from mlpool._processes.supervisor import Supervisor
from mlpool._processes.workers import WorkerHandle
from mlpool._wire.protocol import NOWHERE, Done, Exiting, Failed, Item, LoadFailed, OverMemory, Ready, StreamEnd


class Replies:
    """Settles what workers send (every method under the engine's lock)."""

    def __init__(self, scheduler: Scheduler, supervisor: Supervisor, readers: PipeReaders, outcomes: Outcomes) -> None:
        self._scheduler = scheduler
        self._supervisor = supervisor
        self._readers = readers
        self._outcomes = outcomes

    def take(self, worker: WorkerHandle, messages: list) -> None:
        """Act on ``messages``, read from ``worker``'s pipe in the order it sent them."""
        for msg in messages:
            kind = type(msg)
            if kind is Done or kind is Failed or kind is StreamEnd:
                self._answered(worker, msg)
                self._supervisor.answered(worker)
            elif kind is Item:
                on_item(worker, msg)
            else:
                self._process_event(worker, msg)

    def _answered(self, worker: WorkerHandle, msg: Done | Failed | StreamEnd) -> None:
        """``worker`` answered its oldest job."""
        if not worker.inflight or worker.inflight[0].id != msg.job_id:
            worker.kill(f"protocol error: answered job {msg.job_id} out of order")
            return
        job = worker.answered()
        shared = sum(length for _, length in msg.spans) if type(msg) is Done and msg.where != NOWHERE else None
        if job.stream is None:  # a stream's length says nothing of the next one's: none pipelines behind it
            self._scheduler.observe(job.fn_id, msg.seconds, shared)
        # The worker is done with its arguments; the offer is read when the outcome is delivered.
        if job.payload.shared or job.result_offer is not None:
            self._outcomes.release_memory(job, keep_offer=job.state is JobState.RUNNING and type(msg) is Done)
        if not worker.inflight and worker.pipe.registered:
            self._readers.watch_now(worker)
        if job.state is JobState.RUNNING:
            self._outcomes.finish(job, type(msg) is not Failed, msg)
        elif type(msg) is Done and msg.fd >= 0:  # a discarded result's shared memory
            os.close(msg.fd)
            self._outcomes.release_memory(job)

    def _process_event(self, worker: WorkerHandle, msg: object) -> None:
        """A message about the worker's process, not about a job."""
        match msg:
            case Ready():
                self._supervisor.on_ready(worker, msg)
            case LoadFailed():
                worker.load_failure = msg  # said before it exits: its death is blamed on the loader
            case OverMemory(rss):
                self._supervisor.retire(
                    worker, f"its resident memory, {rss / 2**20:.0f} MiB, passed max_memory_per_worker"
                )
            case Exiting():
                pass
            case ProtocolBroken(reason):
                worker.fault = reason
                worker.kill(f"protocol error: {reason}")
