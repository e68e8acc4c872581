"""The pool's settings: validated once, frozen, defaults resolved at construction."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from mlpool._resources import usable_cpu_count

DEFAULT_MAX_QUEUE_SIZE = 10_000
START_METHODS = ("spawn", "forkserver")
BACKENDS = ("local", "ray")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Every knob of a pool, as the constructor documents them.

    Build it with :meth:`resolve`, which fills in the machine-dependent
    defaults and rejects nonsense with a ``ValueError`` naming the field.
    """

    nb_workers: int
    threads_per_worker: int
    result_ttl: float
    max_queue_size: int
    job_timeout: float | None
    max_retries: int
    max_jobs_per_worker: int | None
    max_memory_per_worker: int | None
    share_models: bool
    start_method: str
    start_timeout: float
    worker_nice: int
    shared_memory_threshold: int | None
    shared_memory_limit: int | None
    backend: str = "local"
    ray_address: str | None = None
    ray_options: tuple[tuple[str, object], ...] = ()  # extra actor options, as items
    fork_with_threads: bool = False  # share_models: fork although loaders left threads running
    stream_buffer: int = 16  # items a stream's worker may run ahead of its consumer (#17)
    stream_buffer_bytes: int = 8 * 2**20  # and bytes (at least one item)

    @classmethod
    def resolve(
        cls,
        *,
        nb_workers: int | None,
        threads_per_worker: int | None,
        result_ttl: float,
        max_queue_size: int | None,
        job_timeout: float | None,
        max_retries: int,
        max_jobs_per_worker: int | None,
        max_memory_per_worker: int | None,
        start_method: str | None,
        share_models: bool = False,
        fork_with_threads: bool = False,
        start_timeout: float,
        worker_nice: int = 0,
        shared_memory_threshold: int | None = 65536,
        shared_memory_limit: int | None = None,
        backend: str = "local",
        ray_address: str | None = None,
        ray_options: dict | None = None,
        stream_buffer: int = 16,
        stream_buffer_bytes: int = 8 * 2**20,
    ) -> PoolConfig:
        cores = usable_cpu_count()
        if nb_workers is None:
            nb_workers = max(1, cores - 1)  # leave one core to the API process
        _check_int("nb_workers", nb_workers, minimum=0)
        if threads_per_worker is None:
            threads_per_worker = max(1, cores // max(1, nb_workers))
        _check_int("threads_per_worker", threads_per_worker, minimum=1)
        _check_positive("result_ttl", result_ttl)
        if max_queue_size is None:
            max_queue_size = DEFAULT_MAX_QUEUE_SIZE
        _check_int("max_queue_size", max_queue_size, minimum=1)
        if job_timeout is not None:
            _check_positive("job_timeout", job_timeout)
        _check_int("max_retries", max_retries, minimum=0)
        if max_jobs_per_worker is not None:
            _check_int("max_jobs_per_worker", max_jobs_per_worker, minimum=1)
        if max_memory_per_worker is not None:
            _check_int("max_memory_per_worker", max_memory_per_worker, minimum=1)
        if not isinstance(share_models, bool):
            raise TypeError(f"share_models must be a bool, not {type(share_models).__name__}")
        if not isinstance(fork_with_threads, bool):
            raise TypeError(f"fork_with_threads must be a bool, not {type(fork_with_threads).__name__}")
        if share_models and not hasattr(os, "fork"):
            raise ValueError(f"share_models=True forks workers from a template process; {sys.platform} cannot fork")
        start_method = start_method or "spawn"
        if start_method not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {START_METHODS}, not {start_method!r}: a plain fork "
                "copies the parent's threads and locks into the workers"
            )
        _check_positive("start_timeout", start_timeout)
        _check_int("worker_nice", worker_nice, minimum=0)
        if worker_nice > 19:
            raise ValueError(f"worker_nice must be between 0 and 19, got {worker_nice}")
        if shared_memory_threshold is not None:
            _check_int("shared_memory_threshold", shared_memory_threshold, minimum=1)
        if shared_memory_limit is not None:
            _check_int("shared_memory_limit", shared_memory_limit, minimum=0)
        _check_int("stream_buffer", stream_buffer, minimum=1)
        _check_int("stream_buffer_bytes", stream_buffer_bytes, minimum=1)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if backend == "local" and (ray_address is not None or ray_options):
            raise ValueError('ray_address and ray_options need backend="ray"')
        if backend == "ray":
            if share_models:
                raise ValueError('share_models forks local processes; it does not apply to backend="ray"')
            if ray_address is not None and not isinstance(ray_address, str):
                raise TypeError(f"ray_address must be a str, not {type(ray_address).__name__}")
            if ray_options is not None and not isinstance(ray_options, dict):
                raise TypeError(f"ray_options must be a dict of actor options, not {type(ray_options).__name__}")
        return cls(
            nb_workers=nb_workers,
            threads_per_worker=threads_per_worker,
            result_ttl=float(result_ttl),
            max_queue_size=max_queue_size,
            job_timeout=None if job_timeout is None else float(job_timeout),
            max_retries=max_retries,
            max_jobs_per_worker=max_jobs_per_worker,
            max_memory_per_worker=max_memory_per_worker,
            share_models=share_models,
            start_method=start_method,
            start_timeout=float(start_timeout),
            worker_nice=worker_nice,
            shared_memory_threshold=shared_memory_threshold,
            shared_memory_limit=shared_memory_limit,
            backend=backend,
            ray_address=ray_address,
            ray_options=tuple((ray_options or {}).items()),
            fork_with_threads=fork_with_threads,
            stream_buffer=stream_buffer,
            stream_buffer_bytes=stream_buffer_bytes,
        )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value}")
