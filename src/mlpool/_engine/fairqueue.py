"""The rings the scheduler's turns go round (see :mod:`mlpool._engine.scheduler`).

::

    GroupQueue ── order: its Levels with entries, the highest priority first
      Level ── ring: the ModelQueues with entries; whose turn: ring[0]
        ModelQueue (one model, one priority) ── ring: its Lanes with entries
          Lane (one session's, or no session's) ── entries: Job | Batch, FIFO

Plain records: the :class:`~mlpool._engine.scheduler.Scheduler` links and unlinks
them, under the engine's lock.
"""

from __future__ import annotations

from collections import deque
from typing import Any, final

from mlpool._engine.batching import BatchPolicy
from mlpool._engine.jobs import Job, JobState


class GroupQueue:
    """The queue of one worker group: its priority levels with jobs."""

    __slots__ = ("name", "levels", "order")

    def __init__(self, name: str) -> None:
        self.name = name
        self.levels: dict[int, Level] = {}  # the levels in ``order``, and level 0
        self.order: list[Level] = []  # the levels with entries, the highest priority first


class Level:
    """One priority level of a group: the ring of its models with entries."""

    __slots__ = ("priority", "ring")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.ring: deque[ModelQueue] = deque()  # whose turn: ring[0]


def to_front(ring: deque[Any], item: object) -> None:
    """Move ``item`` to the head of ``ring`` (a requeued job's lane goes next: rare, O(ring))."""
    if ring[0] is not item:
        ring.remove(item)
        ring.appendleft(item)


def descending(level: Level) -> int:
    return -level.priority


class ModelQueue:
    """One model at one priority level: the ring of its lanes with entries."""

    __slots__ = ("model", "priority", "lanes", "ring", "linked")

    def __init__(self, model: ModelRecord, priority: int) -> None:
        self.model = model
        self.priority = priority
        self.lanes: dict[object, Lane] = {}  # lane token (a session's, or None) -> lane
        self.ring: deque[Lane] = deque()  # whose turn: ring[0]
        self.linked = False  # in its level's ring


class Lane:
    """The FIFO of one session's (or no session's) entries for one model and priority."""

    __slots__ = ("queue", "token", "entries", "linked", "dead")

    def __init__(self, queue: ModelQueue, token: object) -> None:
        self.queue = queue
        self.token = token
        self.entries: deque[Job | Batch] = deque()
        self.linked = False  # in its model queue's ring
        self.dead = 0  # entries of jobs that left, still in ``entries`` (see forget)


class ModelRecord:
    """A model's group, its queues per priority, and how many of its jobs wait."""

    __slots__ = ("name", "group", "queues", "default", "queued")

    def __init__(self, name: str, group: GroupQueue) -> None:
        self.name = name
        self.group = group
        self.queues: dict[int, ModelQueue] = {}
        self.default = self.lane(0, None)  # priority 0, no session: kept for good
        self.queued = 0

    def lane(self, priority: int, token: object) -> Lane:
        queue = self.queues.get(priority)
        if queue is None:
            queue = self.queues[priority] = ModelQueue(self, priority)
        lane = queue.lanes.get(token)
        if lane is None:
            lane = queue.lanes[token] = Lane(queue, token)
        return lane


@final  # the scheduler tells it from a Job by `type(entry) is Batch`
class Batch:
    """Queued jobs of one (model, function, priority), waiting to go as a batch;
    one FIFO per lane, taken in turn. Its place is one entry in the lane it is
    ``anchor``-ed to (None: not in any lane)."""

    __slots__ = ("key", "policy", "lanes", "ring", "anchor", "dead")

    def __init__(self, key: tuple[str, int, int], policy: BatchPolicy) -> None:
        self.key = key
        self.policy = policy
        self.lanes: dict[object, deque[Job]] = {}
        self.ring: deque[object] = deque()  # lane tokens with jobs; whose turn: ring[0]
        self.anchor: Lane | None = None
        self.dead: dict[object, int] | None = None  # lane token -> jobs that left, still in it (see forget)

    def head(self) -> Job | None:
        """The next live job in turn (dead ones are dropped); None if none is left."""
        ring, lanes = self.ring, self.lanes
        while ring:
            jobs = lanes[ring[0]]
            while jobs and jobs[0].state is not JobState.QUEUED:
                jobs.popleft()
            if jobs:
                return jobs[0]
            del lanes[ring.popleft()]
        return None

    def oldest(self) -> float:
        """When its oldest live job was queued (call after :meth:`head` found one)."""
        return min(jobs[0].submitted_at for jobs in self.lanes.values() if jobs)

    def take(self, size: int) -> list[Job]:
        """Up to ``size`` live jobs, one per lane in turn."""
        taken: list[Job] = []
        ring, lanes = self.ring, self.lanes
        while ring and len(taken) < size:
            token = ring[0]
            jobs = lanes[token]
            job = jobs.popleft()
            if jobs:
                ring.rotate(-1)
            else:
                ring.popleft()
                del lanes[token]
            if job.state is JobState.QUEUED:
                taken.append(job)
        return taken


def forget(fifo: deque[Any], leaving: object, dead: int) -> int:
    """``leaving``, a job of ``fifo`` (a lane's entries, a batch's lane), left
    the queue: drop it, with the entries of jobs that left before it, from
    both ends of ``fifo``; drop every such entry at once when they make up
    more than half of it (amortised O(1) a job). ``dead``: how many it held
    before; returns how many it holds now. So the payloads of cancelled jobs
    do not wait for a plan to walk past them, and a FIFO whose jobs all left
    is empty. Batches are never dropped here (see ``Scheduler.left``)."""
    dead += 1
    while fifo and (fifo[0] is leaving or _left(fifo[0])):
        fifo.popleft()
        dead -= 1
    while fifo and (fifo[-1] is leaving or _left(fifo[-1])):
        fifo.pop()
        dead -= 1
    if dead * 2 > len(fifo):
        live = [entry for entry in fifo if entry is not leaving and not _left(entry)]
        fifo.clear()
        fifo.extend(live)
        return 0
    return max(dead, 0)


def _left(entry: object) -> bool:
    """A job's entry whose job left the queue (a batch's, never)."""
    return type(entry) is not Batch and entry.state is not JobState.QUEUED  # type: ignore[attr-defined]
