"""Prometheus metrics for pools: their stats on every scrape, and a latency histogram.

::

    from mlpool.prometheus import PoolCollector, metrics_app
    PoolCollector(pool).register()                          # into prometheus_client's default registry
    PoolCollector(other, pool_name="images").register()     # a second pool: same families, its own samples
    app.add_route("/metrics", metrics_app())                # the ASGI app of prometheus_client

Several pools share a registry: each metric family is output once, with one
sample per pool, told apart by the ``pool`` label. A registry gets one
hidden collector per metric prefix, which reads every pool registered in it
(prometheus_client rejects two collectors that output the same names).

Needs prometheus_client (the ``metrics`` extra).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from mlpool.errors import missing_dependency

try:
    from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing_dependency("mlpool.prometheus", "prometheus_client", "prometheus-client>=0.20", "metrics") from exc

from mlpool._api.pool import MLPool

__all__ = ["PoolCollector", "metrics_app"]

_JOB_OUTCOMES = ("completed", "failed", "crashed", "timed_out", "cancelled")
_GAUGES = (
    ("workers_alive", "Worker processes serving jobs."),
    ("workers_busy", "Workers holding at least one job."),
    ("queue_depth", "Jobs waiting for a worker."),
    ("jobs_running", "Jobs held by workers."),
    ("results_unfetched", "Finished job-id results waiting for get_result."),
    ("saturation", "(Jobs running + jobs queued) / worker slots; 1 = every worker busy, nothing waiting."),
)
_COUNTERS = (
    ("jobs_retried", "Crashed jobs run again."),
    ("worker_restarts", "Workers replaced after a crash, a timeout or an interrupt."),
    ("workers_recycled", "Workers replaced gracefully (max jobs or memory)."),
)


class PoolCollector:
    """Exposes one pool's ``stats()`` to Prometheus, read at each scrape.

    Metrics (``prefix`` defaults to ``mlpool``): ``_workers_alive``,
    ``_workers_busy``, ``_queue_depth``, ``_jobs_running``,
    ``_results_unfetched``, ``_saturation``, ``_healthy`` (gauges); ``_jobs_total`` by
    ``outcome``, ``_jobs_retried_total``, ``_worker_restarts_total``,
    ``_workers_recycled_total`` (counters); ``_job_latency_seconds``, from
    submission to outcome (histogram). Every sample has a ``pool`` label.
    Per model, with a ``model`` label too: ``_model_saturation``, ``_model_queue_depth``,
    ``_model_workers`` (gauges), ``_model_jobs_total`` by ``outcome``
    (``completed``, ``failed``) and ``_model_job_latency_seconds`` (histogram).

    ``pool_name`` is that label's value. None: ``"default"`` for the first
    pool registered in a registry, ``"default-2"``, ``"default-3"``... for the
    next ones (stable as long as the app registers its pools in the same
    order; name them to be sure). Two pools with the same name in one
    registry raise ``ValueError``.

    A pool shared by several API processes (``share_across_processes``) adds
    ``_shared_processes`` and this process's own ``_process_jobs_total`` by
    ``outcome``, ``_process_jobs_in_flight`` and ``_process_results_unfetched``,
    labelled ``process`` (its pid). Its other series are the whole pool's,
    identical in every API process: aggregate them across processes with
    ``max by (pool)``, never ``sum`` (which would count the pool once per process).
    """

    def __init__(self, pool: MLPool, *, prefix: str = "mlpool", pool_name: str | None = None) -> None:
        if pool_name is not None and (not isinstance(pool_name, str) or not pool_name):
            raise ValueError(f"pool_name must be a non-empty str, not {pool_name!r}")
        self._pool = pool
        self._prefix = prefix
        self._requested_name = pool_name
        self._group: _RegistryPools | None = None
        self.pool_name: str | None = pool_name  # the label value, once registered

    def __repr__(self) -> str:
        return f"<PoolCollector pool={self.pool_name!r} prefix={self._prefix!r}>"

    def register(self, registry: CollectorRegistry = REGISTRY) -> PoolCollector:
        """Add this pool to ``registry``'s mlpool metrics; returns ``self``.

        Raises ``ValueError`` if it is registered already, or if another pool
        of that registry has the same ``pool_name``.
        """
        if self._group is not None:
            raise ValueError(f"{self!r} is registered already")
        group = _RegistryPools.of(registry, self._prefix)
        self.pool_name = group.add(self, self._requested_name)
        self._group = group
        return self

    def unregister(self) -> None:
        """Remove this pool's samples from its registry (the families go with the last pool)."""
        if self._group is not None:
            self._group.remove(self)
            self._group = None
            self.pool_name = self._requested_name

    def collect(self) -> Iterator[Any]:
        """This pool's metric families alone (what its registry outputs for it)."""
        return _families(self._prefix, [(self.pool_name or "default", self._pool)])


