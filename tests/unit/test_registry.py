"""The job registry's bookkeeping, without processes: ids, deadlines, expiry."""

from __future__ import annotations

import gc
import weakref

from mlpool._engine.registry import Registry


class FakeJob:
    def __init__(self, job_id: int, deadline: float | None = None) -> None:
        self.id = job_id
        self.key: str | None = None
        self.deadline = deadline


def test_due_returns_each_job_past_its_deadline_once_in_order():
    registry: Registry[FakeJob] = Registry(result_ttl=10.0)
    jobs = [FakeJob(i, deadline=d) for i, d in enumerate([5.0, 1.0, 3.0])]
    for job in jobs:
        registry.watch(job)
    assert registry.next_deadline() == 1.0
    assert [j.id for j in registry.due(3.0)] == [1, 2]
    assert registry.due(3.0) == []
    assert [j.id for j in registry.due(100.0)] == [0]


def test_a_finished_job_is_not_due_and_not_referenced():
    registry: Registry[FakeJob] = Registry(result_ttl=10.0)
    job = FakeJob(1, deadline=60.0)
    registry.watch(job)
    registry.finished(job, now=0.0, keep_result=False)
    ref = weakref.ref(job)
    del job
    gc.collect()
    assert ref() is None, "the registry kept a finished job alive until its deadline"
    assert registry.due(100.0) == []
    assert registry.next_deadline() is None


def test_stale_deadline_entries_are_compacted():
    registry: Registry[FakeJob] = Registry(result_ttl=10.0)
    for i in range(10_000):
        job = FakeJob(i, deadline=60.0 + i)
        registry.watch(job)
        registry.finished(job, now=0.0, keep_result=False)
    assert len(registry._heap) <= 200  # private, but the bound is the point of this test


def test_unfetched_results_expire_oldest_first_and_forget_ends_them():
    registry: Registry[FakeJob] = Registry(result_ttl=10.0)
    a, b = FakeJob(1), FakeJob(2)
    key_a, key_b = registry.add(a), registry.add(b)
    assert key_a != key_b and registry.lookup(key_a) is a
    assert registry.finished(a, now=0.0, keep_result=True) == 10.0
    assert registry.finished(b, now=5.0, keep_result=True) == 15.0
    assert registry.unfetched == 2 and registry.next_deadline() == 10.0
    assert registry.expire(12.0) == 1
    assert registry.lookup(key_a) is None and registry.lookup(key_b) is b
    assert registry.forget(key_b, b) and not registry.forget(key_b, b)
    assert registry.unfetched == 0 and registry.next_deadline() is None


def test_a_cancelled_result_does_not_start_expiring():
    registry: Registry[FakeJob] = Registry(result_ttl=10.0)
    job = FakeJob(1)
    registry.add(job)
    assert registry.finished(job, now=0.0, keep_result=False) is None
    assert registry.unfetched == 0
