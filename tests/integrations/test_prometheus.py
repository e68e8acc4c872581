"""mlpool.prometheus: several pools in one registry (issue #19.19)."""

from __future__ import annotations

import pytest
from helpers.workloads import add, load_constant
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from mlpool import MLPool
from mlpool.prometheus import PoolCollector


@pytest.fixture(scope="module")
def pools():
    with MLPool({"m": load_constant}, nb_workers=1) as first, MLPool({"m": load_constant}, nb_workers=1) as second:
        assert first.score("m", add, 1) == 11
        for x in range(3):
            assert second.score("m", add, x) == 10 + x
        yield first, second


def samples(text: str, family_name: str) -> dict[tuple, float]:
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families[family_name].samples}


def test_two_pools_share_a_registry_each_family_once_one_sample_per_pool(pools):
    first, second = pools
    registry = CollectorRegistry()
    a = PoolCollector(first).register(registry)
    b = PoolCollector(second, pool_name="images").register(registry)
    text = generate_openmetrics(registry).decode()
    assert text.count("# TYPE mlpool_jobs counter") == 1
    assert text.count("# TYPE mlpool_job_latency_seconds histogram") == 1
    jobs = samples(text, "mlpool_jobs")  # the OpenMetrics parser accepts the whole output
    assert jobs[("mlpool_jobs_total", (("outcome", "completed"), ("pool", "default")))] == 1
    assert jobs[("mlpool_jobs_total", (("outcome", "completed"), ("pool", "images")))] == 3
    alive = samples(text, "mlpool_workers_alive")
    assert set(alive) == {("mlpool_workers_alive", (("pool", name),)) for name in ("default", "images")}
    assert "mlpool_workers_alive" in generate_latest(registry).decode()  # the classic text format too
    b.unregister()
    text = generate_openmetrics(registry).decode()
    assert set(samples(text, "mlpool_workers_alive")) == {("mlpool_workers_alive", (("pool", "default"),))}
    a.unregister()
    assert "mlpool_" not in generate_openmetrics(registry).decode()


def test_two_pools_register_in_the_default_registry(pools):
    first, second = pools
    a = PoolCollector(first).register()
    try:
        b = PoolCollector(second).register()  # prometheus_client raised DuplicateTimeseries here
        try:
            assert (a.pool_name, b.pool_name) == ("default", "default-2")
            text = generate_openmetrics(REGISTRY).decode()
            jobs = samples(text, "mlpool_jobs")
            completed = {
                dict(labels)["pool"]: v for (_, labels), v in jobs.items() if ("outcome", "completed") in labels
            }
            assert completed == {"default": 1, "default-2": 3}
        finally:
            b.unregister()
    finally:
        a.unregister()


def test_a_pool_name_used_twice_in_a_registry_is_refused(pools):
    first, second = pools
    registry = CollectorRegistry()
    PoolCollector(first, pool_name="iris").register(registry)
    with pytest.raises(ValueError, match="'iris' is already registered"):
        PoolCollector(second, pool_name="iris").register(registry)
    with pytest.raises(ValueError, match="pool_name"):
        PoolCollector(second, pool_name="")