class _RegistryPools:
    """The one collector a registry holds for every pool with a given prefix."""

    _lock = threading.RLock()  # registering collects (prometheus_client reads the names): re-entered
    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _RegistryPools]] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self._registry = weakref.ref(registry)  # the registry holds this collector: no cycle back
        self._prefix = prefix
        self._pools: dict[str, PoolCollector] = {}  # pool name -> collector, in registration order

    @classmethod
    def of(cls, registry: CollectorRegistry, prefix: str) -> _RegistryPools:
        with cls._lock:
            groups = cls._by_registry.setdefault(registry, {})
            if prefix not in groups:
                groups[prefix] = cls(registry, prefix)
            return groups[prefix]

    def add(self, collector: PoolCollector, name: str | None) -> str:
        with self._lock:
            if name is None:
                name, n = "default", 1
                while name in self._pools:
                    n += 1
                    name = f"default-{n}"
            elif name in self._pools:
                raise ValueError(f"a pool named {name!r} is already registered here: give each pool its own pool_name")
            first = not self._pools
            self._pools[name] = collector
            registry = self._registry()
            if first and registry is not None:
                try:
                    registry.register(self)
                except BaseException:
                    del self._pools[name]
                    raise
            return name

    def remove(self, collector: PoolCollector) -> None:
        with self._lock:
            for name, registered in list(self._pools.items()):
                if registered is collector:
                    del self._pools[name]
            registry = self._registry()
            if not self._pools and registry is not None:
                registry.unregister(self)
                self._by_registry.get(registry, {}).pop(self._prefix, None)

    def collect(self) -> Iterator[Any]:
        with self._lock:
            pools = [(name, collector._pool) for name, collector in self._pools.items()]
        return _families(self._prefix, pools)


def _families(p: str, pools: list[tuple[str, MLPool]]) -> Iterator[Any]:
    """Each metric family once, with one sample per ``(name, pool)``."""
    snapshots = [(name, pool.stats(), pool.healthy) for name, pool in pools]
    for field, help_text in _GAUGES:
        gauge = GaugeMetricFamily(f"{p}_{field}", help_text, labels=["pool"])
        for name, stats, _ in snapshots:
            gauge.add_metric([name], getattr(stats, field))
        yield gauge
    healthy = GaugeMetricFamily(f"{p}_healthy", "1 while the pool can serve jobs.", labels=["pool"])
    for name, _, is_healthy in snapshots:
        healthy.add_metric([name], 1.0 if is_healthy else 0.0)
    yield healthy
    jobs = CounterMetricFamily(f"{p}_jobs", "Jobs finished, by outcome.", labels=["pool", "outcome"])
    for name, stats, _ in snapshots:
        for outcome in _JOB_OUTCOMES:
            jobs.add_metric([name, outcome], getattr(stats, f"jobs_{outcome}"))
    yield jobs
    for field, help_text in _COUNTERS:
        counter = CounterMetricFamily(f"{p}_{field}", help_text, labels=["pool"])
        for name, stats, _ in snapshots:
            counter.add_metric([name], getattr(stats, field))
        yield counter
    histogram = HistogramMetricFamily(
        f"{p}_job_latency_seconds", "Seconds from a job's submission to its outcome.", labels=["pool"]
    )
    for name, stats, _ in snapshots:
        buckets = [(_bound(bound), count) for bound, count in stats.latency_buckets]
        histogram.add_metric([name], buckets=buckets, sum_value=stats.latency_sum)
    yield histogram
    yield from _model_families(p, snapshots)
    yield from _process_families(p, [(name, stats.process) for name, stats, _ in snapshots if stats.process])


