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

import pickle
from collections.abc import Callable
from typing import Any

from mlpool._wire.serialization import unpickling_error
from mlpool.errors import SerializationError

_UNSET: Any = object()


class _Unopenable:
    """What a result that cannot be unpickled opens to: its error, raised to every reader."""

    __slots__ = ("error",)

    def __init__(self, error: SerializationError) -> None:
        self.error = error


class PickledResult:
    """A result's pickle and its out-of-band buffers (views on shared memory,
    which go back to the pool when the result is garbage)."""

    __slots__ = ("_data", "_buffers", "_job_id", "_fn_name", "_model", "_on_error", "_value")

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
        self._value = _UNSET  # the result, or _Unopenable, once opened

    def open(self) -> Any:
        """The result, unpickled at the first call in the calling thread; later
        calls return the same object. Raises SerializationError if it cannot
        be unpickled (every call, the same error).

        A KeyboardInterrupt (Ctrl-C in this thread while it unpickles) goes
        through and changes nothing: a later call unpickles it again. Two
        threads that open it at once may both unpickle; both get the object
        stored first."""
        value = self._value
        if value is _UNSET:
            data = self._data
            if data is None:  # another thread stored it between our two reads
                value = self._value
            else:
                try:
                    value = pickle.loads(data, buffers=self._buffers)
                except (Exception, SystemExit) as exc:  # the data's fault: nothing from the other side ends us
                    value = _Unopenable(unpickling_error(f"the result of job {self._job_id} ({self._fn_name})", exc))
                    if self._value is _UNSET:
                        self._on_error(self._model)
                if self._value is _UNSET:
                    self._value = value
                    self._data = self._buffers = None
                value = self._value
        if type(value) is _Unopenable:
            raise value.error
        return value


def opened(value: Any) -> Any:
    """``value``, unpickled if it is a :class:`PickledResult`."""
    return value.open() if type(value) is PickledResult else value
