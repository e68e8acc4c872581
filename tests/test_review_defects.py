"""The third outside review (#24.6): a stream read on another event loop, a
streaming client that leaves, a process forked after the pool started, and
cancelled queued jobs of a session. Each test failed on the code before its fix."""

from __future__ import annotations

import asyncio

import pytest
from helpers import stream_workloads as sw
from helpers.pools import make_pool
from helpers.workloads import load_constant

from mlpool import MLPool

# Bounds a wait that must not hang; the end comes long before it on any machine.
HANG = 60.0


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool({"m": load_constant}, nb_workers=1, max_retries=0, stream_buffer=4) as pool:
        yield pool


# ------------------------------------------ 1. a stream read on another loop


def _made_on_a_loop_that_stops(make, *, close: bool, started: bool):
    """What ``make()`` returns, called in a coroutine of a loop that then stops
    (and closes, with ``close``); ``started``: its first item read there."""
    first = asyncio.new_event_loop()

    async def opened():
        stream = make()
        return stream, (await stream.__anext__() if started else None)

    try:
        return first.run_until_complete(opened())
    finally:
        if close:
            first.close()


async def _drain(stream) -> list:
    async def read() -> list:
        return [item async for item in stream]

    return await asyncio.wait_for(read(), HANG)


@pytest.mark.parametrize("close", [False, True], ids=["stopped", "closed"])
@pytest.mark.parametrize("started", [False, True], ids=["unstarted", "started"])
def test_an_async_stream_read_on_another_loop_ends(pool, close, started):
    make = lambda: pool.stream_async("m", sw.count, 10)  # noqa: E731
    stream, first = _made_on_a_loop_that_stops(make, close=close, started=started)
    rest = asyncio.run(_drain(stream))
    assert ([first] if started else []) + rest == list(range(10))


def test_an_async_stream_read_on_another_loop_raises_its_generators_error(pool):
    make = lambda: pool.stream_async("m", sw.raise_after, 3)  # noqa: E731
    stream, first = _made_on_a_loop_that_stops(make, close=True, started=True)
    with pytest.raises(ValueError, match="after 3"):
        asyncio.run(_drain(stream))


def test_an_inline_async_stream_read_on_another_loop_ends():
    with MLPool({"m": load_constant}, nb_workers=0) as inline:
        make = lambda: inline.stream_async("m", sw.count, 5)  # noqa: E731
        stream, first = _made_on_a_loop_that_stops(make, close=True, started=True)
        assert [first, *asyncio.run(_drain(stream))] == list(range(5))
