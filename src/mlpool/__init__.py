"""mlpool: score CPU-hungry ML models in a pool of worker processes, from sync or async code.

Each worker loads every model once; callers send jobs (a scoring function and
its arguments) and get results back through job ids, futures or coroutines.
See :class:`MLPool`.

The errors are loaded with the package; everything else on first use (PEP
562), so that a worker process, which imports ``mlpool._worker.main``, loads
no parent-side module (the pool, the engine, asyncio, integrations).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from mlpool.errors import (
    JobTimeoutError,
    MLPoolError,
    ModelLoadError,
    PoolBrokenError,
    PoolClosedError,
    PoolFullError,
    PoolMismatchError,
    RemoteError,
    RemoteTraceback,
    ResultNotReadyError,
    SerializationError,
    UnknownJobError,
    UnknownModelError,
    WorkerCrashedError,
)

if TYPE_CHECKING:
    from mlpool._api.config import Model
    from mlpool._api.pool import MLPool
    from mlpool._api.resources import usable_cpu_count
    from mlpool._api.streams import AsyncStream, Stream
    from mlpool._engine.batching import batched
    from mlpool._engine.state import PoolStats

__version__ = "0.2.0.dev0"

__all__ = [
    "AsyncStream",
    "JobTimeoutError",
    "MLPool",
    "MLPoolError",
    "Model",
    "ModelLoadError",
    "PoolBrokenError",
    "PoolClosedError",
    "PoolFullError",
    "PoolMismatchError",
    "PoolStats",
    "RemoteError",
    "RemoteTraceback",
    "ResultNotReadyError",
    "SerializationError",
    "Stream",
    "UnknownJobError",
    "UnknownModelError",
    "WorkerCrashedError",
    "batched",
    "usable_cpu_count",
]

# Loaded on first use: the name and the private module that defines it.
_LAZY = {
    "MLPool": "mlpool._api.pool",
    "Model": "mlpool._api.config",
    "PoolStats": "mlpool._engine.state",
    "Stream": "mlpool._api.streams",
    "AsyncStream": "mlpool._api.streams",
    "batched": "mlpool._engine.batching",
    "usable_cpu_count": "mlpool._api.resources",
}


def _public(obj: Any) -> Any:
    # Show the public path in reprs, docs and tracebacks (mlpool.MLPool, not
    # mlpool._api.pool.MLPool). Pickles still resolve: each private module keeps
    # its name bound, and this module finds every public name.
    if getattr(obj, "__module__", "").startswith(("mlpool._", "mlpool.errors")):
        obj.__module__ = "mlpool"
    return obj


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlpool' has no attribute {name!r}")
    value = _public(getattr(import_module(module), name))
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


for _name in __all__:
    if _name not in _LAZY:
        _public(globals()[_name])
del _name
