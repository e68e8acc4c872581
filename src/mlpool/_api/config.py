"""The pool's settings: validated once, frozen, defaults resolved at construction.

``models_to_load`` values are loaders or :class:`Model`; :meth:`PoolConfig.resolve`
turns them into worker groups (``GroupConfig``: the shared workers, named "",
and one group per model with ``workers``) and per-model settings
(``ModelSettings``), every unset setting falling back to the pool's.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from mlpool._api.resources import usable_cpu_count
from mlpool.errors import ray_missing

DEFAULT_MAX_QUEUE_SIZE = 10_000
START_METHODS = ("spawn", "forkserver")
BACKENDS = ("local", "ray")

# A worker's environment: a dict, or a callable of the worker's index in its group returning one.
WorkerEnv = dict[str, str] | Callable[[int], dict[str, str]]
# Settings of a worker group; a Model without ``workers`` may not set them.
GROUP_SETTINGS = (
    "threads_per_worker", "share_models", "max_jobs_per_worker", "max_memory_per_worker", "worker_env", "ray_options",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Model:
    """A model of ``models_to_load`` with settings of its own (a plain loader takes the pool's).

    With ``workers=N`` the model gets a group of N worker processes that
    load only it (the shared workers do not load it), with the group
    settings ``threads_per_worker``, ``share_models`` (a template per
    group), ``max_jobs_per_worker``, ``max_memory_per_worker``,
    ``worker_env`` and ``ray_options``. Without ``workers`` the model is
    loaded by the shared workers and may set only the per-model settings:
    ``max_queue_size`` (its jobs waiting at most; a full model refuses with
    :class:`PoolFullError` while the others take jobs), ``job_timeout`` and
    ``max_retries`` (defaults of its jobs). None: the pool's setting.

    ``worker_env``: a dict, or a callable taking the worker's index in its
    group (0..workers-1; a replacement gets the index of the worker it
    replaces) and returning a dict; set in the worker's environment before
    its loaders run: ``worker_env=lambda i: {"CUDA_VISIBLE_DEVICES": str(i % 2)}``.
    A callable is called for each index when the pool is built, to check it.

    Settings are checked when the pool is built (errors name the model and
    the setting); the loader must be callable (TypeError here).
    """

    loader: Callable[[], Any]
    _: KW_ONLY
    workers: int | None = None
    threads_per_worker: int | None = None
    share_models: bool | None = None
    max_queue_size: int | None = None
    job_timeout: float | None = None
    max_retries: int | None = None
    max_jobs_per_worker: int | None = None
    max_memory_per_worker: int | None = None
    worker_env: WorkerEnv | None = None
    ray_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not callable(self.loader):
            raise TypeError(f"Model's loader must be callable, got {type(self.loader).__name__}")


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """A group of workers that load the same models: "" (the shared workers,
    every plain model) or a model's own group (its name)."""

    name: str
    models: tuple[str, ...]
    workers: int
    threads_per_worker: int
    share_models: bool
    max_jobs_per_worker: int | None
    max_memory_per_worker: int | None
    worker_env: WorkerEnv | None
    ray_options: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """One model's group and the settings of its jobs, resolved."""

    group: str
    max_queue_size: int
    job_timeout: float | None
    max_retries: int


def loaders_of(models_to_load: Mapping[str, Any]) -> dict[str, Callable[[], Any]]:
    """``{name: loader}``, a :class:`Model`'s loader unwrapped."""
    return {name: value.loader if isinstance(value, Model) else value for name, value in models_to_load.items()}


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
    shared_memory_cache: int = 256 * 2**20  # idle shared memory kept for reuse, bytes
    backend: str = "local"
    ray_address: str | None = None
    ray_options: tuple[tuple[str, object], ...] = ()  # extra actor options, as items
    fork_with_threads: bool = False  # share_models: fork although loaders left threads running
    inline: bool = False  # nb_workers=0: jobs run in the calling thread (see _inline)
    groups: tuple[GroupConfig, ...] = ()  # the worker groups: the shared one ("") first, if any
    model_settings: Mapping[str, ModelSettings] = field(default_factory=dict)  # model name -> its settings

    def model_groups(self) -> dict[str, str]:
        """Model name -> the name of the group whose workers load it."""
        return {name: settings.group for name, settings in self.model_settings.items()}
    stream_buffer: int = 16  # items a stream's worker may run ahead of its consumer
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
        shared_memory_cache: int = 256 * 2**20,
        backend: str = "local",
        ray_address: str | None = None,
        ray_options: dict | None = None,
        models_to_load: Mapping[str, Any] | None = None,
        worker_env: WorkerEnv | None = None,
        stream_buffer: int = 16,
        stream_buffer_bytes: int = 8 * 2**20,
    ) -> PoolConfig:
        """Validate every setting and fill in the defaults. ``models_to_load``
        (loaders or :class:`Model`) gives the groups; None: one model-less
        shared group (for tests of the settings alone)."""
        cores = usable_cpu_count()
        models = dict(models_to_load or {})
        own = {name: m for name, m in models.items() if isinstance(m, Model) and m.workers is not None}
        for name, model in own.items():
            _check_int(f"model {name!r}: workers", model.workers, minimum=1)
        dedicated = sum(m.workers for m in own.values())  # type: ignore[misc]
        plain = not models or len(own) < len(models)
        inline = nb_workers == 0
        if nb_workers is None:
            # The usable cores less one for the API process, less the dedicated
            # workers: the default never asks for more processes than cores.
            nb_workers = max(1, cores - 1 - dedicated) if plain else 0
        _check_int("nb_workers", nb_workers, minimum=0)
        if nb_workers and not plain:
            raise ValueError(
                f"nb_workers={nb_workers} counts the shared workers, and no model uses them (every model has its "
                "own workers): leave nb_workers=None"
            )
        if threads_per_worker is None:
            threads_per_worker = max(1, cores // max(1, nb_workers + dedicated))
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
        _check_int("shared_memory_cache", shared_memory_cache, minimum=0)
        _check_int("stream_buffer", stream_buffer, minimum=1)
        _check_int("stream_buffer_bytes", stream_buffer_bytes, minimum=1)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if backend == "local" and (ray_address is not None or ray_options):
            raise ValueError('ray_address and ray_options need backend="ray"')
        if backend == "ray":
            if importlib.util.find_spec("ray") is None:
                raise ray_missing()
            if share_models:
                raise ValueError('share_models forks local processes; it does not apply to backend="ray"')
            if ray_address is not None and not isinstance(ray_address, str):
                raise TypeError(f"ray_address must be a str, not {type(ray_address).__name__}")
            if ray_options is not None and not isinstance(ray_options, dict):
                raise TypeError(f"ray_options must be a dict of actor options, not {type(ray_options).__name__}")
        if worker_env is not None:
            if not (nb_workers or inline):
                raise ValueError(
                    "worker_env applies to the shared workers, and this pool has none (every model has its own "
                    "workers): give each Model its worker_env"
                )
            _check_worker_env("worker_env", worker_env, max(1, nb_workers))
        pool = {
            "threads_per_worker": threads_per_worker, "share_models": share_models,
            "max_jobs_per_worker": max_jobs_per_worker, "max_memory_per_worker": max_memory_per_worker,
            "max_queue_size": max_queue_size, "job_timeout": job_timeout, "max_retries": max_retries,
        }  # fmt: skip
        groups, settings = _resolve_models(models, pool, nb_workers, backend, worker_env, ray_options)
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
            shared_memory_cache=shared_memory_cache,
            backend=backend,
            ray_address=ray_address,
            ray_options=tuple((ray_options or {}).items()),
            fork_with_threads=fork_with_threads,
            inline=inline,
            groups=groups,
            model_settings=settings,
            stream_buffer=stream_buffer,
            stream_buffer_bytes=stream_buffer_bytes,
        )


