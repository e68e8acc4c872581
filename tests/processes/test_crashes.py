"""Real faults in workers: the job that died fails with WorkerCrashedError,
every other caller is served, the pool comes back to full strength."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from helpers import workloads
from helpers.pools import make_pool
from helpers.workloads import add, load_constant, wait_for_release

from mlpool import MLPool, WorkerCrashedError

pytestmark = pytest.mark.usefixtures("worker_mode", "no_leaked_workers")


def assert_full_strength(pool: MLPool, fifo) -> set[int]:
    """All nb_workers run a job at the same moment (each blocks until released)."""
    gates = [fifo() for _ in range(pool.nb_workers)]
    futures = [pool.submit("m", wait_for_release, str(g)) for g in gates]
    for gate in gates:
        gate.wait_running()  # would time out if fewer workers were alive
    for gate in gates:
        gate.release_opened()
    pids = {f.result(timeout=30) for f in futures}
    assert len(pids) == pool.nb_workers
    return pids


@pytest.mark.parametrize(
    ("fault", "args", "expected"),
    [
        (workloads.sigkill_self, (), "SIGKILL"),
        (workloads.segfault, (), "SIGSEGV"),
        (workloads.exit_now, (3,), "exited with code 3"),
    ],
    ids=["sigkill", "segfault", "os._exit"],
)
def test_worker_death_fails_only_its_job(fault, args, expected, fifo):
    with make_pool({"m": load_constant}, nb_workers=2) as pool:
        before = assert_full_strength(pool, fifo)
        gate = fifo()
        survivor = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        with pytest.raises(WorkerCrashedError, match=expected) as info:
            pool.score("m", fault, *args)
        assert info.value.pid in before
        assert fault.__name__ in str(info.value)
        gate.release_opened()
        assert survivor.result(timeout=30) in before  # the other worker's job is untouched
        after = assert_full_strength(pool, fifo)
        assert len(after - before) == 1  # exactly one replacement
        assert pool.score("m", add, 1) == 11
        assert pool.stats().jobs_crashed == 1


def test_sigkill_from_outside_while_busy(fifo):
    with make_pool({"m": load_constant}, nb_workers=2) as pool:
        gate = fifo()
        job_id = pool.create_job(wait_for_release, "m", args=(str(gate),))
        gate.wait_running()
        os.kill(gate.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match=f"pid {gate.pid}.*SIGKILL"):
            pool.get_result(job_id, timeout=30)
        assert_full_strength(pool, fifo)


def test_crash_while_async_callers_wait(fifo):
    async def main(pool):
        crash = asyncio.ensure_future(pool.score_async("m", workloads.sigkill_self))
        others = [pool.score_async("m", add, i) for i in range(50)]
        results = await asyncio.gather(*others)
        with pytest.raises(WorkerCrashedError):
            await crash
        return results

    with make_pool({"m": load_constant}, nb_workers=2) as pool:
        assert asyncio.run(main(pool)) == [10 + i for i in range(50)]
        assert_full_strength(pool, fifo)


def test_jobs_queued_behind_a_crash_still_run(fifo):
    with make_pool({"m": load_constant}, nb_workers=1) as pool:
        # Teach the pool that add is short, so several add jobs may wait
        # inside the worker, behind the crashing job.
        for i in range(20):
            pool.score("m", add, i)
        crash = pool.submit("m", workloads.sigkill_self)
        queued = [pool.submit("m", add, i) for i in range(30)]
        with pytest.raises(WorkerCrashedError):
            crash.result(timeout=30)
        assert [f.result(timeout=30) for f in queued] == [10 + i for i in range(30)]
