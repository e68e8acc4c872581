"""The queues and who takes what: pure logic, tested without processes.

::

    push(job) ──► group of its model (the workers that load it)
                    └─ priority level: strictly the highest first
                        └─ model: the group's models take turns
                            └─ lane: sessions (and one lane for jobs outside
                               any session) take turns; FIFO within a lane
    plan(workers, ...) ──► (worker, jobs, estimate), one assignment at a time
                  ◄── the engine sends each, or refuses it, and may drop a
                      worker from ``workers`` (its last jobs before recycling)
    observe(fn, seconds, result bytes) ──► duration estimates, result sizes

A turn is one entry: a job, or a batch (a batched function's jobs of one
model and priority wait in one :class:`Batch`, which holds one place in the
lane of its first job; it is filled across its lanes in turn). A job goes
only to a worker of its model's group (``worker.group``). Priorities are
strict: while a level has jobs a group's workers can take, lower levels
wait (a flood of high priority starves low priority, by design).

Choosing a worker: an idle one first (one lent to the job's own event loop
before any other); a job expected to run under ``PIPELINE_BUDGET`` seconds,
and small enough to fit in a pipe's buffer, may also queue behind others in
the least loaded worker (at most ``MAX_INFLIGHT`` jobs each), so a worker
never idles while its next job crosses the pipe, and a hungry job never
waits behind another while a worker is idle. A batch goes to an idle worker
only; under load it waits for more items until its policy says go
(``hold_until``).

The scheduler owns the queues, the count of live jobs (the admission count,
in all and per model) and the estimates; jobs and workers are read, never
changed, except a job's state (QUEUED) and batch id. Under the engine's
lock; time comes in as an argument. The common case (one model, no session,
priority 0) allocates nothing per job: its lane, level and rings persist.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mlpool._engine.fairqueue import Batch, GroupQueue, Lane, Level, ModelRecord, descending, forget, to_front
from mlpool._engine.jobs import PIPELINE_BUDGET, Job, JobState

# At most this many jobs held by one worker at once.
MAX_INFLIGHT = 8
# Only jobs this small are sent to a worker that is busy: the bytes must fit
# in the pipe's buffer, or the sender would block until the worker reads.
PIPELINE_MAX_BYTES = 16 * 1024
# Functions whose duration (and result size) is remembered: the most recent first.
MAX_ESTIMATES = 1024
# Smoothing of each function's measured duration.
ESTIMATE_WEIGHT = 0.2


_EMPTY: deque[Any] = deque()  # read only: "no ring here"

# A worker as the scheduler reads it (the engine's WorkerHandle): ``group``
# (the name of its group: "" for the shared workers), ``inflight`` (the jobs
# it holds, in the order it runs them), ``backlog`` (estimated seconds of work
# in them), ``read_by`` (who reads its pipe: None for the manager, a
# thread's token, an event loop).
W = Any


class Scheduler:
    """The queues of jobs waiting for a worker, and the measures that place them."""

    def __init__(self, model_groups: Mapping[str, str] | None = None) -> None:
        """``model_groups``: model name -> the name of its worker group; a model
        not named there (or no mapping) is served by the shared workers ("")."""
        self._model_groups = dict(model_groups or {})
        self._groups: dict[str, GroupQueue] = {}
        self._group_list: list[GroupQueue] = []
        self._models: dict[str, ModelRecord] = {}
        for model, group in self._model_groups.items():
            self._model(model, group)
        self._batches: dict[tuple[str, int, int], Batch] = {}
        self.queued = 0  # jobs waiting (the admission count); cancelled ones leave at once
        self.hold_until: float | None = None  # a held batch goes at the latest then
        self._estimates: dict[int, float] = {}  # fn id -> seconds a call takes
        self._result_sizes: dict[int, int] = {}  # fn id -> bytes of shared memory its last result used

    def _model(self, name: str, group_name: str = "") -> ModelRecord:
        group = self._groups.get(group_name)
        if group is None:
            group = self._groups[group_name] = GroupQueue(group_name)
            self._group_list = list(self._groups.values())
        model = self._models[name] = ModelRecord(name, group)
        return model

    # ------------------------------------------------------------ the queue

    def __bool__(self) -> bool:
        """Whether any job waits (cancelled ones may still hold entries, dropped
        when their turn comes)."""
        return self.queued > 0

    def queued_of(self, model: str) -> int:
        """Jobs of ``model`` waiting (its admission count)."""
        record = self._models.get(model)
        return 0 if record is None else record.queued

    def push(self, job: Job, *, front: bool = False) -> None:
        """Queue ``job`` in its lane (a batched one in its batch); ``front``: it goes next."""
        job.to(JobState.QUEUED)
        self.queued += 1
        model = self._models.get(job.model) or self._model(job.model)
        model.queued += 1
        priority, token = job.priority, job.lane
        lane = model.default if priority == 0 and token is None else model.lane(priority, token)
        policy = job.batch_policy
        if policy is None:
            if lane.linked and not front:  # the common case, inline
                lane.entries.append(job)
            else:
                self._put(lane, job, front)
            return
        key = (job.model, job.fn_id, priority)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = Batch(key, policy)
        jobs = batch.lanes.get(token)
        if jobs is None:
            jobs = batch.lanes[token] = deque()
            batch.ring.appendleft(token) if front else batch.ring.append(token)
        jobs.appendleft(job) if front else jobs.append(job)
        if batch.anchor is None:
            batch.anchor = lane
            self._put(lane, batch, front)

    def requeue(self, job: Job) -> None:
        """A job that never started goes back to the front of its lane (and
        its lane, model and level go next, unless they are waiting already)."""
        job.worker = None
        job.batch_id = None
        self.push(job, front=True)

    def withdraw(self, job: Job) -> None:
        """A queued job left the queue without being taken (cancelled, timed
        out): its place is free now, and its entry goes now or, between live
        jobs, soon after (see ``_engine.fairqueue.forget``); never on the hot path."""
        self.queued -= 1
        model = self._models[job.model]
        model.queued -= 1
        if job.batch_policy is None:
            queue = model.queues.get(job.priority)
            lane = None if queue is None else queue.lanes.get(job.lane)
            if lane is not None:
                lane.dead = forget(lane.entries, job, lane.dead)
            return
        batch = self._batches.get((job.model, job.fn_id, job.priority))
        token = job.lane
        jobs = None if batch is None else batch.lanes.get(token)
        if batch is None or jobs is None:
            return
        dead = batch.dead or {}
        dead[token] = forget(jobs, job, dead.get(token, 0))
        batch.dead = dead
        if jobs:
            return
        del batch.lanes[token], dead[token]
        batch.ring.remove(token)  # tokens with jobs: one per session with batched jobs queued
        anchor = batch.anchor
        if not batch.ring and anchor is not None and (anchor.entries[0] is batch or anchor.entries[-1] is batch):
            # Every job of it left: its place goes too (in the middle of its lane, the plan drops it).
            anchor.entries.remove(batch)  # at an end: O(1)
            batch.anchor = None
            self._drop_batch(batch)

    def drain(self) -> Iterator[Job]:
        """Every job still queued, emptying the queue."""
        jobs: list[Job] = []
        for model in self._models.values():
            for queue in model.queues.values():
                for lane in queue.lanes.values():
                    for entry in lane.entries:
                        if type(entry) is Batch:
                            jobs.extend(job for batched in entry.lanes.values() for job in batched)
                        else:
                            jobs.append(entry)
        self._groups.clear()
        self._group_list = []
        self._models.clear()
        for model_name, group in self._model_groups.items():
            self._model(model_name, group)
        self._batches.clear()
        self.queued = 0
        return (job for job in jobs if job.state is JobState.QUEUED)

    def _put(self, lane: Lane, entry: Job | Batch, front: bool) -> None:
        """Add ``entry`` to ``lane``; a lane out of the turn order joins it (at
        the back), and so do its model and level. ``front``: the entry, its
        lane and its model go next (a requeued job, a held batch).

        An emptied lane (model, level) keeps its place until its turn comes
        round: the plan drops it then. So the common case, one lane that
        empties and fills again, links nothing per job."""
        lane.entries.appendleft(entry) if front else lane.entries.append(entry)
        queue = lane.queue
        if not lane.linked:
            lane.linked = True
            queue.ring.appendleft(lane) if front else queue.ring.append(lane)
        elif front:
            to_front(queue.ring, lane)
        else:
            return
        group = queue.model.group
        level = group.levels.get(queue.priority)
        if queue.linked:
            if front:
                to_front(level.ring, queue)  # type: ignore[union-attr]
            return
        queue.linked = True
        if level is None:
            level = group.levels[queue.priority] = Level(queue.priority)
        level.ring.appendleft(queue) if front else level.ring.append(queue)
        if len(level.ring) == 1:
            bisect.insort(group.order, level, key=descending)

    def _unlink_top(self, group: GroupQueue) -> None:
        """Drop the emptied head of ``group``'s turn order: its lane, else its
        model queue, else its level (what had entries stays)."""
        level = group.order[0]
        priority = level.priority
        ring = level.ring
        if ring:
            queue = ring[0]
            lanes = queue.ring
            if lanes:
                lane = lanes.popleft()
                lane.linked = False
                if lane.token is not None:  # a session's lane goes with its last entry
                    del queue.lanes[lane.token]
                if lanes:
                    return
            ring.popleft()
            queue.linked = False
            if priority != 0:  # levels come and go with the priorities callers use
                del queue.model.queues[priority]
            if ring:
                return
        del group.order[0]
        if priority != 0:
            del group.levels[priority]

    # ------------------------------------------------------------- placing

    def plan(
        self,
        workers: list[W],
        here: asyncio.AbstractEventLoop | None,
        now: float,
        others_busy: Callable[[], bool],
        unstick: Callable[[asyncio.AbstractEventLoop | None], bool],
    ) -> Iterator[tuple[W, list[Job], float]]:
        """Assignments ``(worker, jobs, estimate)`` in turn order, group by
        group, while a worker of the group can take its next entry; the jobs
        left the queue (QUEUED still: the engine starts them). ``unstick(here)``
        is asked when nothing fits (it may free a worker, e.g. a stopped
        loop's pipe); ``workers`` may shrink between assignments. Held
        batches keep their place."""
        self.hold_until = None
        held: list[Batch] = []
        busy: bool | None = None
        try:
            for group in self._group_list:
                name, order = group.name, group.order
                # While jobs wait: emptied lanes left behind keep their place until then.
                while order and self.queued and workers:
                    models = order[0].ring
                    lanes = models[0].ring if models else _EMPTY
                    entries = lanes[0].entries if lanes else _EMPTY
                    if not entries:
                        self._unlink_top(group)
                        continue
                    entry = entries[0]
                    if type(entry) is not Batch:
                        if entry.state is not JobState.QUEUED:
                            entries.popleft()
                            continue
                        estimate = self._estimates.get(entry.fn_id)
                        worker = pick_worker(workers, name, entry.loop, estimate, entry.payload.size)
                        if worker is None:
                            if unstick(here):
                                continue
                            break
                    else:
                        estimate = None  # a batch goes only to a worker holding nothing
                        head = entry.head()
                        if head is None:  # every job of it left
                            entries.popleft()
                            entry.anchor = None
                            self._drop_batch(entry)
                            continue
                        worker = pick_worker(workers, name, head.loop, None, 0)
                        if worker is None:
                            if unstick(here):
                                continue
                            break
                        if busy is None:
                            busy = others_busy()
                        oldest = entry.oldest()
                        if entry.policy.should_hold(sum(map(len, entry.lanes.values())), oldest, now, busy):
                            entries.popleft()  # back at the front when the plan ends; its lane keeps its turn
                            entry.anchor = None
                            held.append(entry)
                            until = entry.policy.hold_until(oldest)
                            self.hold_until = until if self.hold_until is None else min(self.hold_until, until)
                            continue
                    queue = models[0]
                    entries.popleft()
                    # Its turn is served: the model's next lane, and the group's next model, go next.
                    if entries or (queue.priority == 0 and lanes[0].token is None):
                        if len(lanes) > 1:
                            lanes.rotate(-1)
                    else:  # a session's lane, or a level, that callers may never use again
                        self._unlink_top(group)
                    if len(models) > 1 and models[0] is queue:
                        models.rotate(-1)
                    if type(entry) is Batch:
                        jobs = self._take_batch(entry)
                        self.queued -= len(jobs)
                        queue.model.queued -= len(jobs)
                    else:
                        jobs = [entry]
                        self.queued -= 1
                        queue.model.queued -= 1
                    yield worker, jobs, PIPELINE_BUDGET if estimate is None else estimate
        finally:
            for batch in reversed(held):  # back at the front, in their order
                self._anchor(batch, front=True)

    def _take_batch(self, batch: Batch) -> list[Job]:
        """Up to max_batch_size live jobs of ``batch`` (its lanes in turn), one
        batch id; the rest keeps a place at the back of its next lane."""
        batch.anchor = None
        jobs = batch.take(batch.policy.max_batch_size)
        if batch.ring:
            self._anchor(batch, front=False)
        else:
            self._drop_batch(batch)
        for job in jobs:
            job.batch_id = jobs[0].id
        return jobs

    def _anchor(self, batch: Batch, *, front: bool) -> None:
        """Give ``batch`` a place in the lane of its next job in turn."""
        if batch.head() is None:
            self._drop_batch(batch)
            return
        model_name, _, priority = batch.key
        model = self._models[model_name]
        batch.anchor = lane = model.lane(priority, batch.ring[0])
        self._put(lane, batch, front)

    def _drop_batch(self, batch: Batch) -> None:
        if self._batches.get(batch.key) is batch and batch.anchor is None:
            del self._batches[batch.key]

    # ------------------------------------------------------------ measures

    def estimate(self, fn_id: int) -> float:
        """Seconds a call of this function is expected to take."""
        return self._estimates.get(fn_id, PIPELINE_BUDGET)

    def result_size(self, fn_id: int) -> int | None:
        """Bytes of shared memory the function's last result used, if it used any."""
        return self._result_sizes.get(fn_id)

    def observe(self, fn_id: int, seconds: float, result_bytes: int | None) -> None:
        """A call of ``fn_id`` took ``seconds``; its result used ``result_bytes``
        of shared memory (None: none). Bounded: per-call functions come and go."""
        estimates = self._estimates
        previous = estimates.get(fn_id)
        if previous is None:
            if len(estimates) >= MAX_ESTIMATES:
                del estimates[next(iter(estimates))]
            estimates[fn_id] = seconds
        else:
            estimates[fn_id] = previous + ESTIMATE_WEIGHT * (seconds - previous)
        sizes = self._result_sizes
        if result_bytes is None:
            sizes.pop(fn_id, None)
        else:
            if fn_id not in sizes and len(sizes) >= MAX_ESTIMATES:
                del sizes[next(iter(sizes))]
            sizes[fn_id] = result_bytes


def pick_worker(
    workers: list[W], group: str, loop: asyncio.AbstractEventLoop | None, estimate: float | None, size: int
) -> W | None:
    """A worker of ``group``: an idle one, else (for a short, small job) the
    least loaded one with room.

    A worker lent to an event loop takes only that loop's jobs while it holds
    any; an idle one can be taken back by anyone.
    """
    spare = None  # an idle worker lent to another reader: taken back if nothing better
    for worker in workers:
        if not worker.inflight and worker.group == group:
            if worker.pipe.read_by is loop:
                return worker
            if worker.pipe.read_by is None:
                if loop is None:
                    return worker
                spare = worker if spare is None or spare.pipe.read_by is not None else spare
            elif spare is None:
                spare = worker
    if spare is not None:
        return spare
    if estimate is None or estimate >= PIPELINE_BUDGET or size > PIPELINE_MAX_BYTES:
        return None
    best = None
    for worker in workers:
        if (
            worker.group == group
            and (worker.pipe.read_by is None or worker.pipe.read_by is loop)
            and len(worker.inflight) < MAX_INFLIGHT
            and worker.backlog + estimate <= PIPELINE_BUDGET
            and (best is None or worker.backlog < best.backlog)
        ):
            best = worker
    return best
