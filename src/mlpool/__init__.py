"""mlpool: score CPU-hungry ML models in a pool of worker processes, from sync or async code.

Each worker loads every model once; callers send jobs (a scoring function and
its arguments) and get results back through job ids, futures or coroutines.
See :class:`MLPool`.
"""

from mlpool._batching import batched
from mlpool._errors import (
    JobTimeoutError,
    MLPoolError,
    ModelLoadError,
    PoolBrokenError,
    PoolClosedError,
    PoolFullError,
    RemoteError,
    RemoteTraceback,
    ResultNotReadyError,
    SerializationError,
    UnknownJobError,
    UnknownModelError,
    WorkerCrashedError,
)
from mlpool._state import PoolStats
from mlpool._pool import MLPool
from mlpool._resources import usable_cpu_count

__version__ = "0.2.0.dev0"

__all__ = [
    "JobTimeoutError",
    "MLPool",
    "MLPoolError",
    "ModelLoadError",
    "PoolBrokenError",
    "PoolClosedError",
    "PoolFullError",
    "PoolStats",
    "RemoteError",
    "RemoteTraceback",
    "ResultNotReadyError",
    "SerializationError",
    "UnknownJobError",
    "UnknownModelError",
    "WorkerCrashedError",
    "batched",
    "usable_cpu_count",
]

# Show the public path in reprs, docs and tracebacks (mlpool.MLPool, not
# mlpool._pool.MLPool). Pickles of these errors still resolve: each private
# module keeps its name bound.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("mlpool._"):
        _obj.__module__ = "mlpool"
del _name, _obj
