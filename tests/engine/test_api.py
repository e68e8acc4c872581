"""The job API through all three families: job ids, futures, coroutines."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from functools import partial

import pytest
from helpers import workloads
from helpers.pools import make_pool
from helpers.workloads import add, echo, load_constant, pid, wait_for_release

import mlpool
from mlpool import ResultNotReadyError, UnknownJobError, UnknownModelError

pytestmark = pytest.mark.usefixtures("worker_mode")
WORKER_MODES = ("spawned", "forked", "ray")  # see conftest.worker_mode


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool({"m": load_constant, "n": load_constant}, nb_workers=2) as p:
        yield p


def test_score_submit_and_job_ids_round_trip(pool):
    assert pool.score("m", add, 1, y=2) == 13
    assert pool.submit("m", add, 5).result(timeout=30) == 15
    job_id = pool.create_job(add, "m", args=(1,), kwargs={"y": 1})
    assert isinstance(job_id, str)
    assert pool.get_result(job_id, timeout=30) == 12


def test_async_round_trips(pool):
    async def main():
        job_id = await pool.create_job_async(score_model_function=add, model_name="n", kwargs={"x": 3})
        first = await pool.get_result_async(job_id, timeout=30)
        many = await asyncio.gather(*(pool.score_async("m", add, i) for i in range(200)))
        return first, many

    first, many = asyncio.run(main())
    assert first == 13
    assert many == [10 + i for i in range(200)]


def test_seed_readme_example(tmp_path):
    """The seed README's example, as written, with only the import added."""
    from helpers.workloads import load_text_classifier, score_text_classifier

    vocabulary = tmp_path / "text_classification.pt"
    vocabulary.write_text("respectable good great")
    load_any_other_model_callable = load_constant

    with make_pool(
        models_to_load={
            "text_classifier": partial(load_text_classifier, str(vocabulary)),
            "any_other_model": load_any_other_model_callable,
        },
        nb_workers=5,
    ) as pool:
        job_id = pool.create_job(
            score_model_function=score_text_classifier,
            model_name="text_classifier",
            kwargs={
                "text": "MEMPHIS, Tenn. – Four days ago, Jon Rahm was \
                enduring the season’s worst weather conditions on Sunday at The \
                Open on his way to a closing 75 at Royal Portrush, which \
                considering the wind and the rain was a respectable showing"
            },
        )
        assert pool.get_result(job_id) == "positive"


def test_concurrent_threads_each_get_their_own_results(pool):
    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        results = list(threads.map(lambda i: pool.score("m", echo, ("value", i)), range(400)))
    assert results == [("value", i) for i in range(400)]


def test_each_worker_loads_each_model_once(pool, worker_mode):
    pids = {pool.score("m", pid) for _ in range(50)}
    assert len(pids) <= 2
    model_pids = {pool.score("m", lambda model: (os.getpid(), model["pid"])) for _ in range(20)}
    if worker_mode != "forked":  # the model object is the one the worker (or actor) loaded at start
        assert all(worker == loaded for worker, loaded in model_pids)
    else:  # loaded once, in the template, for every worker
        assert len({loaded for _, loaded in model_pids}) == 1
        assert all(worker != loaded for worker, loaded in model_pids)


def test_lambdas_closures_and_partials_of_local_functions(pool):
    offset = 7

    def local(model, x):
        return model["bias"] + x + offset

    assert pool.score("m", lambda model, x: x * 3, 4) == 12
    assert pool.score("m", local, 1) == 18
    assert pool.score("m", partial(local, x=2)) == 19


def test_function_is_pickled_once_not_per_job(pool):
    fn = workloads.CountingFunction()
    before = workloads.CountingFunction.pickled
    assert [pool.score("m", fn, i) for i in range(20)] == [i * 2 for i in range(20)]
    assert workloads.CountingFunction.pickled - before == 1


