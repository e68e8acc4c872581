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

from mlpool._engine.jobs import Job
from mlpool._engine.regions import RegionPool
from mlpool._shared.connection import Connection
from mlpool._shared.protocol import SUBMIT
from mlpool._wire.serialization import FUNCTION_TABLE_SIZE

RESULT_SIZES = 1024  # functions whose last result size is kept (the room offered for the next)


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
        with connection.outbox.locked():  # the host's LRU of functions follows the messages' order
            sent = self._sent
            if job.fn_id in sent:
                sent.move_to_end(job.fn_id)
                fn_pickle = None
            else:
                sent[job.fn_id] = None
                if len(sent) > FUNCTION_TABLE_SIZE:
                    sent.popitem(last=False)
                fn_pickle = job.fn_pickle
            connection.send((SUBMIT, len(fds), job.id, job.model, job.fn_id, fn_pickle, job.fn_name, p.data, p.spans,
                             has_args, len(fds) > has_args, timeout, job.retries_left, job.priority, batch, stream,
                             interrupt), fds)  # fmt: skip


def abandon(job: Job) -> None:
    """Close the job's shared memory without reusing it: the host may still hold it."""
    job.payload.abandon()
    offer, job.result_offer = job.result_offer, None
    if offer is not None:
        offer.close()
