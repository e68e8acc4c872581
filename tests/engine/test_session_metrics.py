"""Sessions, latency statistics and the Prometheus collector."""

from __future__ import annotations

import asyncio

import pytest
from helpers import workloads
from helpers.workloads import add, load_constant, touch, wait_for_release
from prometheus_client import CollectorRegistry, generate_latest

from mlpool import MLPool, PoolClosedError
from mlpool.prometheus import PoolCollector

pytestmark = pytest.mark.usefixtures("no_leaked_workers")


def test_closing_a_session_cancels_its_unfinished_jobs(fifo, tmp_path):
    markers = [tmp_path / f"ran-{i}" for i in range(4)]
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()

        async def main():
            async with pool.session(interrupt=True) as session:
                running = asyncio.ensure_future(session.score_async("m", wait_for_release, str(gate)))
                await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)
                queued = [asyncio.ensure_future(session.score_async("m", touch, str(m))) for m in markers]
                job_id = await session.create_job_async(touch, "m", args=(str(tmp_path / "by-id"),))
                future = session.submit("m", touch, str(tmp_path / "by-future"))
                await asyncio.sleep(0)  # let the tasks submit their jobs
            # left the block: everything above was cancelled, the running job's worker killed
            results = await asyncio.gather(running, *queued, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            assert future.cancelled()
            return job_id, session

        job_id, session = asyncio.run(main())
        assert pool.score("m", add, 1) == 11  # after anything that might have stayed queued
        assert not any(m.exists() for m in markers)
        assert not (tmp_path / "by-id").exists() and not (tmp_path / "by-future").exists()
        with pytest.raises(PoolClosedError, match="session is closed"):
            session.submit("m", add, 1)
        assert pool.stats().worker_restarts == 1  # interrupt=True freed the worker


def test_session_keeps_finished_results():
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        with pool.session() as session:
            assert session.submit("m", add, 1).result(timeout=30) == 11
            job_id = session.create_job(add, "m", args=(2,))
            assert pool.get_result(job_id, timeout=30) == 12
        assert session.close() == 0


def test_stats_latency_summary_and_histogram():
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        assert pool.stats().latency_p50 is None
        for i in range(50):
            pool.score("m", add, i)
        pool.score("m", workloads.spin, 0.05)
        stats = pool.stats()
        assert 0 < stats.latency_p50 <= stats.latency_p95 <= stats.latency_p99
        assert stats.latency_p99 >= 0.05 or stats.latency_count > 51  # the slow job is in the window
        assert stats.latency_count == 51
        assert stats.latency_buckets[-1] == (float("inf"), 51)
        assert stats.run_seconds_mean is not None and stats.run_seconds_mean > 0
        assert stats.estimated_wait == 0.0  # nothing queued


def test_prometheus_collector_exposes_the_pool():
    registry = CollectorRegistry()
    with MLPool({"m": load_constant}, nb_workers=2) as pool:
        PoolCollector(pool, pool_name="test").register(registry)
        for i in range(5):
            pool.score("m", add, i)
        with pytest.raises(ValueError):
            pool.score("m", workloads.raise_value_error, "x")
        text = generate_latest(registry).decode()
    assert 'mlpool_workers_alive{pool="test"} 2.0' in text
    assert 'mlpool_jobs_total{outcome="completed",pool="test"} 5.0' in text
    assert 'mlpool_jobs_total{outcome="failed",pool="test"} 1.0' in text
    assert 'mlpool_job_latency_seconds_count{pool="test"} 6.0' in text
    assert 'mlpool_healthy{pool="test"} 1.0' in text


def test_cancelling_a_job_that_waits_for_room_keeps_the_queue_count_right(fifo):
    with MLPool({"m": load_constant}, nb_workers=1, max_queue_size=1) as pool:
        gate = fifo()

        async def main():
            blocker = asyncio.ensure_future(pool.score_async("m", wait_for_release, str(gate)))
            await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)
            async with pool.session() as session:
                queued = asyncio.ensure_future(session.score_async("m", workloads.spin, 0.01))
                waiting = asyncio.ensure_future(session.score_async("m", workloads.spin, 0.01))
                await asyncio.sleep(0)  # both submit: one fills the queue, one waits for room
                assert pool.stats().queue_depth == 1
            assert pool.stats().queue_depth == 0  # both cancelled, each counted once
            gate.release_opened()
            await blocker
            for task in (queued, waiting):
                with pytest.raises(asyncio.CancelledError):
                    await task
            return await pool.score_async("m", add, 1)

        assert asyncio.run(main()) == 11
        assert pool.stats().queue_depth == 0
        with pytest.raises(Exception) as info:  # the queue of one still admits exactly one
            gate2 = fifo()
            pool.submit("m", wait_for_release, str(gate2))
            gate2.wait_running()
            pool.create_job(workloads.spin, "m", args=(0.01,))
            pool.create_job(workloads.spin, "m", args=(0.01,), block_until_scheduled=False)
        assert type(info.value).__name__ == "PoolFullError"
        gate2.release_opened()
