"""Several models in one pool (#16): Model and its checks, the nb_workers default,
priorities, pool.options(), session lanes, per-model bounds, stats and metrics.

The tests marked ``needs supervisor groups`` run once the engine spawns a
group of workers per Model(workers=N) (the lead's half of #16).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from helpers.pools import make_pool
from helpers.workloads import load_constant, wait_for_release

import mlpool
from mlpool import JobTimeoutError, MLPool, Model, PoolFullError
from mlpool._api.config import ModelSettings, PoolConfig, loaders_of
from mlpool._api.jobapi import JobAPI
from mlpool._engine.admission import ModelBounds


def needs_groups(test):
    """A test of groups spawned by the engine: bounded, so a model left without
    workers fails it within 60 s instead of waiting."""
    return pytest.mark.timeout(60)(test)


def stamp(model: dict, label: str) -> tuple[str, float]:
    """When this job started (CLOCK_MONOTONIC is one clock for every process here)."""
    return label, time.monotonic()


def started_order(results: list[tuple[str, float]]) -> list[str]:
    return [label for label, _ in sorted(results, key=lambda item: item[1])]


def resolve(models: dict, **settings) -> PoolConfig:
    options = {
        "nb_workers": None, "threads_per_worker": None, "result_ttl": 300.0, "max_queue_size": None,
        "job_timeout": None, "max_retries": 0, "max_jobs_per_worker": None, "max_memory_per_worker": None,
        "start_method": None, "start_timeout": 60.0,
    }  # fmt: skip
    options.update(settings)
    return PoolConfig.resolve(models_to_load=models, **options)


# ---------------------------------------------------------------- Model and its checks


def test_model_is_exported_and_its_loader_must_be_callable():
    assert mlpool.Model is Model and Model.__module__ == "mlpool"
    with pytest.raises(TypeError, match="loader must be callable"):
        Model("not a function")
    with pytest.raises(TypeError):
        Model(load_constant, 2)  # settings are keyword-only
    assert loaders_of({"a": load_constant, "b": Model(load_constant, workers=1)}) == {
        "a": load_constant,
        "b": load_constant,
    }


def test_groups_and_model_settings_fall_back_to_the_pools():
    config = resolve(
        {
            "iris": load_constant,
            "diabetes": load_constant,
            "ranker": Model(load_constant, workers=2, threads_per_worker=3, worker_env={"A": "1"}),
            "embedder": Model(load_constant, max_queue_size=100, job_timeout=5.0),
        },
        nb_workers=2, threads_per_worker=1, max_queue_size=50, job_timeout=9.0, max_retries=1,
        max_jobs_per_worker=7,
    )  # fmt: skip
    shared, ranker = config.groups
    assert (shared.name, shared.models, shared.workers, shared.threads_per_worker) == (
        "", ("iris", "diabetes", "embedder"), 2, 1,
    )  # fmt: skip
    assert (ranker.name, ranker.models, ranker.workers, ranker.threads_per_worker) == ("ranker", ("ranker",), 2, 3)
    assert ranker.max_jobs_per_worker == 7 and ranker.worker_env == {"A": "1"} and shared.worker_env is None
    settings = config.model_settings
    assert (settings["ranker"].group, settings["ranker"].max_queue_size, settings["ranker"].job_timeout) == (
        "ranker", 50, 9.0,
    )  # fmt: skip
    assert (settings["embedder"].group, settings["embedder"].max_queue_size, settings["embedder"].job_timeout) == (
        "", 100, 5.0,
    )  # fmt: skip
    assert settings["iris"].max_retries == 1 and config.nb_workers == 2 and not config.inline
    assert config.model_groups() == {"iris": "", "diabetes": "", "ranker": "ranker", "embedder": ""}


def test_the_default_nb_workers_leaves_a_core_and_the_dedicated_workers_out(monkeypatch):
    monkeypatch.setattr("mlpool._api.config.usable_cpu_count", lambda: 8)
    mixed = resolve({"a": load_constant, "r": Model(load_constant, workers=2)})
    assert mixed.nb_workers == 8 - 1 - 2 and [g.workers for g in mixed.groups] == [5, 2]
    assert mixed.threads_per_worker == 1  # 7 workers on 8 cores
    crowded = resolve({"a": load_constant, "r": Model(load_constant, workers=9)})
    assert crowded.nb_workers == 1  # a plain model needs one shared worker at least
    dedicated = resolve({"r": Model(load_constant, workers=2), "s": Model(load_constant, workers=1)})
    assert dedicated.nb_workers == 0 and not dedicated.inline
    assert [g.name for g in dedicated.groups] == ["r", "s"]


def _m(**settings) -> Model:
    return Model(load_constant, **settings)


@pytest.mark.parametrize(
    ("models", "settings", "error", "message"),
    [
        ({"r": _m(workers=0)}, {}, ValueError, "model 'r': workers must be >= 1"),
        ({"r": _m(workers=1.5)}, {}, TypeError, "model 'r': workers must be an int"),
        ({"r": _m(workers=True)}, {}, TypeError, "model 'r': workers must be an int"),
        ({"a": _m(threads_per_worker=2)}, {}, ValueError, "model 'a': threads_per_worker is a setting of a worker"),
        ({"a": _m(worker_env={"X": "1"})}, {}, ValueError, "model 'a': worker_env is a setting"),
        ({"a": _m(max_queue_size=0)}, {}, ValueError, "model 'a': max_queue_size must be >= 1"),
        ({"a": _m(job_timeout=-1)}, {}, ValueError, "model 'a': job_timeout must be a positive"),
        ({"a": _m(max_retries="2")}, {}, TypeError, "model 'a': max_retries must be an int"),
        ({"r": _m(workers=2, share_models="yes")}, {}, TypeError, "model 'r': share_models must be a bool"),
        ({"r": _m(workers=1, ray_options={"num_cpus": 1})}, {}, ValueError, "model 'r': ray_options needs"),
        ({"r": _m(workers=2, worker_env=lambda i: 1 / i)}, {}, ValueError, "'r': worker_env raised ZeroDiv.*index 0"),
        ({"r": _m(workers=2, worker_env=lambda i: ["X"])}, {}, TypeError, "'r': worker_env must return a dict.*list"),
        ({"r": _m(workers=1, worker_env={"X": 1})}, {}, TypeError, "model 'r': worker_env must map str to str"),
        ({"r": _m(workers=1, worker_env={"A=B": "1"})}, {}, ValueError, "cannot be an environment variable"),
        ({"r": _m(workers=1, worker_env="X=1")}, {}, TypeError, "model 'r': worker_env must be a dict"),
        ({"r": _m(workers=1)}, {"nb_workers": 2}, ValueError, "nb_workers=2 counts the shared workers, and no"),
        ({"r": _m(workers=1)}, {"worker_env": {"X": "1"}}, ValueError, "worker_env applies to the shared workers"),
        ({"a": load_constant}, {"worker_env": lambda i: {"X": i}}, TypeError, "worker_env .index 0. must map str"),
    ],
)  # fmt: skip
def test_bad_configuration_names_the_model_and_the_setting_and_starts_nothing(
    models, settings, error, message, no_leaked_workers
):
    with pytest.raises(error, match=message):
        MLPool(models, **settings)


def test_a_worker_env_callable_is_called_for_each_index_at_construction():
    seen = []
    resolve({"r": Model(load_constant, workers=3, worker_env=lambda i: seen.append(i) or {"I": str(i)})})
    assert seen == [0, 1, 2]


def test_inline_pools_take_models_their_per_model_settings_apply_and_group_settings_are_unused():
    models = {
        "a": load_constant,
        "r": Model(load_constant, workers=4, worker_env={"MLPOOL_TEST_ENV": "x"}, max_queue_size=3),
    }
    with MLPool(models, nb_workers=0) as pool:
        assert pool.score("r", stamp, "x")[0] == "x" and pool.score("a", stamp, "y")[0] == "y"
        assert "MLPOOL_TEST_ENV" not in os.environ  # the calling process's environment is left alone
        assert {name: s.jobs_completed for name, s in pool.stats().models.items()} == {"a": 1, "r": 1}


# ------------------------------------------------------------ priority and options


def test_priority_must_be_an_int_and_options_are_checked_when_the_view_is_made():
    with MLPool({"m": load_constant}, nb_workers=0) as pool:
        for bad in ("high", 1.5, True):
            with pytest.raises(TypeError, match="priority must be an int"):
                pool.create_job(stamp, "m", args=("x",), priority=bad)
            with pytest.raises(TypeError, match="priority must be an int"):
                pool.options(priority=bad)
            with pytest.raises(TypeError, match="priority must be an int"):
                pool.session(priority=bad)
        with pytest.raises(ValueError, match="timeout must be a positive"):
            pool.options(timeout=-1)
        with pytest.raises(ValueError, match="max_retries must be >= 0"):
            pool.options(max_retries=-1)
        assert pool.get_result(pool.create_job(stamp, "m", args=("x",), priority=-3))[0] == "x"


def test_an_options_view_has_every_job_method_of_the_pool():
    with MLPool({"m": load_constant}, nb_workers=0) as pool:
        view = pool.options(priority=2)
        session = pool.session()
        for source in (view, session.options(timeout=5.0)):
            for name in dir(JobAPI):
                if not name.startswith("_"):
                    assert callable(getattr(source, name)), name
        assert view.score("m", stamp, "v")[0] == "v"
        assert view.options(max_retries=1).get_result(view.create_job(stamp, "m", args=("w",)))[0] == "w"


def test_a_higher_priority_job_runs_before_lower_ones_queued_earlier(fifo):
    gate = fifo()
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        low = [pool.submit("m", stamp, f"low{i}") for i in range(3)]
        urgent = pool.options(priority=5).submit("m", stamp, "urgent")
        middle = pool.get_result  # a job id at priority 1, through create_job
        middle_id = pool.create_job(stamp, "m", args=("middle",), priority=1)
        gate.release_opened()
        blocker.result(timeout=30)
        results = [f.result(timeout=30) for f in (*low, urgent)] + [middle(middle_id, timeout=30)]
    assert started_order(results) == ["urgent", "middle", "low0", "low1", "low2"]


def test_an_options_timeout_applies_to_a_job_waiting_in_the_queue(fifo):
    gate = fifo()
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        expiring = pool.options(timeout=0.1).submit("m", stamp, "late")
        with pytest.raises(JobTimeoutError, match="in the queue"):
            expiring.result(timeout=30)
        gate.release_opened()
        blocker.result(timeout=30)


def test_a_models_own_job_timeout_is_its_jobs_default(fifo):
    gate = fifo()
    models = {"m": load_constant, "quick": Model(load_constant, job_timeout=0.1)}
    with MLPool(models, nb_workers=1) as pool:
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        expiring = pool.submit("quick", stamp, "quick")
        patient = pool.submit("m", stamp, "m")
        with pytest.raises(JobTimeoutError):
            expiring.result(timeout=30)
        gate.release_opened()
        blocker.result(timeout=30)
        assert patient.result(timeout=30)[0] == "m"


# --------------------------------------------------------------------- fair queues


def test_a_sessions_lone_job_runs_after_at_most_one_job_of_a_flooding_session(fifo):
    gate = fifo()
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        with pool.session() as flood, pool.session() as quiet:
            flooded = [flood.submit("m", stamp, f"flood{i}") for i in range(30)]
            lone = quiet.submit("m", stamp, "quiet")
            gate.release_opened()
            blocker.result(timeout=30)
            order = started_order([f.result(timeout=30) for f in (*flooded, lone)])
    assert order.index("quiet") <= 1  # one worker: one flood job at most goes first
    assert [label for label in order if label != "quiet"] == [f"flood{i}" for i in range(30)]  # FIFO in a lane


def test_models_sharing_workers_take_turns(fifo):
    gate = fifo()
    with MLPool({"big": load_constant, "small": load_constant}, nb_workers=1) as pool:
        blocker = pool.submit("big", wait_for_release, str(gate))
        gate.wait_running()
        big = [pool.submit("big", stamp, f"big{i}") for i in range(20)]
        small = [pool.submit("small", stamp, f"small{i}") for i in range(2)]
        gate.release_opened()
        blocker.result(timeout=30)
        order = started_order([f.result(timeout=30) for f in (*big, *small)])
    assert order[:4] == ["big0", "small0", "big1", "small1"]


def test_a_full_model_refuses_while_the_others_take_jobs_and_its_waiters_get_room(fifo):
    gate = fifo()
    models = {"m": load_constant, "small": Model(load_constant, max_queue_size=2)}
    with MLPool(models, nb_workers=1) as pool:
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        queued = [pool.create_job(stamp, "small", args=(f"s{i}",)) for i in range(2)]
        with pytest.raises(PoolFullError, match="model 'small' is full.*max_queue_size=2"):
            pool.create_job(stamp, "small", args=("refused",), block_until_scheduled=False)
        others = [pool.create_job(stamp, "m", args=(f"m{i}",), block_until_scheduled=False) for i in range(5)]
        assert pool.stats().models["small"].queue_depth == 2
        admitted = threading.Event()
        waiting: list[str] = []

        def wait_for_room() -> None:
            waiting.append(pool.create_job(stamp, "small", args=("waited",)))
            admitted.set()

        thread = threading.Thread(target=wait_for_room)
        thread.start()
        assert not admitted.wait(0.2)  # the model is still full: it waits (its bound, not the pool's)
        gate.release_opened()
        assert admitted.wait(30)
        thread.join(30)
        blocker.result(timeout=30)
        labels = [pool.get_result(job_id, timeout=30)[0] for job_id in (*queued, *others, *waiting)]
    assert labels == ["s0", "s1", *(f"m{i}" for i in range(5)), "waited"]


def test_callers_waiting_for_a_full_model_wake_only_when_that_model_has_room():
    queued = {"small": 2, "big": 9}
    accepting = [True]
    settings = {"small": ModelSettings("", 2, None, 0), "big": ModelSettings("", 100, None, 0)}
    bounds = ModelBounds(settings, queued.__getitem__, 100, lambda: accepting[0])
    assert bounds.full("small") and not bounds.full("big")  # big's bound is the pool's: the pool checks it
    waiter = bounds.wait("small")
    queued["big"] = 0  # another model's movement wakes nobody
    assert bounds.due() == [] and not waiter.done()
    queued["small"] = 1
    assert bounds.due() == [waiter] and not bounds.waiters
    late = bounds.wait("small")
    queued["small"] = 2
    accepting[0] = False
    assert bounds.due() == [late]  # a closing pool wakes every waiter, to hear why
    assert "model 'small' is full (2 jobs waiting, its max_queue_size=2)" in str(bounds.refuse("small"))


# --------------------------------------------------------------- stats and metrics


def test_stats_per_model_count_each_models_jobs():
    models = {"a": load_constant, "b": Model(load_constant, max_retries=1)}
    with MLPool(models, nb_workers=1) as pool:
        for _ in range(3):
            pool.score("a", stamp, "a")
        with pytest.raises(ZeroDivisionError):
            pool.score("b", divide, 0)
        stats = pool.stats()
    a, b = stats.models["a"], stats.models["b"]
    assert (a.jobs_completed, a.jobs_failed, a.workers, a.group, a.latency_count) == (3, 0, 1, "", 3)
    assert (b.jobs_completed, b.jobs_failed, b.latency_count) == (0, 1, 1)
    assert a.latency_p50 is not None and a.latency_p99 >= a.latency_p50


def test_a_pool_of_one_model_reports_the_pools_figures_as_the_models():
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        pool.score("m", stamp, "x")
        stats = pool.stats()
    assert stats.models["m"].jobs_completed == stats.jobs_completed == 1
    assert stats.models["m"].latency_count == stats.latency_count


def test_prometheus_labels_every_per_model_series_with_the_model():
    prometheus_client = pytest.importorskip("prometheus_client")
    from mlpool.prometheus import PoolCollector

    registry = prometheus_client.CollectorRegistry()
    with MLPool({"a": load_constant, "b": load_constant}, nb_workers=1) as pool:
        PoolCollector(pool, pool_name="p").register(registry)
        pool.score("a", stamp, "x")
        text = prometheus_client.generate_latest(registry).decode()
    assert 'mlpool_model_jobs_total{model="a",outcome="completed",pool="p"} 1.0' in text
    assert 'mlpool_model_jobs_total{model="b",outcome="completed",pool="p"} 0.0' in text
    assert 'mlpool_model_workers{model="b",pool="p"} 1.0' in text
    assert 'mlpool_model_job_latency_seconds_count{model="a",pool="p"} 1.0' in text


def divide(model: dict, x: int) -> float:
    return 1 / x


# ------------------------------------------------ engine level: groups of workers


def record_load(log: str, name: str):
    """A loader that appends ``name pid env`` to ``log`` (one line per process)."""

    def load() -> dict:
        with open(log, "a") as f:
            f.write(f"{name} {os.getpid()} {os.environ.get('MLPOOL_GROUP_INDEX', '-')}\n")
        return {"name": name}

    return load


def loaded(log: Path) -> list[tuple[str, int, str]]:
    return [(n, int(p), e) for n, p, e in (line.split() for line in log.read_text().splitlines())]


def environment(model: dict, key: str) -> tuple[int, str | None]:
    return os.getpid(), os.environ.get(key)


def die(model: dict) -> None:
    os._exit(3)


@needs_groups
def test_a_groups_workers_load_only_its_model(tmp_path, worker_mode, no_leaked_workers):
    log = tmp_path / "loads"
    models = {
        "iris": record_load(str(log), "iris"),
        "ranker": Model(record_load(str(log), "ranker"), workers=2),
    }
    with make_pool(models, nb_workers=1) as pool:
        ranker_pids = {pool.submit("ranker", environment, "X").result(timeout=20)[0] for _ in range(6)}
        assert pool.stats().models["ranker"].workers == 2
    loads = loaded(log)
    assert len({pid for _, pid, _ in loads}) == len(loads)  # no process loaded both models
    if worker_mode == "forked":  # a template per group loads its models once; the workers are forked from it
        assert sorted(name for name, _, _ in loads) == ["iris", "ranker"]
        return
    assert sorted(name for name, _, _ in loads) == ["iris", "ranker", "ranker"]
    assert {pid for name, pid, _ in loads if name == "ranker"} >= ranker_pids


@needs_groups
def test_a_flood_of_one_group_does_not_delay_another_group(fifo, worker_mode):
    gates = [fifo(), fifo()]
    models = {"iris": load_constant, "ranker": Model(load_constant, workers=2)}
    with make_pool(models, nb_workers=1) as pool:
        busy = [pool.submit("ranker", wait_for_release, str(gate)) for gate in gates]
        for gate in gates:
            gate.wait_running()
        flood = [pool.submit("ranker", stamp, "r") for _ in range(100)]
        # The ranker's workers are all busy, its queue long: the shared worker serves iris at once.
        assert pool.submit("iris", stamp, "i").result(timeout=20)[0] == "i"
        for gate in gates:
            gate.release_opened()
        for future in (*busy, *flood):
            future.result(timeout=60)


@needs_groups
def test_worker_env_is_seen_by_loaders_scoring_functions_and_replacements(tmp_path, worker_mode):
    log = tmp_path / "loads"
    load = record_load(str(log), "ranker")
    models = {
        "ranker": Model(load, workers=2, worker_env=lambda i: {"MLPOOL_GROUP_INDEX": str(i)}),
        "tagger": Model(load_constant, workers=1, worker_env={"MLPOOL_GROUP_INDEX": "0"}),
    }
    with make_pool(models) as pool:
        seen = {pool.submit("ranker", environment, "MLPOOL_GROUP_INDEX").result(timeout=20)[1] for _ in range(8)}
        assert seen and seen <= {"0", "1"}
        assert pool.submit("tagger", environment, "MLPOOL_GROUP_INDEX").result(timeout=20)[1] == "0"
        with pytest.raises(mlpool.WorkerCrashedError):
            pool.submit("ranker", die).result(timeout=20)
        after = {pool.submit("ranker", environment, "MLPOOL_GROUP_INDEX").result(timeout=20) for _ in range(8)}
    assert {env for _, env in after} <= {"0", "1"}  # the replacement has its predecessor's index
    if worker_mode == "spawned":  # each worker ran the loader under its own index, the replacement too
        envs = [env for _, _, env in loaded(log)]
        assert len(envs) == 3 and set(envs[:2]) == {"0", "1"} and envs[2] in {"0", "1"}


@needs_groups
def test_a_group_that_cannot_load_goes_down_alone_and_the_other_groups_serve_on(tmp_path, worker_mode):
    from functools import partial

    from helpers.workloads import add, load_unless_flagged, sigkill_self

    if worker_mode == "forked":
        pytest.skip("forked replacements load nothing: the group's template holds the model")
    flag = tmp_path / "storage-gone"
    models = {
        "a": Model(partial(load_unless_flagged, str(flag), "raise"), workers=1),
        "b": Model(load_constant, workers=1),
    }
    with make_pool(models) as pool:
        flag.touch()  # a's replacements cannot load from now on
        with pytest.raises(mlpool.WorkerCrashedError):
            pool.submit("a", sigkill_self).result(timeout=30)
        waiting = pool.submit("a", add, 1)  # no worker of a can serve it: it fails once a is down
        with pytest.raises(mlpool.PoolBrokenError, match="model 'a'"):
            waiting.result(timeout=30)
        with pytest.raises(mlpool.PoolBrokenError, match="storage is gone|failed to load"):
            pool.submit("a", add, 1)
        assert pool.score("b", add, 1) == 11 and pool.healthy
