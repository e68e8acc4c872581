"""Shared memory: every buffer arrives in its place, and a held result costs
about its own size and no descriptor."""

from __future__ import annotations

import gc
import os

import numpy as np
import psutil
import pytest
from helpers.workloads import load_constant

from mlpool import MLPool
from mlpool._engine.regions import Payload, RegionPool, pickle_payload

pytestmark = [
    pytest.mark.usefixtures("no_leaked_workers"),
    pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="shared memory transport needs memfd_create (Linux)"),
]

N = 100_000


@pytest.fixture(scope="module")
def pool():
    with MLPool({"m": load_constant}, nb_workers=1) as p:
        yield p


def describe(model: dict, *args: object) -> list:
    """What the worker received, argument by argument."""
    out = []
    for arg in args:
        if callable(arg):
            out.append(("callable", arg()))
        elif isinstance(arg, np.ndarray):
            out.append(("array", float(arg[0]), float(arg[-1]), len(arg)))
        else:
            out.append((type(arg).__name__, bytes(arg[:1]), bytes(arg[-1:]), len(arg)))
    return out


def mixed_result(model: dict, kind: str) -> tuple:
    """Two large buffers around a lambda: plain pickle fails, cloudpickle is needed."""
    if kind == "bytes":
        return b"A" * N, (lambda: 1), b"B" * N
    return np.full(N, 1.0), (lambda: 1), np.full(N, 2.0)


def same_bytes(first: object, second: object) -> bool:
    return bytes(first) == bytes(second)


@pytest.mark.parametrize("kind", ["bytes", "array"])
def test_large_arguments_arrive_in_place_when_a_lambda_needs_cloudpickle(pool, kind):
    if kind == "bytes":
        first, second = b"A" * N, b"B" * N
        expected = [("bytes", b"A", b"A", N), ("callable", 1), ("bytes", b"B", b"B", N)]
    else:
        first, second = np.full(N, 1.0), np.full(N, 2.0)
        expected = [("array", 1.0, 1.0, N), ("callable", 1), ("array", 2.0, 2.0, N)]
    assert pool.score("m", describe, first, lambda: 1, second) == expected


@pytest.mark.parametrize("kind", ["bytes", "array"])
def test_large_results_arrive_in_place_when_a_lambda_needs_cloudpickle(pool, kind):
    first, fn, second = pool.score("m", mixed_result, kind)
    assert fn() == 1
    expected_first, _, expected_second = mixed_result(None, kind)
    assert same_bytes(first, expected_first) and same_bytes(second, expected_second)


@pytest.mark.parametrize("kind", ["bytes", "array"])
def test_a_payload_keeps_only_the_buffers_of_the_pickle_it_kept(kind):
    """No process: pickling falls back to cloudpickle, unpickling in place."""
    first, second = (b"A" * N, b"B" * N) if kind == "bytes" else (np.full(N, 1.0), np.full(N, 2.0))
    payload = pickle_payload((first, lambda: 1, second), "test", 65536, None)
    assert len(payload.buffers) == 2
    back_first, fn, back_second = payload.loads("test")
    assert fn() == 1 and same_bytes(back_first, first) and same_bytes(back_second, second)
    regions = RegionPool(keep=2**26)
    try:
        payload.place(regions)
        assert isinstance(payload, Payload) and payload.region is not None
        data = bytes(payload.region.view[payload.spans[1][0] : payload.spans[1][0] + 8])
        assert data == bytes(second)[:8]
    finally:
        payload.release(regions)
        regions.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def hold(pool: MLPool, count: int, size: int, first_seed: int) -> list:
    """``count`` results of ``size`` bytes, each checked."""
    results = [pool.score("m", make_array, size, first_seed + i) for i in range(count)]
    for i, result in enumerate(results):
        assert result.nbytes == size and np.array_equal(result[:64], make_array(None, size, first_seed + i)[:64])
    return results


def make_array(model: dict | None, n: int, seed: int) -> np.ndarray:
    return np.full(n, seed % 251, dtype=np.uint8)


def test_held_small_results_cost_their_size_and_no_descriptor(pool):
    """100 results of 80 KB (shared memory: over the 64 KiB threshold) cost
    7.6 MiB of data; before #13.15 they held +298 descriptors and +99 MiB."""
    hold(pool, 10, 80_000, 0)  # warm: the pool's regions exist, the worker mapped them
    fds, memory = open_fds(), rss()
    first = hold(pool, 100, 80_000, 0)
    assert open_fds() - fds <= 2
    assert rss() - memory < 3 * 100 * 80_000
    fds, memory = open_fds(), rss()
    second = hold(pool, 100, 80_000, 100)  # growth, not a leak: the same cost again
    assert open_fds() - fds <= 1
    assert rss() - memory < 3 * 100 * 80_000
    assert all(np.array_equal(a, make_array(None, 80_000, i)) for i, a in enumerate(first + second))
    del first, second
    assert open_fds() - fds <= 1


def test_held_large_results_are_views_holding_one_descriptor_each(pool):
    size = 5 << 20  # over COPY_BELOW: not copied
    hold(pool, 2, size, 0)
    fds, memory = open_fds(), rss()
    held = hold(pool, 20, size, 0)
    assert open_fds() - fds <= 20 + 1  # one region each (and the room offered for the next result)
    assert rss() - memory < 20 * size * 1.4  # a region of about the result's size
    held[3][0] = 7  # the caller's to change
    assert held[3][0] == 7 and held[4][0] == 4
    del held
    # Dropped: the regions went back to the pool, which keeps little of them idle.
    assert open_fds() - fds <= 16
    assert rss() - memory < (64 << 20) + (16 << 20)


def test_of_idle_regions_of_one_size_the_last_given_back_is_taken_first():
    """No process: several regions of the same size idle (left by a burst of
    64 MB jobs), one job at a time must keep using the same one, which its
    worker still has mapped; going round them made each job map 64 MB anew."""
    regions = RegionPool(keep=2**30)
    try:
        burst = [regions.take(8 << 20) for _ in range(4)]
        for region in burst:
            regions.give(region)
        first = regions.take(8 << 20)
        assert first is burst[-1]
        for _ in range(5):
            regions.give(first)
            assert regions.take(8 << 20) is first
        regions.give(first)
    finally:
        regions.close()