def _process_families(p: str, processes: list[tuple[str, Any]]) -> Iterator[Any]:
    """A shared pool's (``share_across_processes``): this API process's own
    series, labelled ``process`` (its pid), and how many processes share the
    pool. The pool's other series are the whole pool's, the same in every
    process: aggregate those with ``max by (pool)``, these with ``sum``."""
    if not processes:
        return
    labels = ["pool", "process"]
    shared = GaugeMetricFamily(f"{p}_shared_processes", "API processes attached to the shared pool.", labels=["pool"])
    in_flight = GaugeMetricFamily(
        f"{p}_process_jobs_in_flight", "This API process's jobs sent to the pool host, not answered.", labels=labels
    )
    unfetched = GaugeMetricFamily(
        f"{p}_process_results_unfetched", "This API process's job-id results waiting for get_result.", labels=labels
    )
    jobs = CounterMetricFamily(
        f"{p}_process_jobs", "This API process's jobs, by outcome (submitted: every one).", labels=[*labels, "outcome"]
    )
    for name, process in processes:
        pid = str(process.pid)
        shared.add_metric([name], process.processes)
        in_flight.add_metric([name, pid], process.jobs_in_flight)
        unfetched.add_metric([name, pid], process.results_unfetched)
        for outcome in ("submitted", "completed", "failed", "cancelled"):
            jobs.add_metric([name, pid, outcome], getattr(process, f"jobs_{outcome}"))
    yield from (shared, in_flight, unfetched, jobs)


def _model_families(p: str, snapshots: list[tuple[str, Any, bool]]) -> Iterator[Any]:
    """The per-model series, labelled ``pool`` and ``model``."""
    labels = ["pool", "model"]
    models = [(name, model, figures) for name, stats, _ in snapshots for model, figures in stats.models.items()]
    for field, help_text in (
        ("queue_depth", "Jobs of the model waiting for a worker."),
        ("workers", "Workers alive that load the model."),
        ("saturation", "(The model's jobs running + queued) / its group's worker slots."),
        ("version", "The model's version: 1 at start, one more per reload_models of it."),
    ):
        gauge = GaugeMetricFamily(f"{p}_model_{field}", help_text, labels=labels)
        for name, model, figures in models:
            gauge.add_metric([name, model], getattr(figures, field))
        yield gauge
    by_version = GaugeMetricFamily(
        f"{p}_model_version_workers", "Workers alive that serve each version of the model (two while a reload rolls).",
        labels=[*labels, "version"],
    )  # fmt: skip
    for name, model, figures in models:
        for version, count in sorted(figures.workers_by_version.items()):
            by_version.add_metric([name, model, str(version)], count)
    yield by_version
    jobs = CounterMetricFamily(f"{p}_model_jobs", "The model's jobs finished, by outcome.", labels=[*labels, "outcome"])
    for name, model, figures in models:
        jobs.add_metric([name, model, "completed"], figures.jobs_completed)
        jobs.add_metric([name, model, "failed"], figures.jobs_failed)
    yield jobs
    histogram = HistogramMetricFamily(
        f"{p}_model_job_latency_seconds", "Seconds from a job of the model's submission to its outcome.", labels=labels
    )
    for name, model, figures in models:
        buckets = [(_bound(bound), count) for bound, count in figures.latency_buckets]
        histogram.add_metric([name, model], buckets=buckets, sum_value=figures.latency_sum)
    yield histogram


def metrics_app(registry: CollectorRegistry = REGISTRY) -> Any:
    """The ASGI app serving ``registry`` in the Prometheus text format (or
    OpenMetrics, if the scraper asks). Route it at an exact path,
    ``app.add_route("/metrics", metrics_app())``: ``app.mount`` answers
    ``/metrics`` with a redirect to ``/metrics/``."""
    return _AsgiApp(make_asgi_app(registry))


class _AsgiApp:
    """An ASGI callable that is not a function: Starlette's ``Route`` calls a
    plain function as a request handler, an object as an ASGI app."""

    __slots__ = ("_app",)

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
