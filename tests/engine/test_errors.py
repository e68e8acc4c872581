"""User exceptions, pickling problems and load failures: clear errors, a pool that keeps serving."""

from __future__ import annotations

import threading

import pytest
from conftest import worker_children
from helpers import workloads
from helpers.pools import make_pool
from helpers.workloads import add, load_constant, pid, raise_value_error

from mlpool import ModelLoadError, RemoteError, RemoteTraceback, SerializationError

pytestmark = pytest.mark.usefixtures("worker_mode")
WORKER_MODES = ("spawned", "forked", "ray")  # see conftest.worker_mode


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool({"m": load_constant}, nb_workers=1) as p:
        yield p


def test_user_exception_is_reraised_as_itself_with_remote_traceback(pool):
    before = pool.score("m", pid)
    with pytest.raises(ValueError, match="bad features") as info:
        pool.score("m", raise_value_error, "bad features")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in str(cause) and "workloads.py" in str(cause)
    assert pool.score("m", pid) == before  # the same worker lives on


def test_user_exception_through_job_ids_and_async(pool):
    import asyncio

    job_id = pool.create_job(raise_value_error, "m", args=("via id",))
    with pytest.raises(ValueError, match="via id"):
        pool.get_result(job_id)

    async def main():
        with pytest.raises(ValueError, match="via async"):
            await pool.score_async("m", raise_value_error, "via async")

    asyncio.run(main())


def test_exception_that_cannot_cross_becomes_remote_error(pool):
    with pytest.raises(RemoteError, match="NeedsTwoArgs: 1 and 2") as info:
        pool.score("m", workloads.raise_odd_exception)
    assert info.value.type_name.endswith("NeedsTwoArgs")
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_unpicklable_arguments_fail_in_the_caller(pool):
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="arguments of add.*cannot be pickled"):
        pool.create_job(add, "m", args=(lock,))
    with pytest.raises(SerializationError):
        pool.submit("m", add, 1, y=lock)
    assert pool.score("m", add, 1) == 11


def test_unpicklable_result_fails_that_job_only(pool):
    with pytest.raises(SerializationError, match="result of return_unpicklable"):
        pool.score("m", workloads.return_unpicklable)
    assert pool.score("m", add, 2) == 12


def test_unpicklable_function(pool):
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="scoring function"):
        pool.score("m", lambda model: lock)
    assert pool.score("m", add, 3) == 13


@pytest.mark.usefixtures("no_leaked_workers")
def test_loader_that_raises_fails_the_constructor_and_leaves_nothing():
    before = {p.pid for p in worker_children()}
    with pytest.raises(ModelLoadError, match="weights file is corrupt") as info:
        make_pool({"good": load_constant, "bad": workloads.load_raises}, nb_workers=2)
    assert info.value.model_name == "bad"
    assert "load_raises" in info.value.remote_traceback
    assert {p.pid for p in worker_children()} <= before


@pytest.mark.usefixtures("no_leaked_workers")
def test_loader_that_returns_none_fails_the_constructor():
    with pytest.raises(ModelLoadError, match="returned None"):
        make_pool({"m": workloads.load_none}, nb_workers=1)


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="callable"):
        make_pool({"m": "not callable"}, nb_workers=1)
    with pytest.raises(TypeError, match="mapping"):
        make_pool([load_constant], nb_workers=1)
    with pytest.raises(ValueError, match="empty"):
        make_pool({}, nb_workers=1)
    with pytest.raises(ValueError, match="result_ttl"):
        make_pool({"m": load_constant}, nb_workers=1, result_ttl=0)
    with pytest.raises(ValueError, match="nb_workers"):
        make_pool({"m": load_constant}, nb_workers=-1)
    with pytest.raises(ValueError, match="start_method"):
        make_pool({"m": load_constant}, nb_workers=1, start_method="fork")
    with pytest.raises(SerializationError, match="loader of model 'm'"):
        lock = threading.Lock()
        make_pool({"m": lambda: lock}, nb_workers=1)


async def async_score(model: dict, x: int) -> int:
    return x


async def async_items(model: dict, n: int):
    yield n


class AsyncCall:
    async def __call__(self, model: dict, x: int) -> int:
        return x


def test_an_async_scoring_function_is_refused_at_submission_and_the_pool_serves_on(pool):
    """A worker calls scoring functions without an event loop: an async one
    would return a coroutine that never runs (and a misleading pickling error)."""
    for call, kind in (
        (lambda: pool.score("m", async_score, 1), "async function"),
        (lambda: pool.submit("m", async_score, 1), "async function"),
        (lambda: pool.create_job(async_score, "m", args=(1,)), "async function"),
        (lambda: pool.score("m", AsyncCall(), 1), "async function"),
        (lambda: pool.stream("m", async_items, 1), "async generator function"),
    ):
        with pytest.raises(TypeError, match=f"is an {kind};.*make it a plain def"):
            call()
    assert pool.score("m", add, 1, 2) == add(load_constant(), 1, 2)


def test_an_async_function_is_refused_inline_and_as_a_loader():
    with make_pool({"m": load_constant}, nb_workers=0) as inline:
        with pytest.raises(TypeError, match="is an async function"):
            inline.score("m", async_score, 1)

    async def load_async() -> dict:
        return {}

    before = len(worker_children())
    with pytest.raises(TypeError, match="the loader of model 'm' is an async function"):
        make_pool({"m": load_async}, nb_workers=1)
    assert len(worker_children()) == before
