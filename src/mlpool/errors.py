"""Every error mlpool raises, under one root.

::

    MLPoolError
     ├── ModelLoadError            a loader raised (or returned None) while the pool started
     ├── UnknownModelError         (also ValueError) a job named a model the pool does not serve
     ├── UnknownJobError           (also KeyError) a job id never existed, was fetched, cancelled or expired
     ├── ResultNotReadyError       get_result(wait_if_unavailable=False) on an unfinished job
     ├── PoolFullError             the queue is full and the caller asked not to wait
     ├── PoolClosedError           the pool was shut down (or is shutting down)
     ├── PoolBrokenError           workers cannot be kept alive; the pool refuses work
     ├── PoolMismatchError         (also ValueError) share_across_processes: another pool with
     │                             other settings is shared under this name
     ├── WorkerCrashedError        the worker running the job died
     ├── JobTimeoutError           (also TimeoutError) the job passed its deadline
     ├── SerializationError        arguments, a function or a result could not be pickled
     └── RemoteError               a scoring function raised an exception that could not
                                   be sent back as itself

A scoring function's own exception is not wrapped: it is re-raised in the caller
as itself, with the worker's traceback attached as ``__cause__`` (a
:class:`RemoteTraceback`), as :mod:`concurrent.futures` does.
"""

from __future__ import annotations

import pickle

__all__ = [
    "JobTimeoutError",
    "MLPoolError",
    "ModelLoadError",
    "PoolBrokenError",
    "PoolClosedError",
    "PoolFullError",
    "PoolMismatchError",
    "RemoteError",
    "RemoteTraceback",
    "ResultNotReadyError",
    "SerializationError",
    "UnknownJobError",
    "UnknownModelError",
    "WorkerCrashedError",
]


class MLPoolError(Exception):
    """Root of every error raised by mlpool itself."""


class ModelLoadError(MLPoolError):
    """Raised by the constructor when a worker's loader raised or returned None.

    ``model_name`` names the model, ``remote_traceback`` holds the worker's
    formatted traceback (also in the message).
    """

    def __init__(self, message: str, *, model_name: str | None = None, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.model_name = model_name
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # keyword-only fields survive pickling
        return (_rebuild, (type(self), self.args, self.__dict__))


class PoolMismatchError(MLPoolError, ValueError):
    """Raised by ``MLPool(..., share_across_processes=...)`` when the pool
    shared under that name has other models or other settings; the message
    names each setting that differs."""


class UnknownModelError(MLPoolError, ValueError):
    """Raised at submission when ``model_name`` is not one the pool loaded.

    ``model_name`` is the name asked for (None if unknown).
    """

    def __init__(self, message: str, *, model_name: object = None) -> None:
        super().__init__(message)
        self.model_name = model_name

    def __reduce__(self):  # keyword-only fields survive pickling
        return (_rebuild, (type(self), self.args, self.__dict__))


class UnknownJobError(MLPoolError, KeyError):
    """Raised for a job id that never existed, was already fetched, was cancelled or expired."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ResultNotReadyError(MLPoolError):
    """Raised by ``get_result(..., wait_if_unavailable=False)`` while the job is unfinished."""


class PoolFullError(MLPoolError):
    """Raised by ``create_job(..., block_until_scheduled=False)`` when the queue is full."""


class PoolClosedError(MLPoolError):
    """Raised when a job is submitted to a pool that is shutting down or shut down,
    and given to queued jobs that a shutdown cancelled or could not finish."""


class PoolBrokenError(MLPoolError):
    """Raised when the pool cannot keep workers alive (a loader failing on restart,
    a crash loop); the pool then refuses every job and ``pool.healthy`` is False."""


class WorkerCrashedError(MLPoolError):
    """Raised for a job whose worker died while holding it.

    ``worker_id``, ``pid`` and ``exitcode`` (negative: the signal number) say
    which worker and how it died.
    """

    def __init__(
        self, message: str, *, worker_id: int = -1, pid: int | None = None, exitcode: int | None = None
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class JobTimeoutError(MLPoolError, TimeoutError):
    """Raised for a job that passed its deadline, queued (it never ran) or running
    (its worker was killed and replaced). ``while_running`` says which;
    ``waiting_for_room`` says the deadline passed while the caller waited for
    room in a full queue (the job was never queued: the pool is overloaded)."""

    def __init__(self, message: str, *, while_running: bool = False, waiting_for_room: bool = False) -> None:
        super().__init__(message)
        self.while_running = while_running
        self.waiting_for_room = waiting_for_room

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class SerializationError(MLPoolError, pickle.PicklingError):
    """Raised when a job's arguments, its function or its result cannot be pickled
    (or unpickled on the other side). The message says which and why."""


class RemoteError(MLPoolError):
    """Stands in for a scoring function's exception that could not be pickled.

    ``type_name`` is the qualified name of the original exception type; the
    worker's traceback is attached as ``__cause__``.
    """

    def __init__(self, message: str, *, type_name: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _rebuild(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


def missing_dependency(feature: str, package: str, requirement: str, extra: str) -> ImportError:
    """The error for ``feature`` used without the optional ``package``. It names
    the package to install, not ``mlpool[extra]``: that name on the package
    index is another library (the original mlpool 0.1.0)."""
    return ImportError(
        f'{feature} needs {package}, which is not installed: pip install "{requirement}" '
        f'(or install mlpool with its "{extra}" extra)'
    )


def ray_missing() -> ImportError:
    """``backend="ray"`` without Ray (raised at construction)."""
    return missing_dependency('backend="ray"', "Ray", "ray>=2.40", "ray")
