"""What a finished job leaves behind: nothing that outlives its caller's references."""

from __future__ import annotations

import gc
import weakref

import pytest
from workloads import echo, load_constant

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
