"""A job's result as its worker sent it, unpickled by the caller who asks for it.

The thread that reads a worker's pipe settles the jobs of many callers (the
manager thread reads for every blocking caller). It maps the result's shared
memory, which runs no user code, and hands each caller a
:class:`PickledResult`; the caller's own thread unpickles it when it asks:
``JobFuture.result()``, the coroutine awaiting ``score_async``,
``get_result``. A slow ``__setstate__``, or one that calls the pool, then
stalls that caller and nobody else.

A worker's exception is unpickled when it is delivered (``_engine.outcomes``):
it is small, and ``concurrent.futures.wait(return_when=FIRST_EXCEPTION)``
must see it as an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlpool._wire.serialization import loads
from mlpool.errors import SerializationError

_UNSET: Any = object()


class PickledResult:
    """A result's pickle and its out-of-band buffers (views on shared memory,
    which go back to the pool when the result is garbage)."""

    __slots__ = ("_data", "_buffers", "_job_id", "_fn_name", "_model", "_on_error", "_value", "_error")

    def __init__(
        self, data: bytes, buffers: list[memoryview] | None, job_id: int, fn_name: str, model: str,
        on_error: Callable[[str], None],
    ) -> None:  # fmt: skip
        """``on_error(model)`` is called once if it cannot be unpickled (the
        job counts as failed instead of completed)."""
        self._data: bytes | None = data
        self._buffers = buffers
        self._job_id = job_id
        self._fn_name = fn_name
        self._model = model
        self._on_error = on_error
        self._value = _UNSET
        self._error: SerializationError | None = None

    def open(self) -> Any:
        """The result, unpickled at the first call in the calling thread; later
        calls return the same object. Raises SerializationError if it cannot
        be unpickled (every call, the same error).

        Two threads that open it at once may both unpickle; both get the
        object stored first."""
        if self._value is not _UNSET:
            return self._value
        data, buffers = self._data, self._buffers
        if data is not None:
            try:
                value = loads(data, f"the result of job {self._job_id} ({self._fn_name})", buffers)
            except SerializationError as exc:
                if self._error is None and self._value is _UNSET:
                    self._error = exc
                    self._data = self._buffers = None
                    self._on_error(self._model)
            else:
                if self._value is _UNSET:
                    self._value = value
                    self._data = self._buffers = None
                return self._value
        if self._error is not None:
            raise self._error
        return self._value


def opened(value: Any) -> Any:
    """``value``, unpickled if it is a :class:`PickledResult`."""
    return value.open() if type(value) is PickledResult else value
