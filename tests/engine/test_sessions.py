"""Sessions: what belongs to one, what closing it does to every kind of call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
from helpers.workloads import add, load_constant, wait_for_release

from mlpool import MLPool, PoolClosedError, PoolFullError

pytestmark = pytest.mark.usefixtures("no_leaked_workers")


@pytest.fixture
def full_pool(fifo):
    """One worker held by a FIFO-blocked job and a queue of one, filled: every
    new job waits for room until the test releases the gate."""
    with MLPool({"m": load_constant}, nb_workers=1, max_queue_size=1) as pool:
        gate = fifo()
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        filler = pool.submit("m", add, 1)
        yield pool
        gate.release_opened()
        assert blocker.result(timeout=30) > 0
        assert filler.result(timeout=30) == 11


def test_closing_a_session_wakes_its_calls_waiting_for_room_at_once(full_pool):
    pool = full_pool
    session = pool.session()
    threads = concurrent.futures.ThreadPoolExecutor(2)

    async def main() -> tuple[list, list]:
        scoring = asyncio.ensure_future(session.score_async("m", add, 2))
        creating = asyncio.ensure_future(session.create_job_async(add, "m", args=(3,)))
        await asyncio.sleep(0)  # one step each: both now wait for room in the full queue
        blocking = [threads.submit(session.submit, "m", add, 4), threads.submit(session.create_job, add, "m", (5,))]
        session.close()
        # The gate still holds the worker: no room can appear; only the close can end these waits.
        waits = await asyncio.wait_for(asyncio.gather(scoring, creating, return_exceptions=True), 10)
        return waits, [f.exception(timeout=10) for f in blocking]

    (scored, created), (submitted, created_sync) = asyncio.run(main())
    threads.shutdown()
    assert isinstance(scored, asyncio.CancelledError)
    assert isinstance(created, PoolClosedError) and "waited for room" in str(created)
    # A thread that reached its wait before close() is cancelled; one that came after is refused.
    assert isinstance(submitted, (concurrent.futures.CancelledError, PoolClosedError))
    assert isinstance(created_sync, PoolClosedError)
    assert pool.stats().queue_depth == 1  # only the filler: none of the session's jobs got in


def test_jobs_refused_with_pool_full_are_not_the_sessions(full_pool):
    pool = full_pool
    with pool.session() as session:
        for _ in range(100):
            with pytest.raises(PoolFullError):
                session.create_job(add, "m", args=(2,), block_until_scheduled=False)
        cancelled_before = pool.stats().jobs_cancelled
        assert session.close() == 0
    assert pool.stats().jobs_cancelled == cancelled_before


def test_a_session_holds_only_its_unfinished_jobs():
    with MLPool({"m": load_constant}, nb_workers=2) as pool, pool.session() as session:
        done = threading.Semaphore(0)
        futures = [session.submit("m", add, i) for i in range(2000)]
        for future in futures:  # after the session's own done-callback
            future.add_done_callback(lambda _: done.release())
        for _ in futures:
            assert done.acquire(timeout=60)
        assert session.unfinished == 0  # each job left at its completion, with no later call
        assert [f.result() for f in futures[:3]] == [10, 11, 12]
        assert session.close() == 0


def test_jobs_submitted_from_several_threads_while_the_session_closes_are_all_cancelled(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        session = pool.session()
        start = threading.Barrier(4)

        def client(closer: bool) -> list[concurrent.futures.Future]:
            futures = []
            start.wait()
            try:
                while True:
                    futures.append(session.submit("m", add, 1))
                    if closer and len(futures) == 300:
                        session.close()
            except (PoolClosedError, concurrent.futures.CancelledError):  # refused, or cancelled on its way in
                return futures

        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            runs = [threads.submit(client, i == 0) for i in range(4)]
            futures = [f for run in runs for f in run.result(timeout=60)]
        assert len(futures) >= 300
        # Every job the session admitted was cancelled by close(): none slipped past it.
        assert all(f.cancelled() for f in futures)
        assert pool.stats().queue_depth == 0
        gate.release_opened()
        assert blocker.result(timeout=30) > 0
