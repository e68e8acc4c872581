"""The job-id API from coroutines and threads: waits that end leave nothing,
ids made in a coroutine can be fetched anywhere."""

from __future__ import annotations

import asyncio
import concurrent.futures
import tracemalloc

import pytest
from helpers.workloads import add, load_constant, wait_for_release

from mlpool import MLPool, UnknownJobError

pytestmark = pytest.mark.usefixtures("no_leaked_workers")


@pytest.mark.parametrize("made_in", ["a thread", "the polling loop"])
def test_get_result_async_polls_that_time_out_leave_nothing_on_the_job(fifo, made_in):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        job_id = ""

        async def poll(times: int) -> None:
            for _ in range(times):
                with pytest.raises(TimeoutError):
                    await pool.get_result_async(job_id, timeout=0)

        async def main() -> int:
            nonlocal job_id
            if made_in == "a thread":
                job_id = pool.create_job(wait_for_release, "m", args=(str(gate),))
            else:
                job_id = await pool.create_job_async(wait_for_release, "m", args=(str(gate),))
            await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)
            await poll(1000)  # warm-up: caches, free lists
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                await poll(20_000)
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert grown < 256 * 1024, f"20,000 timed-out polls kept {grown / 2**20:.1f} MiB"
            gate.release_opened()
            return await pool.get_result_async(job_id, timeout=30)

        assert asyncio.run(main()) > 0


def test_sync_polls_that_time_out_leave_nothing_and_see_a_cancellation(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        queued = pool.create_job(add, "m", args=(1,))
        for _ in range(200):
            with pytest.raises(TimeoutError):
                pool.get_result(queued, timeout=0)
        with concurrent.futures.ThreadPoolExecutor(1) as threads:
            waiting = threads.submit(pool.get_result, queued, timeout=60)
            assert pool.cancel_job(queued)
            # The waiting thread wakes at the cancellation (not when a worker would have taken the job).
            with pytest.raises(UnknownJobError, match="cancelled|unknown|fetched"):
                waiting.result(timeout=10)
        gate.release_opened()
        assert blocker.result(timeout=30) > 0


def test_a_job_created_in_a_coroutine_is_fetched_from_any_thread_or_loop(fifo):
    with MLPool({"m": load_constant}, nb_workers=2) as pool:
        gate = fifo()

        async def create() -> tuple[list[str], str]:
            ids = [await pool.create_job_async(add, "m", args=(i,)) for i in range(3)]
            slow = await pool.create_job_async(wait_for_release, "m", args=(str(gate),))
            assert await pool.get_result_async(ids[0], timeout=30) == 10  # read by this loop
            with pytest.raises(RuntimeError, match="get_result_async"):
                pool.get_result(slow)  # would block the loop that reads it
            return ids, slow

        ids, slow = asyncio.run(create())  # the loop ends with `slow` still running
        gate.release()
        assert pool.get_result(slow, timeout=30) > 0
        assert asyncio.run(pool.get_result_async(ids[1], timeout=30)) == 11  # another loop
        with concurrent.futures.ThreadPoolExecutor(1) as threads:
            assert threads.submit(pool.get_result, ids[2], timeout=30).result(timeout=30) == 12


def test_many_coroutines_use_the_job_id_api_concurrently():
    with MLPool({"m": load_constant}, nb_workers=2) as pool:

        async def one(i: int) -> int:
            job_id = await pool.create_job_async(add, "m", args=(i,))
            return await pool.get_result_async(job_id, timeout=60)

        async def main() -> list[int]:
            return await asyncio.gather(*(one(i) for i in range(500)))

        assert asyncio.run(main()) == [10 + i for i in range(500)]
        assert pool.stats().results_unfetched == 0


def test_a_job_id_made_in_a_loop_that_stopped_is_fetched_and_cancelled_from_threads(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        loop = asyncio.new_event_loop()
        try:
            gate = fifo()
            job_id = loop.run_until_complete(pool.create_job_async(wait_for_release, "m", args=(str(gate),)))
            gate.release()  # it finishes while its loop is stopped (not closed): no callback of it runs
            assert pool.get_result(job_id, timeout=30) > 0
            gate = fifo()
            job_id = loop.run_until_complete(pool.create_job_async(wait_for_release, "m", args=(str(gate),)))
            gate.wait_running()
            with concurrent.futures.ThreadPoolExecutor(1) as threads:
                waiting = threads.submit(pool.get_result, job_id, timeout=60)
                assert pool.cancel_job(job_id)
                with pytest.raises(UnknownJobError):
                    waiting.result(timeout=10)
            gate.release_opened()
            assert loop.run_until_complete(pool.score_async("m", add, 1)) == 11  # the loop serves again
        finally:
            loop.close()
