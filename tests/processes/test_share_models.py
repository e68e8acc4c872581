"""share_models=True: one load in a template process, forked workers, copy-on-write memory.

The API, error, crash and lifecycle suites also run in this mode (see the
``worker_mode`` fixture); these tests cover what only this mode has.
"""

from __future__ import annotations

import ctypes
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import psutil
import pytest
from helpers import forked_models, workloads
from helpers.pools import make_pool
from helpers.workloads import add, load_constant

from mlpool import PoolBrokenError, WorkerCrashedError

pytestmark = pytest.mark.usefixtures("forkserver_running", "no_leaked_workers")


@pytest.fixture(scope="module")
def forkserver_running():
    """multiprocessing's fork server lives as long as the tests; start it
    before no_leaked_workers counts processes."""
    multiprocessing.forkserver.ensure_running()


def loads(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()]


def model_pid(model: dict) -> tuple[int, int]:
    """(this worker's pid, the pid of the process that loaded its model)."""
    return os.getpid(), model["pid"]


def test_models_load_once_and_replacements_load_nothing(tmp_path):
    log = tmp_path / "loads"
    loader = partial(workloads.load_logged, str(log))
    with make_pool({"m": loader}, nb_workers=2, share_models=True, max_retries=1) as pool:
        (template,) = loads(log)
        worker, loaded_by = pool.score("m", model_pid)
        assert loaded_by == template != worker
        os.kill(worker, signal.SIGKILL)
        # Jobs after the kill: some may go to the dead worker before the pool
        # sees its death (max_retries=1 covers that); all succeed.
        futures = [pool.submit("m", model_pid) for _ in range(20)]
        served = {f.result(timeout=30) for f in futures}
        assert all(loaded == template for _, loaded in served)
        assert pool.stats().worker_restarts >= 1
        assert loads(log) == [template]  # the replacement loaded nothing


def test_a_dead_template_leaves_workers_serving_and_is_reloaded_once(tmp_path):
    log = tmp_path / "loads"
    loader = partial(workloads.load_logged, str(log))
    with make_pool({"m": loader}, nb_workers=2, share_models=True, max_retries=3) as pool:
        (template,) = loads(log)
        workers = psutil.Process(template).children()
        assert len(workers) == 2
        os.kill(template, signal.SIGKILL)
        # The workers it forked keep serving (not reaping the template here:
        # the pool does).
        futures = [pool.submit("m", model_pid) for _ in range(20)]
        assert {f.result(timeout=30)[0] for f in futures} <= {w.pid for w in workers}
        # Kill every worker: their replacements come from a new template.
        for worker in workers:
            worker.kill()
        worker, loaded_by = pool.score("m", model_pid)
        assert loaded_by != template
        assert loads(log) == [template, loaded_by]  # loaded exactly once more


@pytest.mark.parametrize("how", ["raise", "die", "hang"])
def test_failing_templates_delay_replacements_and_break_the_pool_only_when_nothing_serves(tmp_path, fifo, how):
    flag = tmp_path / "flag"
    loader = partial(workloads.load_unless_flagged, str(flag), how)
    pool = make_pool({"m": loader}, nb_workers=1, share_models=True, start_timeout=1.0)
    try:
        template = pool.score("m", lambda model: model["pid"])
        gate = fifo()
        running = pool.submit("m", workloads.wait_for_release, str(gate))
        gate.wait_running()
        flag.touch()
        os.kill(template, signal.SIGKILL)
        # Every new template fails; the worker serves on all the same.
        gate.release_opened()
        assert running.result(timeout=60) is not None
        assert pool.score("m", add, 1) == 11
        assert pool.healthy
        # Once the worker is gone nothing can serve, and no template loads:
        # after a bounded number of tries the pool gives up.
        with pytest.raises(WorkerCrashedError):
            pool.submit("m", workloads.sigkill_self).result(timeout=60)
        expected = {
            "raise": "storage is gone",
            "die": "model template .* (killed by SIGKILL|did not load the models)",  # a loaded machine: the timeout
            "hang": "model template .* did not load the models within start_timeout=1s",
        }[how]
        with pytest.raises(PoolBrokenError, match=expected):
            pool.submit("m", add, 1).result(timeout=60)
        assert not pool.healthy
    finally:
        pool.shutdown()


@contextmanager
def subreaper():
    """Orphaned descendants are re-parented to this process (and reaped by psutil)."""
    libc = ctypes.CDLL(None)
    libc.prctl(36, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(36, 0, 0, 0, 0)


PARENT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from helpers import workloads
    from mlpool import MLPool

    if __name__ == "__main__":
        pool = MLPool({{"m": workloads.load_constant}}, nb_workers=2, share_models=True)
        pids = {{pool.score("m", workloads.pid) for _ in range(50)}}
        template = pool.score("m", lambda model: model["pid"])
        print(template, *pids, flush=True)
        sys.stdin.read()  # until the test kills us
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
def test_no_process_survives_the_parent_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(tests=str(Path(__file__).parent.parent)))
    with subreaper():
        parent = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            line = parent.stdout.readline().decode()
            pids = [int(p) for p in line.split()]
            assert len(pids) >= 2, line  # the template and at least one worker answered
            children = [psutil.Process(p) for p in pids]
            parent.kill()
            parent.wait(timeout=30)
            gone, alive = psutil.wait_procs(children, timeout=30)
            assert not alive, f"left behind after the parent was killed: {alive}"
        finally:
            parent.kill()
            parent.wait()