def _resolve_models(
    models: dict[str, Any],
    pool: dict[str, Any],
    nb_workers: int,
    backend: str,
    worker_env: WorkerEnv | None,
    ray_options: dict | None,
) -> tuple[tuple[GroupConfig, ...], dict[str, ModelSettings]]:
    """The worker groups and each model's settings (pool settings already checked)."""
    shared = tuple(name for name, m in models.items() if not (isinstance(m, Model) and m.workers is not None))
    groups: list[GroupConfig] = []
    if shared and nb_workers:
        groups.append(
            GroupConfig(
                "",
                shared,
                nb_workers,
                pool["threads_per_worker"],
                pool["share_models"],
                pool["max_jobs_per_worker"],
                pool["max_memory_per_worker"],
                worker_env,
                dict(ray_options) if ray_options else None,
            )  # fmt: skip
        )
    settings: dict[str, ModelSettings] = {}
    for name, model in models.items():
        if not isinstance(model, Model):
            settings[name] = ModelSettings("", pool["max_queue_size"], pool["job_timeout"], pool["max_retries"])
            continue
        settings[name] = _model_settings(name, model, pool)
        if model.workers is None:
            for setting in GROUP_SETTINGS:
                if getattr(model, setting) is not None:
                    raise ValueError(
                        f"model {name!r}: {setting} is a setting of a worker group and applies only with "
                        f"workers=N (without workers, the model is loaded by the shared workers)"
                    )
            continue
        groups.append(_group(name, model, pool, backend))
    return tuple(groups), settings


