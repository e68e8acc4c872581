"""Streams on backend="ray" (#17): a Ray streaming generator in the actor,
credits on the bridge, ray.cancel for a close."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from helpers import stream_workloads as sw
from helpers.markers import Markers
from helpers.workloads import load_constant
from test_streams import finally_pid

import mlpool
from mlpool import MLPool

pytestmark = pytest.mark.usefixtures("ray_cluster")
WINDOW = 8


@pytest.fixture(scope="module")
def pool(ray_cluster):
    # The actors import this checkout's mlpool (the one under test) and the tests' modules.
    path = os.pathsep.join([str(Path(mlpool.__file__).parents[1]), str(Path(__file__).parent.parent)])
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    options = {"backend": "ray", "ray_options": {"num_cpus": 0.5, "runtime_env": runtime_env}}
    with MLPool({"m": load_constant}, nb_workers=1, stream_buffer=WINDOW, **options) as pool:
        yield pool


@pytest.fixture
def markers(tmp_path):
    m = Markers(tmp_path / "markers")
    yield m
    m.close()


def test_items_arrive_in_order_and_the_first_before_the_end(pool, fifo):
    assert list(pool.stream("m", sw.count, 300)) == list(range(300))
    gate = fifo()
    with pool.stream("m", sw.first_then_gate, str(gate)) as items:
        assert next(items) == "first"
        gate.release()
        assert list(items) == ["second"]


def test_closing_stops_the_generator_in_the_actor_which_serves_on(pool, markers):
    async def main() -> None:
        async with pool.stream_async("m", sw.marked_forever, str(markers)) as items:
            assert await items.__anext__() == 0

    asyncio.run(main())
    assert pool.score("m", sw.pid) == finally_pid(markers)


def test_a_paused_consumer_holds_the_actor_to_about_the_buffer(pool, markers):
    items = pool.stream("m", sw.marked_forever, str(markers))
    assert next(items) == 0
    markers.until(f"item {WINDOW - 1}")
    items.close()
    produced = int(markers.until("finally").split()[1])
    # The bridge forwards a window; the actor runs half a window ahead of it (Ray's backpressure).
    assert produced <= 2 * WINDOW + 2, f"the actor ran {produced} items ahead of a consumer that took 1"


def test_the_generators_exception_comes_after_its_items(pool):
    got = []
    with pytest.raises(ValueError, match="failed after 2 items"):
        for item in pool.stream("m", sw.raise_after, 2):
            got.append(item)
    assert got == [0, 1]
    assert pool.score("m", sw.pid) > 0


def test_an_actor_that_dies_mid_stream_fails_it_after_the_delivered_items(pool, fifo):
    from mlpool import WorkerCrashedError

    # The actor exits only once the consumer has its items: Ray reports a
    # streaming generator's items asynchronously, and one yielded just before
    # an os._exit may never reach the caller (under load it often does not).
    got, delivered = [], fifo()
    with pytest.raises(WorkerCrashedError):
        for item in pool.stream("m", sw.crash_after_release, 2, str(delivered)):
            got.append(item)
            if item == 1:
                delivered.release()
    assert got == [0, 1]
    assert pool.score("m", sw.pid) > 0  # a new actor