def test_unknown_model(pool):
    with pytest.raises(UnknownModelError, match="'nope'") as info:
        pool.create_job(add, "nope", args=(1,))
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelError):
        pool.submit("nope", add, 1)
    assert pool.score("m", add, 1) == 11


def test_unknown_fetched_twice_and_cancelled_ids(pool, fifo):
    with pytest.raises(UnknownJobError):
        pool.get_result("no-such-job")
    job_id = pool.create_job(add, "m", args=(1,))
    assert pool.get_result(job_id) == 11
    with pytest.raises(UnknownJobError, match="already fetched|never created"):
        pool.get_result(job_id)
    with pytest.raises(UnknownJobError):
        pool.cancel_job("no-such-job")


def test_result_not_ready_and_caller_timeout(pool, fifo):
    gate = fifo()
    job_id = pool.create_job(wait_for_release, "m", args=(str(gate),))
    gate.wait_running()
    with pytest.raises(ResultNotReadyError):
        pool.get_result(job_id, wait_if_unavailable=False)
    with pytest.raises(TimeoutError) as info:
        pool.get_result(job_id, timeout=0.05)
    assert not isinstance(info.value, mlpool.MLPoolError)  # the caller's wait, not the job
    gate.release_opened()
    assert pool.get_result(job_id, timeout=30) > 0  # still fetchable after the timeout


def test_async_caller_timeout_leaves_job_running(pool, fifo):
    gate = fifo()

    async def main():
        job_id = await pool.create_job_async(wait_for_release, "m", args=(str(gate),))
        with pytest.raises(TimeoutError):
            await pool.get_result_async(job_id, timeout=0.05)
        with pytest.raises(ResultNotReadyError):
            await pool.get_result_async(job_id, wait_if_unavailable=False)
        await asyncio.get_running_loop().run_in_executor(None, gate.release)
        return await pool.get_result_async(job_id, timeout=30)

    assert asyncio.run(main()) > 0


def test_expired_result_is_forgotten():
    with make_pool({"m": load_constant}, nb_workers=1, result_ttl=0.2) as pool:
        job_id = pool.create_job(add, "m", args=(1,))
        kept = pool.create_job(add, "m", args=(2,))
        assert pool.get_result(kept) == 12
        # The behaviour under test is time itself: wait past the TTL.
        time.sleep(0.6)
        with pytest.raises(UnknownJobError):
            pool.get_result(job_id)
        assert pool.score("m", add, 3) == 13


def test_bad_arguments_fail_at_the_call(pool):
    with pytest.raises(TypeError, match="callable"):
        pool.create_job("not a function", "m")
    with pytest.raises(TypeError, match="args"):
        pool.create_job(add, "m", args=5)
    with pytest.raises(TypeError, match="kwargs"):
        pool.create_job(add, "m", kwargs=[1])
    with pytest.raises(TypeError):
        pool.get_result(123)
    with pytest.raises(ValueError, match="timeout"):
        pool.create_job(add, "m", args=(1,), timeout=-1)
    assert pool.score("m", add, 1) == 11


def test_stats_count_jobs(pool):
    before = pool.stats()
    pool.score("m", add, 1)
    with pytest.raises(ValueError):
        pool.score("m", workloads.raise_value_error, "x")
    after = pool.stats()
    assert after.jobs_completed == before.jobs_completed + 1
    assert after.jobs_failed == before.jobs_failed + 1
    assert after.workers_alive == 2 and after.state == "running"
    assert pool.healthy and pool.ready


def test_default_nb_workers_leaves_a_core_for_the_api():
    with make_pool({"m": load_constant}) as pool:
        assert pool.nb_workers == max(1, mlpool.usable_cpu_count() - 1)
        assert pool.score("m", add, 0) == 10


def test_pools_are_built_in_the_worker_mode_of_the_module(worker_mode):
    """make_pool builds in the mode the worker_mode fixture set (forked: from a model template)."""
    with make_pool({"m": load_constant}, nb_workers=1) as pool:
        assert pool._config.share_models is (worker_mode == "forked")
        assert pool.score("m", add, 1) == 11
