"""Job ids, result expiry and job deadlines: what the engine must find by key or by time.

::

    create_job ─► add(job) ─► "9f2c..." ──────────────► lookup / forget (get_result)
    a deadline ─► watch(job): (deadline, id) on a heap ─► due(now): jobs past it
    an outcome ─► finished(job): its deadline entry is dead, its result starts to expire
                                                      ─► expire(now): drop unfetched results

The heap holds ``(deadline, job id)``, never the job: a finished job is
released at once, whatever its deadline; its stale heap entry is skipped when
it comes up, and the heap is rebuilt when stale entries outnumber live ones.
Unfetched results expire in finishing order (an ``OrderedDict``): no scan.

Pure bookkeeping under the engine's lock, with the time passed in: unit-tested
without processes (``tests/test_registry.py``).
"""

from __future__ import annotations

import heapq
import logging
import os
from collections import OrderedDict
from typing import Any, Generic, Protocol, TypeVar

from mlpool._engine.results import opened

logger = logging.getLogger("mlpool")

# Below this many heap entries, stale ones are not worth a rebuild.
_COMPACT_MIN = 64


def new_job_key() -> str:
    """A job id for the job-id API: 128 random bits in hex, as ``uuid4().hex``
    is, without building a UUID (about 1 µs against 5-8: it is on the hot path
    of ``create_job_async``)."""
    return os.urandom(16).hex()


class Settled:
    """A finished job's outcome, kept for ``get_result`` in place of the job:
    what fetching needs and nothing more (the job, its future, its arguments
    are released)."""

    __slots__ = ("job_id", "ok", "value")

    def __init__(self, job_id: int, ok: bool, value: Any) -> None:
        self.job_id = job_id
        self.ok = ok
        self.value = value

    def result(self) -> Any:
        """The result, unpickled here (see ``_engine.results``), or raise the job's error."""
        if self.ok:
            return opened(self.value)
        raise self.value


class _Timed(Protocol):
    id: int
    key: str | None
    deadline: float | None


J = TypeVar("J", bound=_Timed)


class Registry(Generic[J]):
    """The job-id registry, result expiry and the deadline heap (under the engine lock)."""

    def __init__(self, result_ttl: float) -> None:
        self.result_ttl = result_ttl
        self._by_key: dict[str, J | Settled] = {}  # created with an id, not fetched yet
        self._expiring: OrderedDict[str, float] = OrderedDict()  # finished: key -> expiry
        self._heap: list[tuple[float, int]] = []
        self._timed: dict[int, J] = {}  # jobs with a deadline that have not finished

    # ------------------------------------------------------------- job ids

    def add(self, job: J) -> str:
        """Give ``job`` a string id and keep it until fetched, forgotten or expired."""
        key = job.key = new_job_key()
        self._by_key[key] = job
        return key

    def lookup(self, key: str) -> J | Settled | None:
        """The job, or its outcome once it is settled."""
        return self._by_key.get(key)

    def settled(self, job: J, ok: bool, value: Any) -> None:
        """``job``'s outcome was delivered: keep only that for ``get_result``."""
        key = job.key
        if key is not None and self._by_key.get(key) is job:
            self._by_key[key] = Settled(job.id, ok, value)

    def forget(self, key: str, job: J | Settled) -> bool:
        """Drop a fetched or cancelled job (or its outcome); False if it was already gone."""
        entry = self._by_key.get(key)
        job_id = job.job_id if isinstance(job, Settled) else job.id
        if entry is not job and not (type(entry) is Settled and entry.job_id == job_id):
            return False
        del self._by_key[key]
        self._expiring.pop(key, None)
        return True

    @property
    def unfetched(self) -> int:
        """Finished results waiting for ``get_result``."""
        return len(self._expiring)

    # ----------------------------------------------------------- deadlines

    def watch(self, job: J) -> bool:
        """Enforce ``job.deadline``; True if it is now the earliest one."""
        deadline = job.deadline
        if deadline is None or job.id in self._timed:
            return False
        self._timed[job.id] = job
        heapq.heappush(self._heap, (deadline, job.id))
        return self._heap[0][1] == job.id

    def due(self, now: float) -> list[J]:
        """Jobs whose deadline has passed, each once; they are no longer watched."""
        heap, timed = self._heap, self._timed
        jobs = []
        while heap and heap[0][0] <= now:
            _, job_id = heapq.heappop(heap)
            job = timed.pop(job_id, None)
            if job is not None:
                jobs.append(job)
        return jobs

    def finished(self, job: J, now: float, *, keep_result: bool) -> float | None:
        """``job`` has its outcome: stop watching its deadline and, if it has a
        string id and ``keep_result``, start its result's expiry (returned)."""
        if job.deadline is not None and self._timed.pop(job.id, None) is not None:
            if len(self._heap) > _COMPACT_MIN and len(self._heap) > 2 * len(self._timed):
                self._heap = [entry for entry in self._heap if entry[1] in self._timed]
                heapq.heapify(self._heap)
        key = job.key
        if key is None or not keep_result or key not in self._by_key:
            return None
        expiry = self._expiring[key] = now + self.result_ttl
        return expiry

    def expire(self, now: float) -> int:
        """Drop results nobody fetched within ``result_ttl`` (oldest first); how many."""
        expiring, dropped = self._expiring, 0
        while expiring:
            key, expiry = next(iter(expiring.items()))
            if expiry > now:
                break
            del expiring[key]
            self._by_key.pop(key, None)
            dropped += 1
        if dropped:
            logger.debug("%d results expired unfetched", dropped)
        return dropped

    def next_deadline(self) -> float | None:
        """The earliest time something here falls due, or None."""
        heap, timed = self._heap, self._timed
        while heap and heap[0][1] not in timed:  # finished since: skip it now
            heapq.heappop(heap)
        candidates = []
        if heap:
            candidates.append(heap[0][0])
        if self._expiring:
            candidates.append(next(iter(self._expiring.values())))
        return min(candidates) if candidates else None

    def clear_deadlines(self) -> None:
        self._heap.clear()
        self._timed.clear()
