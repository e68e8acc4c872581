"""Cancellation, a bounded queue and job deadlines."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
from helpers import workloads
from helpers.pools import make_pool
from helpers.workloads import add, load_constant, touch, wait_for_release

from mlpool import JobTimeoutError, PoolFullError, UnknownJobError

pytestmark = pytest.mark.usefixtures("worker_mode", "no_leaked_workers")


@pytest.fixture
def pool():
    with make_pool({"m": load_constant}, nb_workers=1) as p:
        yield p


def test_cancelled_queued_job_never_runs(pool, fifo, tmp_path):
    gate = fifo()
    blocker = pool.create_job(wait_for_release, "m", args=(str(gate),))
    gate.wait_running()
    marker = tmp_path / "ran"
    queued = pool.create_job(touch, "m", args=(str(marker),))
    assert pool.cancel_job(queued) is True
    with pytest.raises(UnknownJobError, match="never created|cancelled"):
        pool.get_result(queued)
    gate.release_opened()
    assert pool.get_result(blocker) > 0
    assert pool.score("m", add, 1) == 11  # everything before this has run
    assert not marker.exists()
    assert pool.stats().jobs_cancelled == 1


def test_cancelled_running_job_result_is_discarded(pool, fifo):
    gate = fifo()
    job_id = pool.create_job(wait_for_release, "m", args=(str(gate),))
    gate.wait_running()
    assert pool.cancel_job(job_id) is True
    gate.release_opened()
    with pytest.raises(UnknownJobError):
        pool.get_result(job_id)
    assert pool.score("m", workloads.pid) == gate.pid  # the worker was not touched


def test_cancel_with_interrupt_replaces_the_worker(pool, fifo):
    job_id = pool.create_job(workloads.spin, "m", args=(600.0,))
    gate = fifo()
    # The spin job holds the only worker; this one waits in the queue.
    waiting = pool.submit("m", wait_for_release, str(gate))
    assert pool.cancel_job(job_id, interrupt=True) is True
    gate.release()
    assert waiting.result(timeout=30) > 0
    assert pool.stats().worker_restarts == 1


def test_cancel_finished_job_returns_false_and_keeps_result(pool):
    job_id = pool.create_job(add, "m", args=(1,))
    assert pool.get_result(job_id) == 11
    job_id = pool.create_job(add, "m", args=(2,))
    pool.submit("m", add, 0).result(timeout=30)  # the single worker is past job_id
    assert pool.cancel_job(job_id) is False
    assert pool.get_result(job_id) == 12


def test_cancelled_future_never_runs(pool, fifo, tmp_path):
    gate = fifo()
    blocker = pool.submit("m", wait_for_release, str(gate))
    gate.wait_running()
    marker = tmp_path / "ran"
    future = pool.submit("m", touch, str(marker))
    assert future.cancel()
    gate.release_opened()
    blocker.result(timeout=30)
    assert pool.score("m", add, 1) == 11
    assert not marker.exists()


def test_cancelled_task_cancels_its_job(pool, fifo, tmp_path):
    gate = fifo()
    marker = tmp_path / "ran"

    async def main():
        blocker = asyncio.ensure_future(pool.score_async("m", wait_for_release, str(gate)))
        await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)
        task = asyncio.ensure_future(pool.score_async("m", touch, str(marker)))
        await asyncio.sleep(0)  # let the task submit its job
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.release_opened()
        await blocker
        return await pool.score_async("m", add, 1)

    assert asyncio.run(main()) == 11
    assert not marker.exists()


def test_full_queue_raises_or_waits(fifo):
    with make_pool({"m": load_constant}, nb_workers=1, max_queue_size=2) as pool:
        gate = fifo()
        running = pool.create_job(wait_for_release, "m", args=(str(gate),))
        gate.wait_running()
        queued = [pool.create_job(add, "m", args=(i,)) for i in range(2)]
        with pytest.raises(PoolFullError, match="max_queue_size=2"):
            pool.create_job(add, "m", args=(9,), block_until_scheduled=False)

        admitted = threading.Event()
        late: list[str] = []

        def create_blocking() -> None:
            late.append(pool.create_job(add, "m", args=(5,)))
            admitted.set()

        threading.Thread(target=create_blocking, daemon=True).start()
        assert not admitted.is_set()
        gate.release_opened()
        assert admitted.wait(30)
        assert pool.get_result(running) > 0
        assert [pool.get_result(j) for j in queued] == [10, 11]
        assert pool.get_result(late[0]) == 15


def test_full_queue_async_waits_without_blocking_the_loop(fifo):
    with make_pool({"m": load_constant}, nb_workers=1, max_queue_size=1) as pool:
        gate = fifo()

        async def main():
            running = await pool.create_job_async(wait_for_release, "m", args=(str(gate),))
            await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)
            queued = await pool.create_job_async(add, "m", args=(1,))
            with pytest.raises(PoolFullError):
                await pool.create_job_async(add, "m", args=(2,), block_until_scheduled=False)
            waiting = asyncio.ensure_future(pool.create_job_async(add, "m", args=(3,)))
            ticks = 0
            while ticks < 5:  # the loop keeps running while the create waits
                await asyncio.sleep(0)
                ticks += 1
            assert not waiting.done()
            gate.release_opened()
            late = await asyncio.wait_for(waiting, 30)
            return [await pool.get_result_async(j) for j in (queued, late)], await pool.get_result_async(running)

        results, running_pid = asyncio.run(main())
        assert results == [11, 13] and running_pid > 0


def test_job_timeout_in_queue_never_runs(pool, fifo, tmp_path):
    gate = fifo()
    blocker = pool.submit("m", wait_for_release, str(gate))
    gate.wait_running()
    marker = tmp_path / "ran"
    job_id = pool.create_job(touch, "m", args=(str(marker),), timeout=0.1)
    with pytest.raises(JobTimeoutError, match="in the queue; it never ran") as info:
        pool.get_result(job_id, timeout=30)
    assert isinstance(info.value, TimeoutError) and not info.value.while_running
    gate.release_opened()
    blocker.result(timeout=30)
    assert pool.score("m", add, 1) == 11
    assert not marker.exists()


def test_job_timeout_while_running_replaces_the_worker(pool):
    before = pool.score("m", workloads.pid)
    job_id = pool.create_job(workloads.spin, "m", args=(600.0,), timeout=0.2)
    with pytest.raises(JobTimeoutError, match="while running") as info:
        pool.get_result(job_id, timeout=30)
    assert info.value.while_running
    assert pool.score("m", workloads.pid) != before
    assert pool.stats().jobs_timed_out == 1


def test_pool_wide_job_timeout():
    with make_pool({"m": load_constant}, nb_workers=1, job_timeout=0.2) as pool:
        with pytest.raises(JobTimeoutError):
            pool.score("m", workloads.spin, 600.0)
        # The replacement may take longer than 0.2 s to start: this job gets its own deadline.
        assert pool.get_result(pool.create_job(add, "m", args=(1,), timeout=60), timeout=60) == 11


@pytest.mark.timeout(60)
def test_a_cancelled_queued_future_is_done_for_wait_and_as_completed(pool, fifo):
    """As with an executor: concurrent.futures.wait() and as_completed() see a
    future cancelled before it ran as done (they wait for its notification)."""
    gate = fifo()
    blocker = pool.submit("m", wait_for_release, str(gate))
    gate.wait_running()
    queued = [pool.submit("m", add, i) for i in range(20)]
    by_session = pool.session()
    in_session = by_session.submit("m", add, 100)
    assert all(future.cancel() for future in queued[::2])
    by_session.close()  # its queued job is cancelled by the session
    cancelled = [*queued[::2], in_session]
    done, not_done = concurrent.futures.wait(cancelled, timeout=10)
    assert not not_done and done == set(cancelled)
    assert set(concurrent.futures.as_completed(cancelled, timeout=10)) == set(cancelled)
    gate.release_opened()
    assert [f.result(timeout=30) for f in queued[1::2]] == [10 + i for i in range(1, 20, 2)]
    assert blocker.result(timeout=30) is not None
