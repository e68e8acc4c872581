"""The scheduler's rules, without processes: FIFO, placing, pipelining, batches, holds."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

from mlpool._engine.batching import BatchPolicy
from mlpool._engine.jobs import PIPELINE_BUDGET, Job, JobState
from mlpool._engine.regions import Payload
from mlpool._engine.scheduler import MAX_ESTIMATES, MAX_INFLIGHT, Scheduler

_ids = itertools.count(1)


def job(fn_id: int = 1, *, policy: BatchPolicy | None = None, submitted_at: float = 0.0, loop=None) -> Job:
    made = Job(next(_ids), "m", fn_id, b"", Payload(b"args"), "f", deadline=None, retries=0, batch_policy=policy)
    made.submitted_at = submitted_at
    made.loop = loop
    return made


def worker(read_by=None) -> SimpleNamespace:
    return SimpleNamespace(inflight=[], backlog=0.0, pipe=SimpleNamespace(read_by=read_by), group="")


def run_plan(scheduler: Scheduler, workers: list, *, now: float = 0.0, busy: bool = False) -> list:
    """Place what can be placed, doing what the engine does with each assignment."""
    placed = []
    for chosen, jobs, estimate in scheduler.plan(workers, None, now, lambda: busy, lambda here: False):
        for taken in jobs:
            taken.state = JobState.RUNNING
            chosen.inflight.append(taken)
            chosen.backlog += estimate
        placed.append((chosen, [taken.id for taken in jobs]))
    return placed


def test_jobs_go_first_in_first_out_to_idle_workers_only_when_their_length_is_unknown():
    scheduler = Scheduler()
    a, b = worker(), worker()
    jobs = [job() for _ in range(3)]
    for queued in jobs:
        scheduler.push(queued)
    placed = run_plan(scheduler, [a, b])
    assert placed == [(a, [jobs[0].id]), (b, [jobs[1].id])]
    assert scheduler.queued == 1 and jobs[2].state is JobState.QUEUED


def test_short_jobs_queue_behind_others_up_to_the_inflight_bound():
    scheduler = Scheduler()
    scheduler.observe(1, PIPELINE_BUDGET / 100, None)  # a tiny function
    only = worker()
    for _ in range(MAX_INFLIGHT + 3):
        scheduler.push(job())
    run_plan(scheduler, [only])
    assert len(only.inflight) == MAX_INFLIGHT
    assert scheduler.queued == 3


def test_a_hungry_job_never_waits_behind_another_in_a_worker():
    scheduler = Scheduler()
    scheduler.observe(1, 0.5, None)
    busy = worker()
    busy.inflight.append(job())
    scheduler.push(job())
    assert run_plan(scheduler, [busy]) == []
    idle = worker()
    assert [w for w, _ in run_plan(scheduler, [busy, idle])] == [idle]


def test_a_worker_reading_for_a_loop_takes_only_that_loops_jobs_while_busy():
    scheduler = Scheduler()
    scheduler.observe(1, PIPELINE_BUDGET / 100, None)
    lent = worker(read_by=object())
    lent.inflight.append(job())
    scheduler.push(job())  # a thread's job
    assert run_plan(scheduler, [lent]) == []


def test_a_batch_takes_at_most_its_size_and_the_rest_keeps_a_place():
    scheduler = Scheduler()
    policy = BatchPolicy(4, 0.005)
    jobs = [job(2, policy=policy) for _ in range(6)]
    for queued in jobs:
        scheduler.push(queued)
    a, b = worker(), worker()
    placed = run_plan(scheduler, [a, b])
    assert placed == [(a, [j.id for j in jobs[:4]]), (b, [j.id for j in jobs[4:]])]
    assert {j.batch_id for j in jobs[:4]} == {jobs[0].id}


def test_under_load_a_small_batch_waits_for_more_items_until_its_deadline():
    scheduler = Scheduler()
    first = job(2, policy=BatchPolicy(8, 0.5), submitted_at=10.0)
    scheduler.push(first)
    idle = worker()
    assert run_plan(scheduler, [idle], now=10.1, busy=True) == []
    assert scheduler.hold_until == 10.5 and scheduler and scheduler.queued == 1
    assert run_plan(scheduler, [idle], now=10.5, busy=True) == [(idle, [first.id])]
    assert scheduler.hold_until is None


def test_cancelled_jobs_free_their_place_at_once_and_are_skipped():
    scheduler = Scheduler()
    gone, kept = job(), job()
    scheduler.push(gone)
    scheduler.push(kept)
    gone.state = JobState.FINISHED
    scheduler.withdraw(gone)
    assert scheduler.queued == 1
    idle = worker()
    assert run_plan(scheduler, [idle]) == [(idle, [kept.id])]
    assert scheduler.queued == 0 and not scheduler


def test_a_job_that_never_started_goes_back_to_the_front():
    scheduler = Scheduler()
    waiting, back = job(), job()
    scheduler.push(waiting)
    scheduler.requeue(back)
    idle = worker()
    assert run_plan(scheduler, [idle]) == [(idle, [back.id])]


def test_drain_gives_each_live_job_once_and_empties_the_queue():
    scheduler = Scheduler()
    policy = BatchPolicy(4, 0.005)
    jobs = [job(), job(3, policy=policy), job(), job(3, policy=policy)]
    for queued in jobs:
        scheduler.push(queued)
    jobs[2].state = JobState.FINISHED
    scheduler.withdraw(jobs[2])
    assert sorted(j.id for j in scheduler.drain()) == sorted(j.id for j in (jobs[0], jobs[1], jobs[3]))
    assert scheduler.queued == 0 and not scheduler


def test_estimates_are_bounded_and_forget_the_oldest_function():
    scheduler = Scheduler()
    scheduler.observe(0, 0.5, 1000)
    for fn_id in range(1, MAX_ESTIMATES + 1):
        scheduler.observe(fn_id, 0.25, None)
    assert scheduler.estimate(0) == PIPELINE_BUDGET  # forgotten: the default again
    assert scheduler.estimate(MAX_ESTIMATES) == 0.25
    assert scheduler.result_size(0) == 1000  # sizes are kept apart, for functions with shared-memory results