def test_forked_workers_score_real_models_without_deadlock():
    """scikit-learn, XGBoost and PyTorch models, each scored once with two
    threads in its loader, then in forked workers that use two threads."""
    rows = [[6.2, 2.2, 4.5, 1.5], [5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]]
    forest, booster, cnn = forked_models.load_forest(), forked_models.load_booster(), forked_models.load_cnn()
    expected = {
        "forest": forked_models.predict_rows(forest, rows),
        "booster": forked_models.predict_rows(booster, rows),
        "cnn": [forked_models.classify_images(cnn, seed) for seed in range(4)],
    }
    loaders = {
        "forest": forked_models.load_forest,
        "booster": forked_models.load_booster,
        "cnn": forked_models.load_cnn,
    }
    with make_pool(loaders, nb_workers=2, threads_per_worker=2, share_models=True, job_timeout=60) as pool:
        for _ in range(10):
            forest_jobs = [pool.submit("forest", forked_models.predict_rows, rows) for _ in range(4)]
            booster_jobs = [pool.submit("booster", forked_models.predict_rows, rows) for _ in range(4)]
            cnn_jobs = [pool.submit("cnn", forked_models.classify_images, seed) for seed in range(4)]
            assert [f.result(timeout=60) for f in forest_jobs] == [expected["forest"]] * 4
            assert [f.result(timeout=60) for f in booster_jobs] == [expected["booster"]] * 4
            assert [f.result(timeout=60) for f in cnn_jobs] == expected["cnn"]
        threads = pool.score("cnn", lambda model: __import__("torch").get_num_threads())
        assert threads == 2  # the cap was raised again after the single-threaded load


def test_model_memory_stays_shared_after_many_jobs():
    with make_pool({"m": partial(workloads.load_weights, 100)}, nb_workers=2, share_models=True) as pool:
        futures = [pool.submit("m", workloads.weights_mean) for _ in range(1000)]
        assert {f.result(timeout=60) for f in futures} == {0.5}
        template = pool.score("m", lambda model: model["pid"])
        workers = psutil.Process(template).children()
        assert len(workers) == 2
        for worker in workers:
            # 100 MiB of weights read by every job: the worker's own pages are
            # its interpreter's, a fraction of the model.
            mib = worker.memory_full_info().uss / 2**20
            assert mib < 40, f"worker {worker.pid} holds {mib:.0f} MiB of its own"


def test_max_memory_per_worker_counts_private_memory_only():
    limit = 120 * 2**20  # below the 200 MiB model every worker maps
    with make_pool(
        {"m": partial(workloads.load_weights, 200)}, nb_workers=1, share_models=True, max_memory_per_worker=limit
    ) as pool:
        first = pool.score("m", workloads.pid)
        assert all(pool.score("m", workloads.weights_mean) == 0.5 for _ in range(20))
        assert pool.stats().workers_recycled == 0
        assert pool.score("m", workloads.hold_memory, 150) == first  # now 150 MiB of its own
        # Recycled, from the template. A costly reading (smaps_rollup) may
        # follow the result rather than come with it, so jobs may still run on
        # it for a while: wait for the process itself to end (retired, stopped).
        process = psutil.Process(first)
        while process.is_running() and pool.score("m", workloads.pid) == first:
            pass  # each job is a chance for the late reading to arrive
        process.wait(timeout=30)
        assert pool.score("m", workloads.pid) != first
        assert pool.stats().workers_recycled == 1


def test_forkserver_template():
    with make_pool({"m": load_constant}, nb_workers=2, share_models=True, start_method="forkserver") as pool:
        assert pool.score("m", add, 1) == 11


def test_share_models_must_be_a_bool():
    with pytest.raises(TypeError, match="share_models must be a bool"):
        make_pool({"m": load_constant}, nb_workers=1, share_models="yes")


def draw(model: dict) -> tuple[int, float, float]:
    import random

    import numpy as np
    import torch

    return os.getpid(), np.random.random(), torch.rand(1).item() + random.random()


def test_each_forked_worker_has_its_own_random_streams():
    with make_pool({"m": forked_models.load_cnn_and_draw}, nb_workers=2, share_models=True) as pool:
        template = psutil.Process(pool.score("m", lambda model: os.getppid()))
        workers = template.children()
        draws = {}
        while len(draws) < 2:  # the lent path favours one idle worker: ask both
            futures = [pool.submit("m", draw) for _ in range(8)]
            for pid, *values in (f.result(timeout=30) for f in futures):
                draws.setdefault(pid, values)
        assert set(draws) <= {w.pid for w in workers}
        first, second = draws.values()
        assert first[0] != second[0] and first[1] != second[1]
