"""Prometheus metrics for a pool: its stats on every scrape, and a latency histogram.

::

    from mlpool.prometheus import PoolCollector, metrics_app
    PoolCollector(pool).register()            # into prometheus_client's default registry
    app.mount("/metrics", metrics_app())      # the ASGI app of prometheus_client

Needs the ``metrics`` extra (``pip install 'mlpool[metrics]'``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("mlpool.prometheus needs prometheus_client: pip install 'mlpool[metrics]'") from exc

from mlpool._pool import MLPool

__all__ = ["PoolCollector", "metrics_app"]

_JOB_OUTCOMES = ("completed", "failed", "crashed", "timed_out", "cancelled")


class PoolCollector:
    """A prometheus_client collector reading ``pool.stats()`` at each scrape.

    Metrics (``prefix`` defaults to ``mlpool``): ``_workers_alive``,
    ``_workers_busy``, ``_queue_depth``, ``_jobs_running``,
    ``_results_unfetched``, ``_healthy`` (gauges); ``_jobs_total`` by
    ``outcome``, ``_jobs_retried_total``, ``_worker_restarts_total``,
    ``_workers_recycled_total`` (counters); ``_job_latency_seconds``, from
    submission to outcome (histogram). ``pool`` labels every series when
    several pools share a registry.
    """

    def __init__(self, pool: MLPool, *, prefix: str = "mlpool", name: str = "default") -> None:
        self._pool = pool
        self._prefix = prefix
        self._name = name

    def register(self, registry: CollectorRegistry = REGISTRY) -> PoolCollector:
        registry.register(self)
        return self

    def collect(self) -> Iterator[Any]:
        stats = self._pool.stats()
        p, labels = self._prefix, ["pool"]
        for field, help_text in (
            ("workers_alive", "Worker processes serving jobs."),
            ("workers_busy", "Workers holding at least one job."),
            ("queue_depth", "Jobs waiting for a worker."),
            ("jobs_running", "Jobs held by workers."),
            ("results_unfetched", "Finished job-id results waiting for get_result."),
        ):
            gauge = GaugeMetricFamily(f"{p}_{field}", help_text, labels=labels)
            gauge.add_metric([self._name], getattr(stats, field))
            yield gauge
        healthy = GaugeMetricFamily(f"{p}_healthy", "1 while the pool can serve jobs.", labels=labels)
        healthy.add_metric([self._name], 1.0 if self._pool.healthy else 0.0)
        yield healthy
        jobs = CounterMetricFamily(f"{p}_jobs", "Jobs finished, by outcome.", labels=["pool", "outcome"])
        for outcome in _JOB_OUTCOMES:
            jobs.add_metric([self._name, outcome], getattr(stats, f"jobs_{outcome}"))
        yield jobs
        for field, help_text in (
            ("jobs_retried", "Crashed jobs run again."),
            ("worker_restarts", "Workers replaced after a crash, a timeout or an interrupt."),
            ("workers_recycled", "Workers replaced gracefully (max jobs or memory)."),
        ):
            counter = CounterMetricFamily(f"{p}_{field}", help_text, labels=labels)
            counter.add_metric([self._name], getattr(stats, field))
            yield counter
        histogram = HistogramMetricFamily(
            f"{p}_job_latency_seconds", "Seconds from a job's submission to its outcome.", labels=labels
        )
        histogram.add_metric(
            [self._name],
            buckets=[(_bound(bound), count) for bound, count in stats.latency_buckets],
            sum_value=stats.latency_sum,
        )
        yield histogram


def metrics_app(registry: CollectorRegistry = REGISTRY) -> Any:
    """The ASGI app serving ``registry`` in the Prometheus text format (mount it at /metrics)."""
    return make_asgi_app(registry)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
