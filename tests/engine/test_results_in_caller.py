"""A result is unpickled in the thread of the caller who asks for it (#25).

The thread that reads a worker's pipe settles the jobs of many callers; if it
unpickled their results, one slow ``__setstate__`` would stall them all, and
one that calls the pool would wait on the very thread that must serve it.
Here results whose rebuilding, in the API process, waits on a gate or calls
the pool: other callers are served meanwhile, and the rebuilding runs in the
asking caller's thread.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial

import pytest
from helpers.pools import make_pool
from helpers.workloads import add, load_constant

from mlpool import SerializationError, UnknownJobError

pytestmark = pytest.mark.usefixtures("worker_mode")

GATES: dict[str, threading.Event] = {}  # token -> what its rebuilding waits for
STARTED: dict[str, threading.Event] = {}  # token -> set when its rebuilding began
REBUILT_IN: dict[str, int] = {}  # token -> the thread that rebuilt it
POOLS: list = []  # the pool a re-entrant rebuilding calls


def rebuild(token: str) -> tuple:
    """Runs in the API process when the result is unpickled."""
    REBUILT_IN[token] = threading.get_ident()
    STARTED.setdefault(token, threading.Event()).set()
    gate = GATES.get(token)
    if gate is not None and not token.startswith("ctrl-c") and not gate.wait(30):
        raise TimeoutError(f"gate {token} never opened")
    if token.startswith("reenter"):
        return ("reentered", POOLS[0].score("m", add, 10, 1))
    if token.startswith("broken"):
        raise ValueError("this result cannot be rebuilt here")
    if token.startswith("ctrl-c") and not gate.is_set():
        # A real SIGINT to this (the main) thread while it unpickles: a Ctrl-C; its
        # handler raises KeyboardInterrupt at the next bytecode, before this returns.
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        raise AssertionError("the SIGINT did not interrupt the unpickling")
    return ("rebuilt", token)


class Rebuilt:
    def __init__(self, token: str) -> None:
        self.token = token

    def __reduce__(self) -> tuple:
        return rebuild, (self.token,)


def rebuilt(model: dict, token: str) -> Rebuilt:
    return Rebuilt(token)


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool({"m": load_constant}, nb_workers=2) as p:
        POOLS[:] = [p]
        yield p
        POOLS.clear()


def _gate(token: str) -> threading.Event:
    GATES[token] = gate = threading.Event()
    STARTED[token] = threading.Event()
    return gate


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["score", "submit", "get_result"])
def test_a_slow_rebuild_stalls_only_its_own_caller(pool, api):
    token = f"slow-{api}"
    gate = _gate(token)

    caller: list[int] = []

    def call() -> tuple:
        caller.append(threading.get_ident())
        if api == "score":
            return pool.score("m", rebuilt, token)
        if api == "submit":
            return pool.submit("m", rebuilt, token).result(timeout=30)
        job_id = pool.create_job(rebuilt, "m", args=(token,))
        return pool.get_result(job_id, timeout=30)

    with ThreadPoolExecutor(1) as executor:
        slow = executor.submit(call)
        try:
            assert STARTED[token].wait(30), "the result was never rebuilt"
            # Its caller is stuck in the rebuilding; everyone else is served, sync and async.
            assert [pool.score("m", add, i, 1) for i in range(20)] == [11 + i for i in range(20)]

            async def others() -> list:
                return await asyncio.gather(*(pool.score_async("m", add, i, 2) for i in range(20)))

            assert asyncio.run(others()) == [12 + i for i in range(20)]
            assert not slow.done()
        finally:
            gate.set()
        assert slow.result(timeout=30) == ("rebuilt", token)
    assert REBUILT_IN[token] == caller[0]
    assert pool.stats().jobs_failed == 0


@pytest.mark.timeout(60)
def test_a_coroutine_rebuilds_its_result_in_its_own_loop(pool):
    token = "async-own"

    async def main() -> tuple:
        value = await pool.score_async("m", rebuilt, token)
        return value, threading.get_ident()

    value, ident = asyncio.run(main())
    assert value == ("rebuilt", token)
    assert REBUILT_IN[token] == ident


@pytest.mark.timeout(60)
def test_a_rebuild_that_calls_the_pool_is_served(pool):
    assert pool.score("m", rebuilt, "reenter-sync") == ("reentered", 21)
    # In a coroutine the rebuilding runs in the loop's thread: a blocking call there is said to block it.
    with pytest.warns(RuntimeWarning, match="blocks the event loop"):
        assert asyncio.run(pool.score_async("m", rebuilt, "reenter-async")) == ("reentered", 21)
    # From a done-callback: it runs on the engine's callback thread, which may wait on the pool.
    done = threading.Event()
    seen: list = []

    def callback(future) -> None:
        seen.append(future.result())
        done.set()

    pool.submit("m", rebuilt, "reenter-callback").add_done_callback(callback)
    assert done.wait(30)
    assert seen == [("reentered", 21)]


@pytest.mark.timeout(60)
def test_a_result_that_fails_to_rebuild_counts_once_as_failed_for_every_reader(pool):
    before = pool.stats()
    future = pool.submit("m", rebuilt, "broken-1")
    wait([future], timeout=30)
    error = future.exception()
    assert isinstance(error, SerializationError) and "cannot be unpickled" in str(error)
    with pytest.raises(SerializationError):
        future.result()
    after = pool.stats()
    assert after.jobs_failed == before.jobs_failed + 1
    assert after.jobs_completed == before.jobs_completed
    # The pool serves on.
    assert pool.score("m", add, 1, 1) == 12


@pytest.mark.timeout(60)
def test_a_result_is_rebuilt_once_whoever_reads_it(pool):
    """A job made in a coroutine and read from another thread too: one object."""

    async def main() -> tuple:
        job_id = await pool.create_job_async(rebuilt, "m", args=("shared",))
        here = asyncio.create_task(pool.get_result_async(job_id))
        return job_id, await here

    _, value = asyncio.run(main())
    assert value == ("rebuilt", "shared")
    future = pool.submit("m", rebuilt, "twice")
    assert future.result(timeout=30) is future.result(timeout=30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["submit", "get_result"])
def test_ctrl_c_while_a_result_is_unpickled_changes_nothing(pool, api):
    """A Ctrl-C in the caller's thread while it unpickles is the caller's
    KeyboardInterrupt, not the job's failure: asking again gives the result."""
    token = f"ctrl-c-{api}"
    gate = _gate(token)
    before = pool.stats()
    if api == "submit":
        future = pool.submit("m", rebuilt, token)
        wait([future], timeout=30)
        ask = partial(future.result, timeout=30)
    else:
        job_id = pool.create_job(rebuilt, "m", args=(token,))
        ask = partial(pool.get_result, job_id, timeout=30)
    assert threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    try:
        with pytest.raises(KeyboardInterrupt):
            ask()  # its rebuilding is interrupted by a SIGINT
    finally:
        gate.set()  # the next rebuilding goes through
    if api == "submit":
        assert ask() == ("rebuilt", token)
    else:
        assert ask() == ("rebuilt", token)
        with pytest.raises(UnknownJobError, match="already fetched|unknown job"):
            ask()
    after = pool.stats()
    assert after.jobs_failed == before.jobs_failed
    assert after.jobs_completed == before.jobs_completed + 1
