"""Who reads a worker's pipe: the manager thread, a caller thread (idle pool)
or an event loop (while its jobs keep the worker busy). Every mix must keep
every caller served, whatever happens to the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
from helpers import workloads
from helpers.workloads import add, echo, load_constant, wait_for_release

from mlpool import MLPool, WorkerCrashedError

pytestmark = pytest.mark.usefixtures("no_leaked_workers")


def test_threads_and_two_event_loops_share_the_pool():
    with MLPool({"m": load_constant}, nb_workers=2) as pool:

        def loop_client(tag: str) -> list:
            async def main():
                return await asyncio.gather(*(pool.score_async("m", echo, (tag, i)) for i in range(300)))

            return asyncio.run(main())

        def thread_client(tag: str) -> list:
            return [pool.score("m", echo, (tag, i)) for i in range(150)] + [
                f.result(timeout=30) for f in [pool.submit("m", echo, (tag, i)) for i in range(150, 300)]
            ]

        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            futures = {
                tag: threads.submit(client, tag)
                for tag, client in (
                    ("loop1", loop_client),
                    ("loop2", loop_client),
                    ("t1", thread_client),
                    ("t2", thread_client),
                )
            }
            for tag, future in futures.items():
                assert future.result(timeout=120) == [(tag, i) for i in range(300)]


def test_loop_that_ends_with_a_job_in_flight_does_not_keep_the_worker(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()

        async def leave_a_job_running():
            asyncio.ensure_future(pool.score_async("m", wait_for_release, str(gate)))
            await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)
            # asyncio.run cancels the task, and closes the loop, with the job still running

        asyncio.run(leave_a_job_running())
        done = pool.submit("m", add, 1)
        gate.release_opened()
        assert done.result(timeout=30) == 11
        assert pool.score("m", add, 2) == 12


def test_stopped_loop_with_a_job_in_flight_does_not_hang_other_callers(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(pool.score_async("m", wait_for_release, str(gate)))
            loop.run_until_complete(loop.run_in_executor(None, gate.wait_running))
            # The loop is stopped (not closed) and holds the worker's pipe.
            queued = pool.submit("m", add, 1)
            gate.release_opened()
            assert queued.result(timeout=30) == 11
            assert loop.run_until_complete(asyncio.wait_for(task, 30)) > 0  # its own result waited for it
            assert loop.run_until_complete(pool.score_async("m", add, 2)) == 12
        finally:
            loop.close()
        assert pool.score("m", add, 3) == 13


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["asyncio.run returns", "the loop stops"])
def test_a_loop_that_stops_holding_a_busy_workers_pipe_hangs_no_one(fifo, how):
    """Callers who were already waiting when the loop stopped (a thread's job
    queued behind the loop's, a job id fetched from a thread): nothing they
    do later can take the pipe back, so the manager does."""
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        ids: list[str] = []
        made, loop_may_stop = threading.Event(), threading.Event()

        async def leave_jobs_running() -> None:
            ids.append(await pool.create_job_async(wait_for_release, "m", args=(str(gate),)))
            ids.append(await pool.create_job_async(add, "m", args=(2,)))
            made.set()
            await asyncio.get_running_loop().run_in_executor(None, loop_may_stop.wait)

        loop = asyncio.new_event_loop()
        run = asyncio.run if how == "asyncio.run returns" else loop.run_until_complete
        runner = threading.Thread(target=run, args=(leave_jobs_running(),))
        runner.start()
        assert made.wait(30)
        gate.wait_running()  # the loop reads the worker's pipe, busy with its job
        queued = pool.submit("m", add, 1)  # behind it, while the loop runs
        fetched = concurrent.futures.ThreadPoolExecutor(1)
        second = fetched.submit(pool.get_result, ids[1], timeout=30)
        loop_may_stop.set()
        runner.join(30)
        gate.release_opened()  # its answer waits in a pipe only the stopped loop would read
        assert queued.result(timeout=30) == 11
        assert second.result(timeout=30) == 12
        assert pool.get_result(ids[0], timeout=30) > 0
        fetched.shutdown()
        loop.close()


def test_idle_loan_is_taken_back_by_a_thread():
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(pool.score_async("m", add, 1)) == 11
            # The loop keeps an idle loan of the only worker; a thread takes it back.
            result: list[int] = []
            thread = threading.Thread(target=lambda: result.append(pool.score("m", add, 2)))
            thread.start()
            thread.join(30)
            assert result == [12]
            assert loop.run_until_complete(pool.score_async("m", add, 3)) == 13
        finally:
            loop.close()


def test_crash_of_a_worker_lent_to_the_loop():
    async def main(pool):
        assert await pool.score_async("m", add, 1) == 11  # lends a worker to this loop
        results = await asyncio.gather(
            pool.score_async("m", workloads.sigkill_self), *(pool.score_async("m", add, i) for i in range(100)),
            return_exceptions=True,
        )
        return results

    with MLPool({"m": load_constant}, nb_workers=2) as pool:
        results = asyncio.run(main(pool))
        assert isinstance(results[0], WorkerCrashedError)
        assert results[1:] == [10 + i for i in range(100)]
        assert pool.score("m", add, 1) == 11
