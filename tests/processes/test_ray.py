"""backend="ray": workers as Ray actors on a local Ray instance (2 CPUs).

test_api and test_errors also run in this mode (their worker_mode fixture);
these tests cover what differs: actor deaths, timeouts, shutdown, Ray's
own lifecycle.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
from helpers import workloads
from helpers.pools import make_pool
from helpers.versions import ModelFiles, version_of
from helpers.workloads import add, load_constant

from mlpool import JobTimeoutError, ModelLoadError, WorkerCrashedError

pytestmark = pytest.mark.usefixtures("ray_cluster")
RAY = {"backend": "ray", "ray_options": {"num_cpus": 0.5}}


def test_an_actor_killed_mid_job_fails_that_job_and_is_replaced(ray_cluster, fifo):
    with make_pool({"m": load_constant}, nb_workers=1, **RAY) as pool:
        actor = pool.score("m", workloads.own_actor)
        gate = fifo()
        running = pool.submit("m", workloads.wait_for_release, str(gate))
        gate.wait_running()
        first = gate.pid
        ray_cluster.kill(actor)
        with pytest.raises(WorkerCrashedError, match="wait_for_release") as info:
            running.result(timeout=60)
        assert "died" in str(info.value)
        assert pool.score("m", add, 1) == 11  # a new actor
        assert pool.score("m", workloads.pid) != first
        assert pool.stats().worker_restarts == 1


def test_a_crashed_actor_process_is_retried(tmp_path):
    with make_pool({"m": load_constant}, nb_workers=1, max_retries=1, **RAY) as pool:
        first = pool.score("m", workloads.pid)
        # The first attempt SIGKILLs its actor's process; the retry runs on a new actor.
        assert pool.score("m", workloads.crash_first_time, str(tmp_path / "marker")) == "second try"
        assert pool.score("m", workloads.pid) != first
        assert pool.stats().jobs_retried == 1


def test_a_timeout_replaces_the_actor():
    with make_pool({"m": load_constant}, nb_workers=1, **RAY) as pool:
        job = pool.create_job(workloads.spin, "m", args=(60.0,), timeout=1.0)
        with pytest.raises(JobTimeoutError, match="while running") as info:
            pool.get_result(job, timeout=60)
        assert info.value.while_running
        assert pool.score("m", add, 2) == 12


def test_batching_async_and_large_arrays_through_actors():
    with make_pool({"m": load_constant}, nb_workers=2, **RAY) as pool:

        async def many() -> list:
            return await asyncio.gather(*(pool.score_async("m", workloads.double_all, i) for i in range(40)))

        results = asyncio.run(many())
        assert [doubled for doubled, _ in results] == [2 * i for i in range(40)]
        assert max(size for _, size in results) > 1  # some calls carried several items
        # 8 MB arguments: shared memory to the bridge, then Ray's object store.
        array = np.arange(2**20, dtype=np.float64)
        assert pool.score("m", workloads.copy_of, array).sum() == array.sum()

        async def batched_arrays() -> list:
            arrays = [np.full(2**17, float(i)) for i in range(12)]  # 1 MB each
            return await asyncio.gather(*(pool.score_async("m", workloads.array_sums, a) for a in arrays))

        sums = asyncio.run(batched_arrays())
        assert [total for total, _ in sums] == [float(i * 2**17) for i in range(12)]


def test_shutdown_kills_the_actors_it_made():
    pool = make_pool({"m": load_constant}, nb_workers=2, **RAY)
    pids = set()
    while len(pids) < 2:  # ask until both actors answered
        pids |= {f.result(timeout=60) for f in [pool.submit("m", workloads.pid) for _ in range(8)]}
    actors = [psutil.Process(pid) for pid in pids]
    pool.shutdown()
    _, alive = psutil.wait_procs(actors, timeout=30)
    assert not alive, f"actors still running after shutdown: {alive}"


def test_interrupting_a_running_job_kills_its_actor(fifo):
    with make_pool({"m": load_constant}, nb_workers=1, **RAY) as pool:
        gate = fifo()
        job = pool.create_job(workloads.wait_for_release, "m", args=(str(gate),))
        gate.wait_running()
        assert pool.cancel_job(job, interrupt=True)
        psutil.Process(gate.pid).wait(timeout=30)
        assert pool.score("m", add, 3) == 13


SCRIPT = textwrap.dedent(
    """
    import ray
    from mlpool import MLPool

    if __name__ == "__main__":
        assert not ray.is_initialized()
        with MLPool({"m": lambda: {"bias": 1}}, nb_workers=1, backend="ray", ray_options={"num_cpus": 0.5}) as pool:
            print(pool.score("m", lambda model, x: model["bias"] + x, 41), ray.is_initialized())
        print(ray.is_initialized())
    """
)


def test_a_ray_instance_the_pool_started_is_stopped_at_shutdown(tmp_path):
    script = tmp_path / "pool_starts_ray.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["42", "True", "False"]


TWO_POOLS = textwrap.dedent(
    """
    import ray
    from mlpool import MLPool

    # Lambdas travel by value (functions of __main__ would not reach the actors: #19.6).
    load = lambda: {"bias": 1}  # noqa: E731
    score = lambda model, x: model["bias"] + x  # noqa: E731

    if __name__ == "__main__":
        options = {"nb_workers": 1, "backend": "ray", "ray_options": {"num_cpus": 0.5}}
        first = MLPool({"m": load}, **options)  # starts Ray
        second = MLPool({"m": load}, **options)  # joins it
        print(first.score("m", score, 1), second.score("m", score, 2))
        first.shutdown()
        print(ray.is_initialized(), second.score("m", score, 3))  # the second pool still serves
        second.shutdown()
        print(ray.is_initialized())  # the last pool out stopped it
    """
)


def test_shutting_down_the_pool_that_started_ray_leaves_it_to_the_others(tmp_path):
    script = tmp_path / "two_pools.py"
    script.write_text(TWO_POOLS)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["2", "3", "True", "4", "False"]


def test_bad_ray_arguments_are_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        make_pool({"m": load_constant}, nb_workers=1, backend="dask")
    with pytest.raises(ValueError, match='need backend="ray"'):
        make_pool({"m": load_constant}, nb_workers=1, ray_address="auto")
    with pytest.raises(ValueError, match="share_models"):
        make_pool({"m": load_constant}, nb_workers=1, backend="ray", share_models=True)


def test_a_model_with_workers_of_its_own_is_a_set_of_actors_of_its_own(ray_cluster):
    from mlpool import Model

    models = {"shared": load_constant, "own": Model(load_constant, workers=1, ray_options={"num_cpus": 0.25})}
    with make_pool(models, nb_workers=1, **RAY) as pool:
        shared = pool.score("shared", workloads.pid)
        own = pool.score("own", workloads.pid)
        assert shared != own  # two actors: the group's own, and the shared one
        assert pool.score("own", add, 1) == 11 and pool.score("shared", add, 2) == 12
        stats = pool.stats().models
        assert (stats["own"].workers, stats["shared"].workers) == (1, 1)


def test_a_reload_replaces_the_actors_one_at_a_time(tmp_path):
    files = ModelFiles(tmp_path / "model")
    with make_pool({"m": files.loader()}, nb_workers=2, **RAY) as pool:
        actors = {pool.score("m", workloads.pid) for _ in range(20)}
        files.set(2)
        pool.reload_models()
        assert {pool.score("m", version_of) for _ in range(20)} == {"m:2"}
        assert not actors & {pool.score("m", workloads.pid) for _ in range(20)}
        stats = pool.stats().models["m"]
        assert (stats.version, stats.workers_by_version) == (2, {2: 2})
        files.set(3, "raise")
        with pytest.raises(ModelLoadError, match="corrupt"):
            pool.reload_models()
        assert {pool.score("m", version_of) for _ in range(20)} == {"m:2"}
