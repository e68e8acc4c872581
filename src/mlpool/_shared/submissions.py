"""What an API process sends its pool host for a job, and the rules of the job's shared memory.

A SUBMIT carries the job's arguments (their shared-memory file, as made when
the job was), the room offered for its result (a region of this process's
pool, sized as the function's last result: the worker writes the result
there, this process reads it in place), and the function's pickle the first
time (the host keeps the same LRU of functions, updated in message order).

The job's memory is this process's again once the host's last word on it
came (DONE, FAILED, ERROR, END: the host and its worker are done with it);
after GONE, or when the host died, a worker may still hold it: it is closed,
never reused (:func:`abandon`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from mlpool._engine.jobs import Job
from mlpool._engine.regions import NOWHERE, RegionPool, result_buffers
from mlpool._engine.results import PickledResult
from mlpool._shared.connection import Connection
from mlpool._shared.protocol import DONE, GONE, SUBMIT
from mlpool._wire.serialization import FUNCTION_TABLE_SIZE
from mlpool._wire.shm import Spans

RESULT_SIZES = 1024  # functions whose last result size is kept (the room offered for the next)
HOST_FUNCTIONS = 2 * FUNCTION_TABLE_SIZE  # the functions a host's relay keeps (see Submissions.send)


class Submissions:
    """Builds and sends SUBMIT messages (any thread)."""

    def __init__(self, regions: RegionPool) -> None:
        self._regions = regions
        self._result_sizes: OrderedDict[int, int] = OrderedDict()
        self._sent: OrderedDict[int, None] = OrderedDict()  # functions the host has, under the send lock

    def reset(self) -> None:
        """A new host knows no function yet."""
        self._sent.clear()

    def result_size(self, fn_id: int, size: int) -> None:
        """A result of ``fn_id`` used ``size`` bytes of shared memory: room for the next."""
        sizes = self._result_sizes
        sizes[fn_id] = size
        sizes.move_to_end(fn_id)
        if len(sizes) > RESULT_SIZES:
            sizes.popitem(last=False)

    def answered(self, job: Job, kind: int, cancelled: bool) -> None:
        """The host's last word on ``job`` came (``kind``): its memory is ours
        again, but the room offered for a DONE's result, which is the result's
        (:meth:`result`); after GONE a worker may still hold it: closed."""
        if kind == GONE:
            abandon(job)
            return
        job.payload.release(self._regions)
        if job.result_offer is not None and (cancelled or kind != DONE):
            self._regions.give(job.result_offer)
            job.result_offer = None

    def result(
        self, job: Job, data: bytes, spans: Spans, where: int, fd: int, undecodable: Callable[[str], None]
    ) -> PickledResult:
        """A DONE's result: mapped in place (the room offered, or the worker's
        own file ``fd``), unpickled later by its caller. OSError if it cannot be mapped."""
        offer, job.result_offer = job.result_offer, None
        buffers = (
            None if where == NOWHERE and offer is None
            else result_buffers(spans, where, fd, offer, self._regions)  # type: ignore[arg-type]  # ours: a Region
        )  # fmt: skip
        if where != NOWHERE and spans:
            self.result_size(job.fn_id, spans[-1][0] + spans[-1][1])
        return PickledResult(data, buffers, job.id, job.fn_name, job.model, undecodable)

    def send(self, connection: Connection, job: Job) -> None:
        """Queue ``job``'s SUBMIT (never blocks; a host that is gone fails it through the reader)."""
        p = job.payload
        fds = [p.place(self._regions)] if p.shared else []
        has_args = bool(fds)
        if job.stream is None and job.batch_policy is None:
            size = self._result_sizes.get(job.fn_id)
            if size is not None:
                job.result_offer = self._regions.take(size)
                fds.append(job.result_offer.fd)
        timeout = None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
        policy = job.batch_policy
        batch = None if policy is None else (policy.max_batch_size, policy.max_wait)
        stream = None if job.stream is None else (job.stream.window_items, job.stream.window_bytes)
        interrupt = bool(getattr(job.lane, "interrupt", False))
        # The host keeps the functions it got, twice as many as we count as sent
        # (HOST_FUNCTIONS): a function counted here once its message is queued, in
        # the messages' order, is always there.
        with connection.outbox.locked():
            sent = self._sent
            known = job.fn_id in sent
            connection.send((SUBMIT, len(fds), job.id, job.model, job.fn_id, None if known else job.fn_pickle,
                             job.fn_name, p.data, p.spans, has_args, len(fds) > has_args, timeout, job.retries_left,
                             job.priority, batch, stream, interrupt), fds)  # fmt: skip
            sent[job.fn_id] = None
            sent.move_to_end(job.fn_id)
            if len(sent) > FUNCTION_TABLE_SIZE:
                sent.popitem(last=False)


def abandon(job: Job) -> None:
    """Close the job's shared memory without reusing it: the host may still hold it."""
    job.payload.abandon()
    offer, job.result_offer = job.result_offer, None
    if offer is not None:
        offer.close()
