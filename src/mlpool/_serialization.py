"""Pickling of jobs, functions, results and exceptions.

Arguments and results use the standard pickle (protocol 5, fast C code) and
fall back to cloudpickle for what it cannot do (lambdas, closures, classes
defined in ``__main__``). Scoring functions always go through cloudpickle,
once per function: the parent keeps each function's pickle and an id for it
(:class:`FunctionTable`), and a worker receives the pickle only the first
time it sees that id.
"""

from __future__ import annotations

import itertools
import pickle
import threading
import traceback
import weakref
from typing import Any, Callable

import cloudpickle

from mlpool._errors import RemoteError, RemoteTraceback, SerializationError

PROTOCOL = 5

# A worker caches this many functions; the parent mirrors the cache exactly
# (both clear it at the same message), so it knows when to resend a pickle.
FUNCTION_CACHE_SIZE = 1024


def dumps(obj: Any, what: str) -> bytes:
    """Pickle ``obj``; ``what`` names it in the error ("the arguments of job 3")."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(obj, PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"{what} cannot be pickled: {type(exc).__name__}: {exc}. "
            "Everything sent to or from a worker must be picklable "
            "(no open files, sockets, locks or generators)."
        ) from exc


class FunctionTable:
    """Gives each scoring function an id and its pickle, computed once.

    Functions are held weakly where they allow it, so per-request lambdas do
    not pile up; other callables are held strongly, up to a bound.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._weak: weakref.WeakKeyDictionary[Callable, tuple[int, bytes]] = weakref.WeakKeyDictionary()
        self._strong: dict[Any, tuple[int, bytes]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def lookup(self, fn: Callable) -> tuple[int, bytes]:
        """``(fn_id, pickle)`` for ``fn``; raises SerializationError if it cannot be pickled."""
        try:
            return self._weak[fn]
        except KeyError:
            pass
        except TypeError:  # not weak-referenceable (a builtin, some C callables)
            found = self._strong.get(fn)
            if found is not None:
                return found
        try:
            data = cloudpickle.dumps(fn, PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"scoring function {fn!r} cannot be pickled: {type(exc).__name__}: {exc}"
            ) from exc
        with self._lock:
            entry = (next(self._ids), data)
            try:
                self._weak[fn] = entry
            except TypeError:
                if len(self._strong) >= FUNCTION_CACHE_SIZE:
                    self._strong.clear()
                self._strong[fn] = entry
        return entry


def pack_exception(exc: BaseException) -> tuple[bytes, str]:
    """Run in a worker: the exception as bytes the parent can load, and its traceback.

    An exception that does not survive a pickle round trip (unpicklable
    attributes, a constructor with extra required arguments) is replaced by
    a :class:`RemoteError` naming its type and message.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = pickle.dumps(exc, PROTOCOL)
        pickle.loads(data)
    except Exception:
        stand_in = RemoteError(f"{type(exc).__qualname__}: {exc}", type_name=_qualified_name(type(exc)))
        data = pickle.dumps(stand_in, PROTOCOL)
    return data, tb


def unpack_exception(data: bytes, tb: str) -> BaseException:
    """Run in the parent: the worker's exception, with its traceback as ``__cause__``."""
    try:
        exc = pickle.loads(data)
    except Exception as load_error:
        exc = RemoteError(f"an exception raised in the worker could not be unpickled: {load_error}")
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
