"""nb_workers=0: the same API and errors, no processes."""

from __future__ import annotations

import asyncio
import threading

import pytest
import workloads
from conftest import worker_children
from workloads import add, double_all, load_constant, raise_value_error

from mlpool import MLPool, ModelLoadError, RemoteTraceback, SerializationError, UnknownJobError, UnknownModelError


def test_inline_pool_has_the_same_api_and_errors():
    before = {p.pid for p in worker_children()}
    with MLPool({"m": load_constant}, nb_workers=0) as pool:
        assert {p.pid for p in worker_children()} == before  # no process at all
        assert pool.score("m", add, 1, y=2) == 13
        assert pool.submit("m", add, 2).result(timeout=5) == 12
        job_id = pool.create_job(add, "m", args=(3,))
        assert pool.get_result(job_id) == 13
        with pytest.raises(UnknownJobError):
            pool.get_result(job_id)
        assert pool.score("m", double_all, 4) == (8, 1)  # batched functions get a batch of one
        with pytest.raises(ValueError, match="inline") as info:
            pool.score("m", raise_value_error, "inline")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        with pytest.raises(SerializationError):
            pool.score("m", add, threading.Lock())
        with pytest.raises(SerializationError):
            pool.score("m", workloads.return_unpicklable)
        with pytest.raises(UnknownModelError):
            pool.score("nope", add, 1)
        finished = pool.create_job(add, "m", args=(1,))
        assert pool.cancel_job(finished) is False
        assert asyncio.run(pool.score_async("m", add, 5)) == 15
        stats = pool.stats()
        assert stats.jobs_completed >= 6 and stats.jobs_failed >= 2 and stats.workers_alive == 0


def test_inline_loader_failure():
    with pytest.raises(ModelLoadError, match="weights file is corrupt"):
        MLPool({"m": workloads.load_raises}, nb_workers=0)
