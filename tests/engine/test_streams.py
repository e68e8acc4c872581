"""Streams (#17): a generator in a worker, an (async) iterator in the caller.

Generators report what they did through a FIFO (``helpers.markers.Markers``):
the tests wait on those events (an item produced, a ``finally`` run), never on time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os

import pytest
from helpers import stream_workloads as sw
from helpers.markers import Markers
from helpers.pools import make_pool
from helpers.structure import child_side, mlpool_imports
from helpers.workloads import load_constant

from mlpool import JobTimeoutError, MLPool, Model, WorkerCrashedError, batched

WINDOW = 16  # the pools' stream_buffer


@pytest.fixture
def markers(tmp_path):
    m = Markers(tmp_path / "markers")
    yield m
    m.close()


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool({"m": load_constant}, nb_workers=1, max_retries=1, stream_buffer=WINDOW) as pool:
        yield pool


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def finally_pid(markers: Markers) -> int:
    """Wait for the generator's ``finally``; the pid of the worker that ran it."""
    return int(markers.until("finally").split()[2])


# ------------------------------------------------------------------ items


def test_items_arrive_in_order(pool):
    assert list(pool.stream("m", sw.count, 1000)) == list(range(1000))
    assert list(pool.stream("m", sw.returns_list, 5)) == [0, 1, 2, 3, 4]  # any iterable


def test_the_first_item_arrives_while_the_generator_still_runs(pool, fifo):
    gate = fifo()
    with pool.stream("m", sw.first_then_gate, str(gate)) as items:
        # The generator cannot finish before the test opens the gate, which it does only now.
        assert next(items) == "first"
        gate.release()
        assert next(items) == "second"
        with pytest.raises(StopIteration):
            next(items)


def test_async_items_arrive_in_order_and_first_before_the_end(pool, fifo):
    async def main() -> None:
        assert [x async for x in pool.stream_async("m", sw.count, 500)] == list(range(500))
        gate = fifo()
        async with pool.stream_async("m", sw.first_then_gate, str(gate)) as items:
            assert await items.__anext__() == "first"
            await asyncio.get_running_loop().run_in_executor(None, gate.release)
            assert [x async for x in items] == ["second"]

    asyncio.run(main())


def test_large_items_cross_in_shared_memory_and_leave_nothing(pool):
    before = 0
    for round in range(5):  # 3 rounds fill the pool's cache of idle shared memory (16 regions) for good
        for i, array in enumerate(pool.stream("m", sw.arrays, 6, 4 * 2**20)):
            assert array.shape == (4 * 2**20,) and int(array[0]) == int(array[-1]) == i
            del array
        gc.collect()
        if round == 2:
            before = open_fds()
    assert open_fds() <= before


# -------------------------------------------------------------- backpressure


def test_a_paused_consumer_holds_the_generator_to_about_the_buffer(pool, markers):
    items = pool.stream("m", sw.marked_forever, str(markers))
    assert next(items) == 0
    # Could run for ever; the window stops it at its WINDOW-th item while the consumer pauses.
    markers.until(f"item {WINDOW - 1}")
    items.close()
    produced = int(markers.until("finally").split()[1])
    assert produced <= WINDOW + 1, f"the generator ran {produced} items ahead of a consumer that took 1"


@pytest.mark.parametrize("n", [10_000, pytest.param(100_000, marks=pytest.mark.soak)])
def test_consuming_gives_credit_back(pool, n):
    """10,000 items (100,000 under soak) through a window of 16: credits keep the worker going."""
    with pool.stream("m", sw.count, n) as items:
        assert sum(1 for _ in items) == n


# ------------------------------------------------------------------ closing


def _close_sync(pool: MLPool, markers: Markers, how: str) -> None:
    if how == "with":
        with pool.stream("m", sw.marked_forever, str(markers)) as items:
            assert next(items) == 0
    elif how == "close":
        items = pool.stream("m", sw.marked_forever, str(markers))
        assert next(items) == 0
        items.close()
        with pytest.raises(ValueError, match="closed"):
            next(items)
    elif how == "break and drop":
        for _ in pool.stream("m", sw.marked_forever, str(markers)):
            break
    elif how == "session":
        with pool.session() as session:
            items = session.stream("m", sw.marked_forever, str(markers))
            assert next(items) == 0
        with pytest.raises(concurrent.futures.CancelledError):
            for _ in items:  # the buffered items, then the cancellation
                pass


