"""What a finished job leaves behind: nothing that outlives its caller's references."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import pytest
from helpers.workloads import echo, load_constant

from mlpool import MLPool


class Heavy:
    """A result object the test can watch being collected."""

    def __init__(self, n: int) -> None:
        self.data = bytes(n)


def make_heavy(model: dict, n: int) -> Heavy:
    return Heavy(n)


@pytest.mark.timeout(60)
def test_a_finished_job_with_a_deadline_is_released_at_once():
    with MLPool({"m": load_constant}, nb_workers=1, job_timeout=600.0) as pool:
        future = pool.submit("m", make_heavy, 1000)
        result = future.result(timeout=30)
        ref = weakref.ref(result)
        del result, future
        gc.collect()
        assert ref() is None, "the job's result stayed referenced until its deadline"
        assert pool.score("m", echo, 1) == 1


@pytest.mark.timeout(120)
def test_an_unfetched_small_result_keeps_well_under_a_kilobyte():
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        pool.get_result(pool.create_job(echo, "m", args=(0,)), timeout=30)  # warm: function tables, regions
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            ids = [pool.create_job(echo, "m", args=(i,)) for i in range(2000)]
            # One worker runs them in order: once the last is done, so are the others.
            assert pool.get_result(ids.pop(), timeout=60) == 1999
            assert pool.stats().results_unfetched == 1999
            gc.collect()
            per_result = (tracemalloc.get_traced_memory()[0] - before) / 1999
        finally:
            tracemalloc.stop()
        assert per_result < 600, f"an unfetched result costs {per_result:.0f} bytes"
        assert [pool.get_result(job_id, timeout=30) for job_id in ids[:3]] == [0, 1, 2]
