"""reload_models: a new version rolled out one worker at a time, in both worker modes.

Each load reads its version from a file (``helpers.versions``); a test holds
a roll at the step it looks at with a FIFO the new version's loader waits
on, never with time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import worker_children
from helpers.log_events import captured
from helpers.pools import make_pool
from helpers.versions import ModelFiles, load_constant, version_of, which
from helpers.workloads import wait_for_release

from mlpool import (
    MLPoolError,
    Model,
    ModelLoadError,
    PoolClosedError,
    SerializationError,
    UnknownModelError,
    WorkerCrashedError,
)

pytestmark = pytest.mark.usefixtures("worker_mode")


@pytest.fixture
def files(tmp_path):
    return ModelFiles(tmp_path / "model")


@pytest.fixture
def rolls():
    """The ``mlpool`` log records of reloads and worker lives, in order."""
    with captured() as handler:
        yield handler


def served(pool, model="m", jobs=40):
    """The versions (and pids) that ``jobs`` jobs made now ran on."""
    return {pool.score(model, which) for _ in range(jobs)}


def test_a_reload_reruns_the_loaders_on_every_worker_and_leaves_no_old_process(files, rolls):
    with make_pool({"m": files.loader()}, nb_workers=2) as pool:
        before = {p.pid for p in worker_children()}
        assert {v for v, _ in served(pool)} == {"m:1"}
        assert pool.stats().models["m"].version == 1
        files.set(2)
        pool.reload_models()
        assert {v for v, _ in served(pool)} == {"m:2"}
        stats = pool.stats().models["m"]
        assert (stats.version, stats.workers_by_version, stats.workers) == (2, {2: 2}, 2)
        # The old workers have exited; an old template is closed a moment later, by the manager thread.
        _, left = psutil.wait_procs([p for p in worker_children() if p.pid in before], timeout=10)
        assert not left
        after = {p.pid for p in worker_children()}
        assert len(after) == len(before) and not (after & before)  # every process is new, none is left
        assert [r.event for r in rolls.of("reload_started", "worker_rolled", "reload_finished")] == [
            "reload_started", "worker_rolled", "worker_rolled", "reload_finished"]  # fmt: skip


def test_surge_1_never_has_fewer_ready_workers_and_surge_0_never_more_processes(files, rolls):
    with make_pool({"m": files.loader()}, nb_workers=2) as pool:
        files.set(2)
        pool.reload_models(surge=1)
        ready = 2
        for record in rolls.of("worker_rolled", "worker_exited"):
            ready += 1 if record.event == "worker_rolled" else -1
            assert ready >= 2  # an old worker leaves only after its replacement is ready
        rolls.records.clear()
        files.set(3)
        pool.reload_models(surge=0)
        alive = 2
        for record in rolls.of("worker_rolled", "worker_exited"):
            alive += 1 if record.event == "worker_rolled" else -1
            assert alive <= 2  # each old worker has gone before its replacement loads
        assert {v for v, _ in served(pool)} == {"m:3"}
        assert pool.stats().models["m"].version == 3


def test_jobs_from_threads_and_a_loop_never_fail_during_a_reload(files):
    stop = threading.Event()
    with make_pool({"m": files.loader()}, nb_workers=2) as pool:

        def hammer() -> set[str]:
            seen = set()
            while not stop.is_set():
                seen.add(pool.score("m", version_of))
            return seen

        async def loop_hammer() -> set[str]:
            seen = set()
            while not stop.is_set():
                seen |= set(await asyncio.gather(*(pool.score_async("m", version_of) for _ in range(8))))
            return seen

        with ThreadPoolExecutor(4) as executor:
            threads = [executor.submit(hammer) for _ in range(3)]
            in_loop = executor.submit(asyncio.run, loop_hammer())
            for version in (2, 3):
                files.set(version)
                pool.reload_models()
            stop.set()
            seen = set().union(*(f.result(timeout=60) for f in [*threads, in_loop]))
        assert "m:3" in seen and seen <= {"m:1", "m:2", "m:3"}  # and nothing raised
        stats = pool.stats()
        assert stats.jobs_failed == stats.jobs_crashed == 0
        assert served(pool) and {v for v, _ in served(pool)} == {"m:3"}


@pytest.mark.parametrize("behaviour", ["raise", "crash", "segfault", "hang"])
def test_a_version_that_fails_to_load_leaves_the_old_one_on_every_worker(files, behaviour):
    with make_pool({"m": files.loader()}, nb_workers=2) as pool:
        processes = {p.pid for p in worker_children()}
        pids = {pid for _, pid in served(pool)}
        files.set(2, behaviour)
        with pytest.raises(ModelLoadError) as info:
            pool.reload_models(timeout=2 if behaviour == "hang" else None)
        if behaviour == "raise":
            assert "model file version 2 is corrupt" in str(info.value)
            assert "load_version" in info.value.remote_traceback
        if behaviour == "hang":
            assert "timeout=2s" in str(info.value)
        assert "first worker" in str(info.value)
        assert served(pool) == {("m:1", pid) for pid in pids}  # the same workers serve the old version
        stats = pool.stats().models["m"]
        assert (stats.version, stats.workers_by_version) == (1, {1: 2})
        gone, left = psutil.wait_procs([p for p in worker_children() if p.pid not in processes], timeout=10)
        assert not left, f"half-started processes left: {left}"
        files.set(3)  # a later reload may try again
        pool.reload_models()
        assert {v for v, _ in served(pool)} == {"m:3"}
        assert pool.stats().models["m"].version == 2


def test_a_failed_surge_0_reload_fills_the_slot_it_emptied_with_the_old_version(files, tmp_path):
    broken = ModelFiles(tmp_path / "broken")
    broken.set(1, "raise")
    with make_pool({"m": files.loader()}, nb_workers=2) as pool:
        with pytest.raises(ModelLoadError, match="corrupt"):
            pool.reload_models({"m": broken.loader()}, surge=0)
        # It raised once the slot it emptied served again: with the old loader
        # (or, forked, the old template), so the old version.
        assert pool.stats().workers_alive == 2
        assert {v for v, _ in served(pool)} == {"m:1"}


def hold_every_worker(pool, fifo, workers):
    """A running job on each of ``workers`` workers, blocked on its FIFO: (gates, futures)."""
    gates = [fifo() for _ in range(workers)]
    futures = [pool.submit("m", wait_for_release, str(gate)) for gate in gates]
    for gate in gates:
        gate.wait_running()
    assert len({gate.pid for gate in gates}) == workers
    return gates, futures


def test_a_reload_shows_per_version_counts_while_an_old_worker_finishes_its_job(files, fifo, rolls):
    with ThreadPoolExecutor(1) as executor, make_pool({"m": files.loader()}, nb_workers=2) as pool:
        gates, jobs = hold_every_worker(pool, fifo, 2)
        files.set(2)
        reload = executor.submit(pool.reload_models)
        rolls.wait_for("worker_rolled")  # a new worker is ready; its old one holds a running job
        stats = pool.stats().models["m"]
        assert (stats.version, stats.workers_by_version) == (2, {1: 2, 2: 1})
        assert pool.score("m", version_of) == "m:2"  # the retiring worker takes no new job
        for gate in gates:
            gate.release_opened()
        assert {job.result(30) for job in jobs} == {gate.pid for gate in gates}  # they finished on the old one
        reload.result(60)
        assert pool.stats().models["m"].workers_by_version == {2: 2}


def test_workers_that_die_after_the_commit_are_replaced_with_the_new_version(files, fifo, rolls):
    # The pool closes first: a failed assert ends the reload instead of waiting on it.
    with ThreadPoolExecutor(1) as executor, make_pool({"m": files.loader()}, nb_workers=3) as pool:
        gates, jobs = hold_every_worker(pool, fifo, 3)
        files.set(2)
        reload = executor.submit(pool.reload_models)
        first = rolls.wait_for("worker_rolled")  # committed: version 2 is the current one
        for gate in gates:
            os.kill(gate.pid, signal.SIGKILL)  # the one being rolled, and two waiting their turn
        for job in jobs:
            with pytest.raises(WorkerCrashedError):
                job.result(30)
        reload.result(60)  # the two replacements may still load: of the new version
        rolls.wait_for("worker_replaced", after=rolls.wait_for("worker_replaced", after=first))  # both ready
        stats = pool.stats().models["m"]
        assert (stats.version, stats.workers_by_version, stats.workers) == (2, {2: 3}, 3)
        assert {v for v, _ in served(pool)} == {"m:2"}
        assert first.worker_pid in {pid for _, pid in served(pool, jobs=200)} | {p.pid for p in worker_children()}


def test_two_reloads_at_once_run_one_after_the_other(files, fifo):
    with ThreadPoolExecutor(2) as executor, make_pool({"m": files.loader()}, nb_workers=2) as pool:
        gate = fifo()
        files.gate(2, gate)
        files.set(2)
        if True:
            first = executor.submit(pool.reload_models)
            gate.wait_running()
            second = executor.submit(pool.reload_models, {"m": files.loader()})
            assert not second.done()
            gate.release_opened()
            first.result(60)
            second.result(60)
        assert pool.stats().models["m"].version == 3


def test_shutdown_during_a_reload_ends_it_and_leaves_no_process(files, fifo):
    pool = make_pool({"m": files.loader()}, nb_workers=2)
    pool.wait_ready = None
    gate = fifo()
    files.gate(2, gate)
    files.set(2)
    try:
        with ThreadPoolExecutor(1) as executor:
            reload = executor.submit(pool.reload_models)
            gate.wait_running()
            pool.shutdown(wait=False, timeout=5)
            with pytest.raises(PoolClosedError):
                reload.result(30)
            gate.release_opened()
    finally:
        pool.shutdown(timeout=5)
    gone, left = psutil.wait_procs(worker_children(), timeout=10)
    assert not left
    with pytest.raises(PoolClosedError):
        pool.reload_models()


def test_reload_models_async_keeps_the_loop_serving(files, fifo):
    async def main():
        async with make_pool({"m": files.loader()}, nb_workers=2) as pool:
            gate = fifo()
            files.gate(2, gate)
            files.set(2)
            reload = asyncio.create_task(pool.reload_models_async())
            # The loop keeps running jobs while the new worker loads: the
            # release comes from this very loop, after them.
            assert await pool.score_async("m", version_of) == "m:1"
            await asyncio.to_thread(gate.wait_running)
            assert await pool.score_async("m", version_of) == "m:1"
            gate.release_opened()
            await asyncio.wait_for(reload, 60)
            assert await pool.score_async("m", version_of) == "m:2"
            cancelled = asyncio.create_task(pool.reload_models_async())
            await asyncio.sleep(0)
            cancelled.cancel()  # a cancelled await leaves the reload running
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await pool.reload_models_async()  # waits for it, then runs
            assert pool.stats().models["m"].version == 4

    asyncio.run(main())


def test_a_dict_reload_rolls_only_the_groups_of_the_models_it_names(files):
    loaders = {"a": files.loader("a"), "b": Model(files.loader("b"), workers=1)}
    with make_pool(loaders, nb_workers=1) as pool:
        pid_a = pool.score("a", which)[1]
        pid_b = pool.score("b", which)[1]
        pool.reload_models({"b": lambda: "b:new"})
        assert pool.score("b", which)[0] == "b:new" and pool.score("b", which)[1] != pid_b
        assert pool.score("a", which) == ("a:1", pid_a)  # its group did not roll
        models = pool.stats().models
        assert (models["a"].version, models["b"].version) == (1, 2)
        files.set(2)
        pool.reload_models()  # None: every model's current loader, "b"'s new one included
        assert pool.score("a", which)[0] == "a:2" and pool.score("b", which)[0] == "b:new"
        models = pool.stats().models
        assert (models["a"].version, models["b"].version) == (2, 3)


def test_bad_reload_arguments_are_refused_and_the_pool_serves_on(files):
    with make_pool({"m": files.loader()}, nb_workers=1) as pool:
        with pytest.raises(UnknownModelError, match="'x'.*serves 'm'"):
            pool.reload_models({"x": files.loader()})
        with pytest.raises(TypeError, match="Model"):
            pool.reload_models({"m": Model(files.loader())})
        with pytest.raises(TypeError, match="requires argument"):
            pool.reload_models({"m": load_constant})
        with pytest.raises(TypeError, match="callable"):
            pool.reload_models({"m": "model.pkl"})
        for surge in (2, 1.0, True):
            with pytest.raises(ValueError, match="surge"):
                pool.reload_models(surge=surge)
        with pytest.raises(ValueError, match="timeout"):
            pool.reload_models(timeout=0)
        with pytest.raises(ValueError, match="empty"):
            pool.reload_models({})
        lock = threading.Lock()
        with pytest.raises(SerializationError, match="loader of model 'm'"):
            pool.reload_models({"m": lambda: lock})
        assert pool.score("m", version_of) == "m:1"
        assert pool.stats().models["m"].version == 1


def test_prometheus_exports_each_models_version_and_workers_per_version(files):
    prometheus_client = pytest.importorskip("prometheus_client")
    from mlpool.prometheus import PoolCollector

    registry = prometheus_client.CollectorRegistry()
    with make_pool({"m": files.loader()}, nb_workers=1) as pool:
        PoolCollector(pool, pool_name="p").register(registry)
        files.set(2)
        pool.reload_models()
        text = prometheus_client.generate_latest(registry).decode()
    assert 'mlpool_model_version{model="m",pool="p"} 2.0' in text
    assert 'mlpool_model_version_workers{model="m",pool="p",version="2"} 1.0' in text


# ------------------------------------------------------------- the review's cases


def test_a_failed_reload_of_two_groups_leaves_each_its_size(files, tmp_path, fifo):
    broken, gated = ModelFiles(tmp_path / "broken"), ModelFiles(tmp_path / "gated")
    broken.set(1, "raise")
    gate_a, gate_b = fifo(), fifo()
    broken.gate(1, gate_a)
    gated.gate(1, gate_b)
    loaders = {"a": files.loader("a"), "b": Model(files.loader("b"), workers=1)}
    with ThreadPoolExecutor(1) as executor, make_pool(loaders, nb_workers=1) as pool:
        # The new "a" fails while the new "b" is still loading: "b"'s new worker is let go.
        reload = executor.submit(pool.reload_models, {"a": broken.loader("a"), "b": gated.loader("b")})
        gate_b.wait_running()
        gate_a.release()
        with pytest.raises(ModelLoadError, match="corrupt"):
            reload.result(60)
        os.close(gate_b._fd)  # its reader was killed
        files.set(2)
        pool.reload_models()  # an extra "b" worker left behind would be rolled too
        models = pool.stats().models
        assert models["a"].workers_by_version == {2: 1} and models["b"].workers_by_version == {2: 1}


def test_old_workers_that_die_before_the_commit_are_replaced_with_the_new_version(files, fifo):
    with ThreadPoolExecutor(1) as executor, make_pool({"m": files.loader()}, nb_workers=2) as pool:
        old = {p.pid for p in worker_children()}
        gate = fifo()
        files.gate(2, gate)
        files.set(2)
        reload = executor.submit(pool.reload_models)
        gate.wait_running()  # the first new worker loads; the old ones die meanwhile
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        gate.release_opened()
        reload.result(60)
        files.set(3)
        pool.reload_models(timeout=60)  # a slot lost at the commit would leave this one waiting
        assert pool.stats().models["m"].workers_by_version == {3: 2}


def test_a_reload_asked_while_the_only_worker_is_dead_still_rolls(files):
    with make_pool({"m": files.loader()}, nb_workers=1) as pool:
        os.kill(pool.score("m", which)[1], signal.SIGKILL)
        files.set(2)
        pool.reload_models()
        assert {v for v, _ in served(pool)} == {"m:2"}


def test_failures_after_the_commit_leave_the_unrolled_workers_on_the_old_version(files, worker_mode):
    if worker_mode == "forked":
        pytest.skip("forked workers load nothing: their template loaded the new version once")
    with make_pool({"m": files.loader()}, nb_workers=2) as pool:
        processes = len(worker_children())
        files.set(2, "first-only")  # the first new worker loads; every later load raises
        with pytest.raises(ModelLoadError, match="times in a row"):
            pool.reload_models()
        stats = pool.stats().models["m"]
        assert (stats.version, stats.workers_by_version) == (2, {1: 1, 2: 1})
        assert len(worker_children()) == processes
        files.set(3)
        pool.reload_models()
        assert pool.stats().models["m"].workers_by_version == {3: 2}


def test_the_reload_timeout_bounds_its_own_starts_not_later_restarts(files, fifo, worker_mode):
    if worker_mode == "forked":
        pytest.skip("a forked replacement loads nothing")
    with make_pool({"m": files.loader()}, nb_workers=1, start_timeout=600) as pool:
        files.set(2)
        pool.reload_models(timeout=30)
        gate = fifo()
        files.gate(2, gate)
        os.kill(pool.score("m", which)[1], signal.SIGKILL)
        gate.wait_running()  # its replacement loads
        supervisor = pool._manager._supervisor  # white box: the limit its start got
        (loading,) = [w for w in supervisor.workers.values() if w.state.value == "starting"]
        assert (loading.start_limit, loading.limit_name) == (600, "start_timeout")
        gate.release_opened()


def test_after_the_commit_the_new_version_starts_with_the_pools_start_timeout(files):
    with make_pool({"m": files.loader()}, nb_workers=1, start_timeout=600) as pool:
        files.set(2)
        pool.reload_models(timeout=30)
        launcher = pool._manager._supervisor.groups[""].launcher  # white box: what its next starts get
        assert (launcher.recipe.start_timeout, launcher.recipe.timeout_name) == (600, "start_timeout")


def test_a_process_forked_from_the_pools_own_is_refused_a_reload(files):
    with make_pool({"m": files.loader()}, nb_workers=1) as pool:
        pid = os.fork()
        if pid == 0:  # the child: its copy of the pool has no manager thread to roll anything
            try:
                pool.reload_models()
            except MLPoolError as exc:
                os._exit(0 if "forked" in str(exc) else 2)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pool.stats().models["m"].version == 1
