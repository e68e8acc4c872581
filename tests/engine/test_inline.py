"""nb_workers=0: the same API and errors, no processes."""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import threading

import pytest
from conftest import worker_children
from helpers import workloads
from helpers.workloads import add, double_all, load_constant, raise_value_error

from mlpool import (
    MLPool,
    MLPoolError,
    ModelLoadError,
    RemoteTraceback,
    SerializationError,
    UnknownJobError,
    UnknownModelError,
)


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


def raise_system_exit(model: dict) -> None:
    raise SystemExit(3)


def raise_keyboard_interrupt(model: dict) -> None:
    raise KeyboardInterrupt


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_inline_engine_owns_no_thread_selector_or_pipe():
    threads, fds = threading.active_count(), _open_fds()
    with MLPool({"m": load_constant}, nb_workers=0) as pool:
        assert pool.score("m", add, 1) == 11
        assert threading.active_count() == threads
        assert _open_fds() == fds
    assert _open_fds() == fds


def test_inline_results_expire_after_result_ttl_without_a_thread():
    with MLPool({"m": load_constant}, nb_workers=0, result_ttl=0.05) as pool:
        old = pool.create_job(add, "m", args=(1,))
        assert pool.stats().results_unfetched == 1
        pool.score("m", workloads.spin, 0.1)  # the pool's own work outlasts the TTL
        assert pool.stats().results_unfetched == 0
        with pytest.raises(UnknownJobError):
            pool.get_result(old)
        fresh = pool.create_job(add, "m", args=(2,))
        assert pool.get_result(fresh) == 12  # within its TTL


def test_inline_base_exceptions_become_errors_and_finish_their_job():
    with MLPool({"m": load_constant}, nb_workers=0) as pool:
        with pytest.raises(MLPoolError, match="SystemExit") as info:
            pool.score("m", raise_system_exit)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        job_id = pool.create_job(raise_keyboard_interrupt, "m")
        assert pool.stats().jobs_failed == 2  # finished, not left running
        with pytest.raises(MLPoolError, match="KeyboardInterrupt"):
            pool.get_result(job_id)

        async def in_a_coroutine() -> BaseException:
            try:
                await pool.score_async("m", raise_system_exit)
            except BaseException as exc:  # the loop must see an ordinary error
                return exc
            raise AssertionError("no error")

        assert type(asyncio.run(in_a_coroutine())).__name__ == "RemoteError"
        assert pool.score("m", add, 1) == 11


def _is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    return bool(flag.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the subreaper flag is Linux's")
def test_no_pool_makes_the_process_a_subreaper():
    assert not _is_subreaper()
    with MLPool({"m": load_constant}, nb_workers=0, share_models=True) as pool:
        assert pool.score("m", add, 1) == 11
        assert not _is_subreaper()  # nothing is forked here
    assert not _is_subreaper()
    with MLPool({"m": load_constant}, nb_workers=1, share_models=True) as pool:
        assert pool.score("m", add, 1) == 11
        assert not _is_subreaper()  # nor a real template pool: the template reaps its workers (#13.18)
    assert not _is_subreaper()
