"""PoolStats.saturation and the mlpool_saturation gauge (#18)."""

from __future__ import annotations

import pytest
from helpers import workloads
from helpers.pools import make_pool
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from mlpool import MLPool
from mlpool.prometheus import PoolCollector

pytestmark = pytest.mark.usefixtures("worker_mode")


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool(models_to_load={"m": workloads.load_constant}, nb_workers=2) as pool:
        yield pool


def _gauge(pool: MLPool) -> float:
    registry = CollectorRegistry()
    PoolCollector(pool).register(registry)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    (sample,) = families["mlpool_saturation"].samples
    return sample.value


def test_saturation_is_zero_when_idle(pool):
    assert pool.score("m", workloads.add, 1) == 11
    assert pool.stats().saturation == 0.0
    assert _gauge(pool) == 0.0


def test_saturation_counts_running_and_queued_jobs_per_worker_slot(pool, fifo):
    gates = [fifo() for _ in range(5)]
    futures = [pool.submit("m", workloads.wait_for_release, str(gate)) for gate in gates[:2]]
    for gate in gates[:2]:
        gate.wait_running()
    assert pool.stats().saturation == 1.0  # both workers busy, nothing waits
    futures += [pool.submit("m", workloads.wait_for_release, str(gate)) for gate in gates[2:]]
    stats = pool.stats()
    assert stats.jobs_running + stats.queue_depth == 5
    assert stats.saturation == 2.5
    assert _gauge(pool) == 2.5
    for gate in gates[:2]:
        gate.release_opened()
    for gate in gates[2:]:
        gate.release()
    for future in futures:
        future.result(timeout=30)
    assert pool.stats().saturation == 0.0


def test_inline_pool_reports_zero():
    with MLPool(models_to_load={"m": workloads.load_constant}, nb_workers=0) as pool:
        assert pool.score("m", workloads.add, 1) == 11
        assert pool.stats().saturation == 0.0


def test_saturation_per_model_is_over_its_own_groups_slots(fifo, worker_mode):
    from mlpool import Model

    models = {"shared": workloads.load_constant, "own": Model(workloads.load_constant, workers=1)}
    with make_pool(models_to_load=models, nb_workers=2) as pool:
        gates = [fifo() for _ in range(3)]
        futures = [pool.submit("own", workloads.wait_for_release, str(gate)) for gate in gates]
        gates[0].wait_running()
        stats = pool.stats()
        assert stats.models["own"].saturation == 3.0  # one running, two queued, on its one worker
        assert stats.models["shared"].saturation == 0.0
        assert stats.saturation == 1.0  # three jobs over the pool's three workers
        gates[0].release_opened()
        for gate in gates[1:]:
            gate.release()
        for future in futures:
            future.result(timeout=30)
        assert pool.stats().models["own"].saturation == 0.0
