"""One pool shared by several API processes (``share_across_processes``): every API, in every process.

The API processes are this test process and ``helpers.shared_api`` children;
the pool host and its workers are real processes, counted before and after.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import CancelledError

import numpy as np
import psutil
import pytest
from helpers import shared_models
from helpers.shared_processes import (
    ApiProcess,
    host_and_workers,
    wait_gone,
    workers_of,
)

from mlpool import MLPool
from mlpool.errors import (
    MLPoolError,
    PoolFullError,
    PoolMismatchError,
    SerializationError,
    UnknownJobError,
    WorkerCrashedError,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def shared(share_name, tmp_path):
    """``make(**options)``: a pool of this process attached to a fresh name;
    at the end every pool made is shut down and its host and workers are gone."""
    name = share_name
    pools: list[MLPool] = []
    hosts: list[psutil.Process] = []

    def make(nb_workers: int = 2, **options) -> MLPool:
        pool = MLPool(shared_models.MODELS, nb_workers, share_across_processes=name, **options)
        pools.append(pool)
        hosts.extend(host_and_workers(pool.stats().process.host_pid))
        return pool

    make.name = name  # type: ignore[attr-defined]
    make.loads = tmp_path  # type: ignore[attr-defined]
    yield make
    for pool in pools:
        pool.shutdown()
    wait_gone(hosts)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_three_api_processes_share_two_workers_loaded_once_each(shared):
    pool = shared()
    others = [ApiProcess(shared.name), ApiProcess(shared.name)]
    try:
        infos = [other.ask("info") for other in others]
        host = pool.stats().process.host_pid
        assert {info["host_pid"] for info in infos} == {host}
        assert pool.stats().process.processes == 3
        mine = {pool.score("m", shared_models.pid) for _ in range(20)}
        theirs = {pid for other in others for pid in other.ask("pids", n=20)}
        workers = workers_of(host)
        assert len(workers) == 2 and mine | theirs <= workers
        assert shared_models.loads(shared.loads) == 2  # two workers, one load each, for three processes
        stats = pool.stats()
        assert stats.workers_alive == 2 and stats.state == "running"
        assert stats.jobs_completed >= 60  # the whole pool's
        assert stats.process.jobs_completed == 20  # this process's own
    finally:
        for other in others:
            other.leave()


def test_a_job_id_belongs_to_the_process_that_made_it(shared):
    pool = shared()
    other = ApiProcess(shared.name)
    try:
        theirs = other.ask("job")
        with pytest.raises(UnknownJobError):
            pool.get_result(theirs, timeout=5)
        mine = pool.create_job(shared_models.pid, "m")
        assert other.ask("get", id=mine) == "UnknownJobError"
        assert isinstance(other.ask("get", id=theirs), int)  # still there for its owner
        assert isinstance(pool.get_result(mine, timeout=30), int)
    finally:
        other.leave()


@pytest.mark.parametrize("size", [8 * 2**20, 64 * 2**20])
def test_large_arrays_cross_both_ways_through_shared_memory(shared, size):
    pool = shared()
    array = np.random.default_rng(0).random(size // 8)
    before = _fds()
    for _ in range(3):
        result = pool.score("m", shared_models.double, array)
        np.testing.assert_array_equal(result, array * 2)
        del result
    assert _fds() <= before + 2  # regions kept for reuse, nothing more
    items = list(pool.stream("m", _arrays, 3, size // 8))
    assert [float(item[0]) for item in items] == [0.0, 1.0, 2.0]


def _arrays(model, n, length):
    for i in range(n):
        yield np.full(length, float(i))


def test_every_job_api_works_through_the_host(shared):
    pool = shared()
    assert pool.submit("m", shared_models.double, 21).result(30) == 42
    job = pool.create_job(shared_models.double, "m", args=(4,))
    assert pool.get_result(job, timeout=30) == 8
    with pytest.raises(UnknownJobError):
        pool.get_result(job)
    assert pool.options(priority=5, timeout=30).score("m", shared_models.double, 1) == 2

    async def main():
        job = await pool.create_job_async(shared_models.double, "m", args=(3,))
        values = await asyncio.gather(*(pool.score_async("m", shared_models.double, i) for i in range(20)))
        streamed = [item async for item in pool.stream_async("m", _count, 5)]
        return await pool.get_result_async(job), values, streamed

    fetched, values, streamed = asyncio.run(main())
    assert fetched == 6 and values == [2 * i for i in range(20)] and streamed == list(range(5))
    with pool.session() as session:
        assert session.score("m", shared_models.double, 5) == 10


def _count(model, n):
    yield from range(n)


def _raise(model):
    raise KeyError("from the worker")


def _exit(model):
    os._exit(7)


def test_errors_come_back_as_they_would_from_a_pool_of_ones_own(shared):
    pool = shared()
    with pytest.raises(KeyError) as raised:
        pool.score("m", _raise)
    assert "from the worker" in str(raised.value.__cause__)
    with pytest.raises(WorkerCrashedError, match="code 7"):
        pool.score("m", _exit)
    with pytest.raises(SerializationError):
        pool.score("m", shared_models.double, open(os.devnull))
    with pytest.raises(ValueError, match="unknown model"):
        pool.score("nope", shared_models.double, 1)
    assert pool.score("m", shared_models.double, 2) == 4  # still serving


def test_cancel_and_interrupt_reach_the_host(shared, fifo):
    pool = shared(nb_workers=1)
    held = fifo()
    future = pool.submit("m", shared_models.wait_on, str(held))
    held.wait_running()
    worker = held.pid
    restarts = pool.stats().worker_restarts
    job = pool.create_job(shared_models.double, "m", args=(1,))
    assert pool.cancel_job(job, interrupt=False) is True  # queued or sent behind: it never answers
    with pytest.raises(UnknownJobError):
        pool.get_result(job)
    assert future.cancel() is True
    with pytest.raises(CancelledError):
        future.result()
    held.release_opened()
    interrupted = fifo()
    with pool.session(interrupt=True) as session:
        session.submit("m", shared_models.wait_on, str(interrupted))
        interrupted.wait_running()
        victim = interrupted.pid
        process = psutil.Process(victim)
    process.wait(30)  # the session's close killed its worker
    assert pool.score("m", shared_models.pid) != victim  # served by its replacement
    assert pool.stats().worker_restarts == restarts + 1
    assert worker > 0


def test_the_share_of_the_queue_is_bounded_per_process(shared, fifo):
    pool = shared(nb_workers=1, max_queue_size=4)
    held = fifo()
    first = pool.submit("m", shared_models.wait_on, str(held))
    held.wait_running()
    share = 4 + 1  # max_queue_size // 1 process + one slot
    jobs = [
        pool.create_job(shared_models.double, "m", args=(i,), block_until_scheduled=False) for i in range(share - 1)
    ]
    with pytest.raises(PoolFullError, match="share"):
        pool.create_job(shared_models.double, "m", args=(9,), block_until_scheduled=False)
    held.release_opened()
    assert first.result(30) > 0
    assert [pool.get_result(job, timeout=30) for job in jobs] == [2 * i for i in range(share - 1)]


def test_stats_and_worker_stacks_show_the_whole_pool(shared):
    pool = shared()
    other = ApiProcess(shared.name)
    try:
        other.ask("pids", n=5)
        pool.score("m", shared_models.pid)
        stats = pool.stats()
        assert stats.process.processes == 2 and stats.process.pid == os.getpid()
        assert stats.jobs_completed >= 6 and stats.process.jobs_completed == 1
        stacks = pool.worker_stacks()
        assert set(stacks) == workers_of(stats.process.host_pid)
        assert all("Thread" in text or "File" in text for text in stacks.values())
    finally:
        other.leave()
    assert pool.stats().process.processes == 1


def test_reload_models_rolls_the_host_s_workers(shared):
    pool = shared()
    before = {pool.score("m", shared_models.pid) for _ in range(10)}
    pool.reload_models()
    stats = pool.stats()
    assert stats.models["m"].version == 2
    after = {pool.score("m", shared_models.pid) for _ in range(10)}
    assert not before & after
    assert shared_models.loads(shared.loads) == 4


def test_a_process_that_leaves_keeps_the_host_for_the_others(shared):
    pool = shared()
    other = ApiProcess(shared.name)
    other.ask("pids", n=3)
    other.leave()
    assert pool.stats().process.processes == 1
    assert pool.score("m", shared_models.double, 1) == 2


def test_fds_and_threads_come_back_after_a_shared_pool_closes(shared):
    pool = shared()
    pool.score("m", shared_models.pid)
    pool.shutdown()
    fds, threads = _fds(), {t.ident for t in threading.enumerate()}
    for _ in range(3):
        again = shared()
        for _ in range(20):
            again.score("m", shared_models.double, np.ones(100_000))
        again.shutdown()
    assert _fds() <= fds
    assert {t.ident for t in threading.enumerate()} <= threads


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nb_workers": 0}, "needs worker processes"),
        ({"backend": "ray"}, "backend='ray'"),
    ],
)
def test_settings_that_cannot_share_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        MLPool(shared_models.MODELS, share_across_processes="x", **options)


@pytest.mark.parametrize("value", ["", 1, None, b"x"])
def test_a_bad_share_value_is_a_type_error(value):
    with pytest.raises(TypeError, match="share_across_processes"):
        MLPool(shared_models.MODELS, 1, share_across_processes=value)


def test_another_pool_under_the_same_name_is_refused_naming_the_difference(shared):
    shared(nb_workers=2)
    with pytest.raises(PoolMismatchError, match="nb_workers: the pool host has 2, this process asks for 1"):
        MLPool(shared_models.MODELS, 1, share_across_processes=shared.name)
    with pytest.raises(PoolMismatchError, match="model 'other'"):
        MLPool({**shared_models.MODELS, "other": shared_models.load}, 2, share_across_processes=shared.name)


def test_a_forked_child_cannot_use_its_parent_s_shared_pool(shared):
    pool = shared()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            pool.score("m", shared_models.pid)
        except MLPoolError as exc:
            os._exit(0 if "forked" in str(exc) else 2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.score("m", shared_models.double, 1) == 2



def test_a_quick_function_that_turns_slow_does_not_hold_up_its_process(shared, fifo):
    """The host's relay reads a quick job's worker itself, but only so long: a
    call that turns slow is left to the host's manager thread, and the same
    process's next jobs go to the other worker meanwhile."""
    pool = shared(nb_workers=2)
    for _ in range(30):  # learned as quick (under a millisecond)
        pool.score("m", shared_models.quick_or_wait, None)
    held = fifo()
    slow = pool.submit("m", shared_models.quick_or_wait, str(held))
    held.wait_running()
    assert pool.score("m", shared_models.quick_or_wait, None) != held.pid  # served while the first waits
    held.release_opened()
    assert slow.result(30) == held.pid
