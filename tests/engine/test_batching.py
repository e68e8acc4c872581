"""@mlpool.batched: one vectorised call for many callers, each getting its own result."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import CancelledError

import pytest
from helpers import workloads
from helpers.workloads import double_all, load_constant

import mlpool
from mlpool import JobTimeoutError, MLPool, MLPoolError, WorkerCrashedError
from mlpool._engine.batching import BatchPolicy

pytestmark = pytest.mark.usefixtures("no_leaked_workers")


@pytest.fixture(scope="module")
def pool():
    with MLPool({"m": load_constant}, nb_workers=2) as p:
        yield p


def test_each_caller_gets_its_own_result_under_heavy_concurrency(pool):
    async def caller(i: int) -> list:
        return [await pool.score_async("m", double_all, i * 1000 + k) for k in range(20)]

    async def main():
        return await asyncio.gather(*(caller(i) for i in range(64)))

    results = asyncio.run(main())
    sizes = set()
    for i, mine in enumerate(results):
        assert [value for value, _ in mine] == [2 * (i * 1000 + k) for k in range(20)]
        sizes.update(size for _, size in mine)
    assert max(sizes) > 1, "64 concurrent callers should have been batched"
    assert max(sizes) <= 8


def test_batch_sizes_grow_with_load_and_a_lone_caller_is_not_batched(pool):
    alone = [pool.score("m", double_all, k) for k in range(20)]
    assert {size for _, size in alone} == {1}

    futures = [pool.submit("m", double_all, k) for k in range(400)]
    loaded = [f.result(timeout=60) for f in futures]
    assert [value for value, _ in loaded] == [2 * k for k in range(400)]
    assert max(size for _, size in loaded) == 8


def test_every_api_family_and_job_ids(pool):
    job_ids = [pool.create_job(double_all, "m", args=(k,)) for k in range(30)]
    assert [pool.get_result(j)[0] for j in job_ids] == [2 * k for k in range(30)]

    async def main():
        job_id = await pool.create_job_async(double_all, "m", args=(21,))
        return await pool.get_result_async(job_id)

    assert asyncio.run(main())[0] == 42


def test_a_lone_job_does_not_wait_for_max_wait(pool):
    started = time.monotonic()
    assert pool.score("m", workloads.slow_to_fill, 1) == (1, 1)
    # max_wait_ms is 60 s: an idle pool must not hold a lone job for more items.
    assert time.monotonic() - started < 30


def test_batch_that_raises_fails_every_job_in_it(pool):
    futures = [pool.submit("m", workloads.batch_raises, k) for k in range(10)]
    for future in futures:
        with pytest.raises(ValueError, match="bad batch of") as info:
            future.result(timeout=30)
        assert isinstance(info.value.__cause__, mlpool.RemoteTraceback)
    assert pool.score("m", double_all, 1) == (2, 1)


def test_wrong_number_of_results_fails_the_batch_clearly(pool):
    futures = [pool.submit("m", workloads.batch_wrong_length, k) for k in range(5)]
    for future in futures:
        with pytest.raises(MLPoolError, match="must return exactly one result per item"):
            future.result(timeout=30)


def test_batched_jobs_take_exactly_one_item(pool):
    with pytest.raises(TypeError, match="exactly one item"):
        pool.submit("m", double_all, 1, 2)
    with pytest.raises(TypeError, match="exactly one item"):
        pool.create_job(double_all, "m", kwargs={"x": 1})


def test_cancelling_one_job_never_affects_the_others(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        blocker = pool.submit("m", workloads.wait_for_release, str(gate))
        gate.wait_running()  # the jobs below queue up behind it
        queued = [pool.create_job(workloads.batch_echo, "m", args=(k,)) for k in range(4)]
        assert pool.cancel_job(queued[1]) is True
        gate.release_opened()
        blocker.result(timeout=30)
        results = [pool.get_result(j, timeout=30) for i, j in enumerate(queued) if i != 1]
        assert [item for item, _ in results] == [0, 2, 3]
        assert {size for _, size in results} == {3}  # one batch, without the cancelled job


def test_crash_fails_each_job_of_the_batch_and_retries_per_job(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        blocker = pool.submit("m", workloads.wait_for_release, str(gate))
        gate.wait_running()  # the three jobs below queue up and go as one batch
        retried = pool.create_job(workloads.batch_crash_on, "m", args=("a",), max_retries=1)
        crash = pool.create_job(workloads.batch_crash_on, "m", args=("crash",))
        mate = pool.create_job(workloads.batch_crash_on, "m", args=("b",))
        gate.release_opened()
        blocker.result(timeout=30)
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            pool.get_result(crash, timeout=30)
        with pytest.raises(WorkerCrashedError):
            pool.get_result(mate, timeout=30)
        assert pool.get_result(retried, timeout=30) == ("a", 1)  # its retry ran without the crasher
        assert pool.stats().jobs_retried == 1


def test_one_items_timeout_fails_that_item_and_its_batch_runs_on(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        blocker = pool.submit("m", workloads.wait_for_release, str(gate))
        gate.wait_running()
        doomed = pool.create_job(workloads.batch_spin, "m", args=(1,), timeout=0.5)
        mate = pool.create_job(workloads.batch_spin, "m", args=(2,))
        gate.release_opened()
        blocker.result(timeout=30)
        with pytest.raises(JobTimeoutError, match="while running in a batch"):
            pool.get_result(doomed, timeout=30)
        # The mate is in the same call, which runs on (it spins until its own
        # deadline, none here): its worker is killed only when it is cancelled too.
        with pytest.raises(TimeoutError):
            pool.get_result(mate, timeout=0.5)
        assert pool.stats().worker_restarts == 0
        assert pool.cancel_job(mate, interrupt=True)
        assert pool.score("m", double_all, 5) == (10, 1)
        assert pool.stats().worker_restarts == 1


def test_policy_rules_without_processes():
    policy = BatchPolicy(max_batch_size=4, max_wait=0.005)
    assert not policy.should_hold(1, oldest=0.0, now=0.001, others_busy=False)  # idle pool: go now
    assert policy.should_hold(1, oldest=0.0, now=0.001, others_busy=True)  # under load: wait for more
    assert not policy.should_hold(1, oldest=0.0, now=0.006, others_busy=True)  # never past max_wait
    assert not policy.should_hold(4, oldest=0.0, now=0.001, others_busy=True)  # full: go now
    with pytest.raises(ValueError):
        mlpool.batched(max_batch_size=0)
    with pytest.raises(ValueError):
        mlpool.batched(max_wait_ms=-1)


@mlpool.batched(max_batch_size=8, max_wait_ms=5.0)
def logged_batch_waits(model: dict, items: list) -> list:
    """Log the items of this call, then wait for the test's FIFO (each item: log, fifo, value)."""
    log, fifo = items[0][0], items[0][1]
    with open(log, "a") as f:
        f.write(" ".join(str(value) for _, _, value in items) + "\n")
    with open(fifo) as f:
        f.read()
    return [value for _, _, value in items]


def test_interrupting_one_item_of_a_batch_never_runs_its_mates_twice(tmp_path, fifo):
    log = str(tmp_path / "calls")
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        first, second = fifo(), fifo()
        blocker = pool.submit("m", workloads.wait_for_release, str(first))
        first.wait_running()
        session = pool.session(interrupt=True)
        leaving = session.submit("m", logged_batch_waits, (log, str(second), 0))
        mates = [pool.submit("m", logged_batch_waits, (log, str(second), i)) for i in range(1, 5)]
        first.release_opened()
        blocker.result(timeout=30)
        second.wait_running()
        session.close()  # its client left: its one item is cancelled, with interrupt
        second.release_opened()
        assert [m.result(timeout=30) for m in mates] == [1, 2, 3, 4]
        with pytest.raises(CancelledError):
            leaving.result(timeout=30)
        with open(log) as f:
            assert f.read().splitlines() == ["0 1 2 3 4"]
        assert pool.stats().worker_restarts == 0
