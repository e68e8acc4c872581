"""Fair queues without processes: groups, strict priorities, model turns, session lanes (#16).

Each test drives the scheduler as the engine does: plan, start what it
placed, finish one job, plan again; the numbers in the assertions say how
many of the other lane's (model's, priority's) jobs may go first.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from mlpool._engine.batching import BatchPolicy
from mlpool._engine.jobs import Job, JobState
from mlpool._engine.regions import Payload
from mlpool._engine.scheduler import Scheduler

_ids = itertools.count(1)


def job(model: str = "m", *, lane: object = None, priority: int = 0, fn_id: int = 1, policy=None) -> Job:
    return Job(
        next(_ids), model, fn_id, b"", Payload(b"args"), "f",
        deadline=None, retries=0, batch_policy=policy, priority=priority, lane=lane,
    )  # fmt: skip


def worker(group: str = "") -> SimpleNamespace:
    return SimpleNamespace(inflight=[], backlog=0.0, pipe=SimpleNamespace(read_by=None), group=group)


def place(scheduler: Scheduler, workers: list) -> list[tuple[SimpleNamespace, list[Job]]]:
    placed = []
    for chosen, jobs, _ in scheduler.plan(workers, None, 0.0, lambda: False, lambda here: False):
        for taken in jobs:
            taken.state = JobState.RUNNING
            chosen.inflight.append(taken)
        placed.append((chosen, jobs))
    return placed


def run_all(scheduler: Scheduler, workers: list) -> list[Job]:
    """Start order of every queued job, the workers finishing their oldest
    job one at a time (the first to take one finishes first)."""
    order: list[Job] = []
    running: list[SimpleNamespace] = []
    while True:
        for chosen, jobs in place(scheduler, workers):
            order.extend(jobs)
            running.append(chosen)
        if not running:
            return order
        done = running.pop(0)
        done.inflight.clear()


def test_a_lone_job_of_one_session_starts_within_two_assignments_of_a_thousand_queued_by_another():
    scheduler = Scheduler({"m": ""})
    flood, quiet = object(), object()
    for _ in range(1000):
        scheduler.push(job(lane=flood))
    lone = job(lane=quiet)
    scheduler.push(lone)
    order = run_all(scheduler, [worker(), worker()])
    assert len(order) == 1001
    assert order.index(lone) <= 1  # one flood job at most goes first (one per worker)


def test_a_lone_job_arriving_behind_a_running_flood_waits_for_one_job_per_worker_at_most():
    scheduler = Scheduler({"m": ""})
    flood, quiet = object(), object()
    workers = [worker(), worker()]
    for _ in range(1000):
        scheduler.push(job(lane=flood))
    first = place(scheduler, workers)  # both workers busy with the flood
    assert len(first) == 2
    lone = job(lane=quiet)
    scheduler.push(lone)
    started = []
    for free in workers:  # they finish one after the other
        free.inflight.clear()
        started += [jobs for _, jobs in place(scheduler, workers)]
    assert [lone] in started  # the flood's lane had its turn already: one more of its jobs at most


def test_jobs_outside_any_session_are_one_lane_among_the_sessions():
    scheduler = Scheduler({"m": ""})
    a, b = object(), object()
    plain = [job() for _ in range(3)]
    mine = [job(lane=a) for _ in range(3)]
    theirs = [job(lane=b) for _ in range(3)]
    for queued in plain + mine + theirs:
        scheduler.push(queued)
    order = run_all(scheduler, [worker()])
    # Each lane in turn, FIFO within a lane.
    assert order == [plain[0], mine[0], theirs[0], plain[1], mine[1], theirs[1], plain[2], mine[2], theirs[2]]


def test_higher_priority_runs_first_strictly_and_fifo_within_a_level():
    scheduler = Scheduler({"m": ""})
    low = [job(priority=0) for _ in range(5)]
    high = [job(priority=10) for _ in range(3)]
    middle = [job(priority=-1 + 6) for _ in range(2)]
    for queued in low + middle + high:
        scheduler.push(queued)
    assert run_all(scheduler, [worker()]) == high + middle + low


def test_a_high_priority_flood_starves_low_priority_until_it_is_gone():
    scheduler = Scheduler({"m": ""})
    workers = [worker()]
    scheduler.push(waiting := job(priority=0))
    order = []
    for _ in range(50):  # high priority keeps arriving while the worker is busy
        scheduler.push(job(priority=1))
        for _, jobs in place(scheduler, workers):
            order.extend(jobs)
        workers[0].inflight.clear()
    assert waiting not in order
    assert run_all(scheduler, workers) == [waiting]


def test_models_sharing_workers_take_turns():
    scheduler = Scheduler({"big": "", "small": ""})
    big = [job("big") for _ in range(100)]
    small = [job("small") for _ in range(3)]
    for queued in big + small:
        scheduler.push(queued)
    order = run_all(scheduler, [worker()])
    assert order[:6] == [big[0], small[0], big[1], small[1], big[2], small[2]]
    assert order[6:] == big[3:]


def test_a_job_goes_only_to_a_worker_of_its_models_group():
    scheduler = Scheduler({"iris": "", "ranker": "ranker"})
    shared, dedicated = worker(""), worker("ranker")
    ranked = [job("ranker") for _ in range(3)]
    for queued in ranked:
        scheduler.push(queued)
    assert place(scheduler, [shared]) == []  # a shared worker never takes the ranker's job
    scheduler.push(iris := job("iris"))
    placed = place(scheduler, [shared, dedicated])
    assert [(w.group, [j.id for j in jobs]) for w, jobs in placed] == [("", [iris.id]), ("ranker", [ranked[0].id])]


def test_a_flooded_group_does_not_delay_another_groups_job():
    scheduler = Scheduler({"iris": "", "ranker": "ranker"})
    shared, dedicated = worker(""), worker("ranker")
    for _ in range(500):
        scheduler.push(job("ranker"))
    scheduler.push(iris := job("iris"))
    placed = place(scheduler, [dedicated, shared])
    assert any(jobs == [iris] and w is shared for w, jobs in placed)


def test_priorities_are_strict_per_group_only():
    scheduler = Scheduler({"iris": "", "ranker": "ranker"})
    scheduler.push(job("ranker", priority=5))
    scheduler.push(low_iris := job("iris", priority=0))
    shared = worker("")
    assert place(scheduler, [shared]) == [(shared, [low_iris])]


def test_a_batch_is_filled_across_lanes_in_turn():
    scheduler = Scheduler({"m": ""})
    policy = BatchPolicy(4, 0.005)
    flood, quiet = object(), object()
    flooded = [job(lane=flood, fn_id=7, policy=policy) for _ in range(10)]
    quiet_jobs = [job(lane=quiet, fn_id=7, policy=policy) for _ in range(2)]
    for queued in flooded + quiet_jobs:
        scheduler.push(queued)
    ((_, first),) = place(scheduler, [worker()])
    assert first == [flooded[0], quiet_jobs[0], flooded[1], quiet_jobs[1]]
    assert {j.batch_id for j in first} == {flooded[0].id}
    rest = run_all(scheduler, [worker()])
    assert rest == flooded[2:]


def test_the_per_model_count_follows_push_take_and_leave():
    scheduler = Scheduler({"a": "", "b": "b"})
    jobs_a = [job("a") for _ in range(3)]
    for queued in jobs_a:
        scheduler.push(queued)
    scheduler.push(job("b"))
    assert (scheduler.queued_of("a"), scheduler.queued_of("b"), scheduler.queued) == (3, 1, 4)
    jobs_a[1].state = JobState.FINISHED
    scheduler.withdraw(jobs_a[1])
    assert scheduler.queued_of("a") == 2
    place(scheduler, [worker("")])
    assert (scheduler.queued_of("a"), scheduler.queued_of("b"), scheduler.queued) == (1, 1, 2)
    assert scheduler.queued_of("unknown") == 0


def test_a_requeued_job_goes_before_the_other_models_too():
    scheduler = Scheduler({"a": "", "b": ""})
    scheduler.push(job("a"))
    scheduler.push(job("b"))
    scheduler.push(job("b"))  # b's lane is linked already when its job comes back
    scheduler.requeue(back := job("b"))
    assert run_all(scheduler, [worker()])[0] is back


def test_a_requeued_job_goes_before_its_lane_and_the_other_lanes():
    scheduler = Scheduler({"m": ""})
    other = object()
    scheduler.push(theirs := job(lane=other))
    scheduler.push(mine := job())
    scheduler.requeue(back := job())
    assert run_all(scheduler, [worker()])[0] is back
    assert {theirs.state, mine.state} == {JobState.RUNNING}


@pytest.mark.parametrize("lanes_or_levels", ["lanes", "levels"])
def test_sessions_and_priorities_that_come_and_go_leave_nothing_behind(lanes_or_levels):
    scheduler = Scheduler({"m": ""})
    only = worker()
    for n in range(1, 2001):
        if lanes_or_levels == "lanes":
            scheduler.push(job(lane=object()))
        else:
            scheduler.push(job(priority=n))
        place(scheduler, [only])
        only.inflight.clear()
    place(scheduler, [only])  # the last emptied lane is dropped when its turn comes round
    model = scheduler._models["m"]  # the records behind the turns: nothing left but the defaults
    group = model.group
    assert len(model.queues) == 1 and len(model.queues[0].lanes) == 1  # the lane outside sessions
    assert set(group.levels) <= {0} and not scheduler


def test_drain_gives_every_live_job_of_every_lane_group_and_batch_once():
    scheduler = Scheduler({"a": "", "b": "b"})
    policy = BatchPolicy(4, 0.005)
    jobs = [job("a"), job("b", lane=object()), job("a", priority=3), job("a", policy=policy, fn_id=9), job("b")]
    for queued in jobs:
        scheduler.push(queued)
    jobs[4].state = JobState.FINISHED
    scheduler.withdraw(jobs[4])
    assert sorted(j.id for j in scheduler.drain()) == sorted(j.id for j in jobs[:4])
    assert not scheduler and scheduler.queued_of("a") == 0
    scheduler.push(again := job("a"))
    assert run_all(scheduler, [worker()]) == [again]