@pytest.mark.parametrize("how", ["with", "close", "break and drop", "session"])
def test_closing_stops_the_generator_and_frees_the_worker(pool, markers, how):
    before = open_fds()
    _close_sync(pool, markers, how)
    pid = finally_pid(markers)  # the generator's finally ran, in the pool's only worker...
    assert pool.score("m", sw.pid) == pid  # ...which serves the next job
    assert open_fds() <= before


async def _close_async(pool: MLPool, markers: Markers, how: str, fifo) -> None:
    if how == "aclose":
        items = pool.stream_async("m", sw.marked_forever, str(markers))
        assert await items.__anext__() == 0
        await items.aclose()
        with pytest.raises(ValueError, match="closed"):
            await items.__anext__()
    elif how == "async with":
        async with pool.stream_async("m", sw.marked_forever, str(markers)) as items:
            assert await items.__anext__() == 0
    elif how == "break and drop":
        async for _ in pool.stream_async("m", sw.marked_forever, str(markers)):
            break
    elif how == "session":
        async with pool.session() as session:
            items = session.stream_async("m", sw.marked_forever, str(markers))
            assert await items.__anext__() == 0
    elif how == "task cancelled":
        gate = fifo()
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in pool.stream_async("m", sw.stuck_after_one, str(markers), str(gate)):
                first.set()  # then waits in __anext__: the generator is stuck before its next yield

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 30)
        await asyncio.get_running_loop().run_in_executor(None, markers.until, "stuck")  # past its yield
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The close waits in the pipe; the generator sees it at its next yield.
        await asyncio.get_running_loop().run_in_executor(None, gate.release)


@pytest.mark.parametrize("how", ["aclose", "async with", "break and drop", "session", "task cancelled"])
def test_closing_an_async_stream_stops_the_generator_and_frees_the_worker(pool, markers, fifo, how):
    async def main() -> None:
        await _close_async(pool, markers, how, fifo)
        loop = asyncio.get_running_loop()
        if how == "task cancelled":
            await loop.run_in_executor(None, markers.until, "finally")
            pid = None
        else:
            pid = await loop.run_in_executor(None, finally_pid, markers)
        served = await pool.score_async("m", sw.pid)
        assert pid is None or served == pid

    asyncio.run(main())


@pytest.mark.parametrize("how", ["close", "session"])
def test_interrupt_kills_a_generator_stuck_between_yields(fifo, no_leaked_workers, tmp_path, how):
    markers = Markers(tmp_path / "markers")
    gate = fifo()
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        session = pool.session(interrupt=True)
        items = session.stream("m", sw.stuck_after_one, str(markers), str(gate))
        stuck_pid = next(items)
        markers.until("stuck")
        if how == "close":
            items.close(interrupt=True)
        else:
            session.close()
        assert pool.score("m", sw.pid) != stuck_pid  # replaced, and serving
    markers.close()


# ------------------------------------------------------------------- errors


def test_the_generators_exception_comes_after_its_items(pool):
    got = []
    with pytest.raises(ValueError, match="failed after 3 items") as info:
        for item in pool.stream("m", sw.raise_after, 3):
            got.append(item)
    assert got == [0, 1, 2]
    assert "raise_after" in str(info.value.__cause__)  # the worker's traceback
    assert pool.score("m", sw.pid) > 0


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_a_crash_mid_stream_raises_after_the_delivered_items_and_is_not_replayed(pool, how):
    got = []
    with pytest.raises(WorkerCrashedError):
        for item in pool.stream("m", sw.crash_after, 2, how):  # max_retries=1: not used, items were delivered
            got.append(item)
    assert got == [0, 1]
    assert pool.score("m", sw.pid) > 0