def _model_settings(name: str, model: Model, pool: dict[str, Any]) -> ModelSettings:
    what = f"model {name!r}:"
    if model.max_queue_size is not None:
        _check_int(f"{what} max_queue_size", model.max_queue_size, minimum=1)
    if model.job_timeout is not None:
        _check_positive(f"{what} job_timeout", model.job_timeout)
    if model.max_retries is not None:
        _check_int(f"{what} max_retries", model.max_retries, minimum=0)
    return ModelSettings(
        name if model.workers is not None else "",
        pool["max_queue_size"] if model.max_queue_size is None else model.max_queue_size,
        pool["job_timeout"] if model.job_timeout is None else float(model.job_timeout),
        pool["max_retries"] if model.max_retries is None else model.max_retries,
    )


def _group(name: str, model: Model, pool: dict[str, Any], backend: str) -> GroupConfig:
    """The group of a model with ``workers``, its unset settings the pool's."""
    what = f"model {name!r}:"
    workers: int = model.workers  # type: ignore[assignment]  # checked by resolve
    if model.threads_per_worker is not None:
        _check_int(f"{what} threads_per_worker", model.threads_per_worker, minimum=1)
    if model.share_models is not None:
        if not isinstance(model.share_models, bool):
            raise TypeError(f"{what} share_models must be a bool, not {type(model.share_models).__name__}")
        if model.share_models and backend == "ray":
            raise ValueError(f'{what} share_models forks local processes; it does not apply to backend="ray"')
        if model.share_models and not hasattr(os, "fork"):
            raise ValueError(
                f"{what} share_models=True forks workers from a template process; {sys.platform} cannot fork"
            )
    if model.max_jobs_per_worker is not None:
        _check_int(f"{what} max_jobs_per_worker", model.max_jobs_per_worker, minimum=1)
    if model.max_memory_per_worker is not None:
        _check_int(f"{what} max_memory_per_worker", model.max_memory_per_worker, minimum=1)
    if model.worker_env is not None:
        _check_worker_env(f"model {name!r}: worker_env", model.worker_env, workers)
    if model.ray_options is not None:
        if backend != "ray":
            raise ValueError(f'{what} ray_options needs backend="ray"')
        if not isinstance(model.ray_options, dict):
            raise TypeError(
                f"{what} ray_options must be a dict of actor options, not {type(model.ray_options).__name__}"
            )
    return GroupConfig(
        name, (name,), workers,
        pool["threads_per_worker"] if model.threads_per_worker is None else model.threads_per_worker,
        pool["share_models"] if model.share_models is None else model.share_models,
        pool["max_jobs_per_worker"] if model.max_jobs_per_worker is None else model.max_jobs_per_worker,
        pool["max_memory_per_worker"] if model.max_memory_per_worker is None else model.max_memory_per_worker,
        model.worker_env, None if model.ray_options is None else dict(model.ray_options),
    )  # fmt: skip


def _check_worker_env(what: str, env: object, workers: int) -> None:
    """A dict of str to str, or a callable returning one for each index 0..workers-1 (called now)."""
    if isinstance(env, dict):
        _check_env_dict(what, env)
        return
    if not callable(env):
        raise TypeError(
            f"{what} must be a dict of str to str, or a callable of the worker's index, not {type(env).__name__}"
        )
    for index in range(workers):
        try:
            made = env(index)
        except Exception as exc:
            raise ValueError(f"{what} raised {type(exc).__name__}: {exc} for worker index {index}") from exc
        if not isinstance(made, dict):
            raise TypeError(
                f"{what} must return a dict of str to str, got {type(made).__name__} for worker index {index}"
            )
        _check_env_dict(f"{what} (index {index})", made)


def _check_env_dict(what: str, env: dict) -> None:
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{what} must map str to str, got {key!r}: {value!r}")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"{what}: {key!r} cannot be an environment variable name (empty, '=' or NUL in it)")


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