def test_a_stream_that_crashed_before_its_first_item_is_retried(pool, tmp_path):
    assert list(pool.stream("m", sw.crash_first_time, str(tmp_path / "crashed"), 3)) == [0, 1, 2]


@pytest.mark.parametrize("where", ["pool", "options"])
def test_the_stream_timeout_bounds_the_whole_stream(fifo, worker_mode, tmp_path, no_leaked_workers, where):
    markers = Markers(tmp_path / "markers")
    gate = fifo()
    timeout = {"job_timeout": 1.5} if where == "pool" else {}
    with make_pool({"m": load_constant}, nb_workers=1, **timeout) as pool:
        api = pool if where == "pool" else pool.options(timeout=1.5)
        items = api.stream("m", sw.stuck_after_one, str(markers), str(gate))
        assert next(items) > 0  # delivered at once; the generator then hangs
        with pytest.raises(JobTimeoutError):
            next(items)
        assert pool.score("m", sw.pid) > 0
    markers.close()


def test_a_model_with_workers_of_its_own_streams_from_them(worker_mode):
    with make_pool({"shared": load_constant, "own": Model(load_constant, workers=1)}, nb_workers=1) as pool:
        own = pool.score("own", sw.pid)
        assert list(pool.stream("own", sw.count, 5)) == [0, 1, 2, 3, 4]
        with pool.options(priority=5).stream("shared", sw.count, 3) as items:
            assert list(items) == [0, 1, 2]
        assert pool.score("own", sw.pid) == own  # the group's worker served the stream and serves on


# ----------------------------------------------------------------- bad use


def test_a_function_that_returns_no_iterable_is_a_type_error(pool):
    with pytest.raises(TypeError, match="not iterable"):
        list(pool.stream("m", sw.not_iterable))
    assert pool.score("m", sw.pid) > 0


def test_an_item_that_cannot_be_pickled_fails_the_stream_and_closes_the_generator(pool, markers):
    got = []
    with pytest.raises(Exception, match="pickle") as info:
        for item in pool.stream("m", sw.unpicklable_second, str(markers)):
            got.append(item)
    assert got == [1]
    assert not isinstance(info.value, WorkerCrashedError)
    markers.until("finally")
    assert pool.score("m", sw.pid) > 0


@batched(max_batch_size=4)
def batch_of(model: dict, items: list) -> list:
    return items


def test_a_batched_function_cannot_stream(pool):
    with pytest.raises(TypeError, match="batched"):
        pool.stream("m", batch_of, 1)


def test_bad_stream_buffer_is_refused():
    with pytest.raises(ValueError, match="stream_buffer"):
        MLPool({"m": load_constant}, nb_workers=0, stream_buffer=0)


# ------------------------------------------------------------------ inline


def test_inline_mode_streams_lazily_and_closes_the_generator(markers):
    with MLPool({"m": load_constant}, nb_workers=0) as pool:
        assert list(pool.stream("m", sw.count, 5)) == [0, 1, 2, 3, 4]
        with pool.stream("m", sw.marked_forever, str(markers)) as items:
            assert [next(items) for _ in range(3)] == [0, 1, 2]
        assert markers.until("finally").split()[1] == "2"  # produced only what was asked
        with pytest.raises(ValueError, match="failed after 2"):
            list(pool.stream("m", sw.raise_after, 2))
        with pytest.raises(TypeError, match="not iterable"):
            list(pool.stream("m", sw.not_iterable))

        async def main() -> list:
            return [x async for x in pool.stream_async("m", sw.count, 3)]

        assert asyncio.run(main()) == [0, 1, 2]


def test_the_worker_half_of_streams_imports_only_the_child_side():
    assert sorted(name for name in mlpool_imports("_worker.stream") if not child_side(name)) == []
    assert "_worker.stream" in mlpool_imports("_worker.main")


def test_a_stream_closed_as_it_starts_never_holds_the_worker(pool):
    """The close may reach the worker in the same read as the stream's start."""
    for _ in range(30):
        pool.stream("m", sw.count, 10**9).close()
        assert pool.score("m", sw.pid) > 0
