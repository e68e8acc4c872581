"""Pickling of jobs, functions, results and exceptions.

Arguments and results use the standard pickle (protocol 5, fast C code) and
fall back to cloudpickle for what it cannot do (lambdas, closures, classes
defined in ``__main__``). Scoring functions and loaders always go through
cloudpickle, so those defined in ``__main__`` (``python -c``, a notebook, a
REPL) or locally travel by value. The parent keeps each scoring function's
pickle and an id for it (:class:`FunctionTable`), and a worker receives the
pickle only the first time it sees that id.

Exceptions cross the other way as values (:func:`pack_exception` in the
worker, :func:`unpack_exception` in the parent). Whatever a worker sends, the
parent gets an :class:`Exception`, never a ``SystemExit`` or
``KeyboardInterrupt`` that would end its event loop.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import threading
import traceback
import types
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable

import cloudpickle

from mlpool._errors import RemoteError, RemoteTraceback, SerializationError

PROTOCOL = 5

# A worker caches this many functions; the parent mirrors the cache exactly
# (both clear it at the same message), so it knows when to resend a pickle.
FUNCTION_CACHE_SIZE = 1024
# The parent keeps the pickles of this many recently used functions.
FUNCTION_TABLE_SIZE = 256


def dumps(obj: Any, what: str) -> bytes:
    """Pickle ``obj``; ``what`` names it in the error ("the arguments of job 3")."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        pass
    return dumps_by_value(obj, what)


def dumps_by_value(obj: Any, what: str) -> bytes:
    """Pickle ``obj`` with cloudpickle: functions and classes of ``__main__``
    and local ones go by value (loaders, scoring functions), importable ones
    by reference. Raises SerializationError naming ``what``."""
    try:
        return cloudpickle.dumps(obj, PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"{what} cannot be pickled: {type(exc).__name__}: {_safe_str(exc)}. "
            "Everything sent to or from a worker must be picklable "
            "(no open files, sockets, locks or generators)."
        ) from exc


def loads(data: bytes, what: str, buffers: Any = None) -> Any:
    """Unpickle what came from another process; whatever goes wrong,
    including a BaseException raised by a ``__setstate__`` or ``__reduce__``
    (SystemExit...), is a SerializationError naming ``what``."""
    try:
        return pickle.loads(data, buffers=buffers)
    except BaseException as exc:  # a process boundary: nothing from the other side ends this one
        raise SerializationError(
            f"{what} cannot be unpickled: {type(exc).__name__}: {_safe_str(exc)}"
        ) from (exc if isinstance(exc, Exception) else None)


class FunctionTable:
    """Gives each scoring function an id and its pickle, computed once.

    The table keeps the ``FUNCTION_TABLE_SIZE`` most recently used functions
    (least recently used out first), so per-call lambdas, partials and bound
    methods cannot grow it. Functions are recognised by identity, and so are
    equivalent ones made again for each call: ``partial(f, a)`` with the
    same ``f`` and the same (or equal plain) arguments, ``obj.method`` of
    the same object, and a lambda or closure re-created from the same code
    with the same captured values. The table holds the functions weakly
    where they allow it (other parts, such as a partial's list argument,
    strongly until evicted). Thread-safe.
    """

    def __init__(self, size: int = FUNCTION_TABLE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        # The same function object again (the usual case) skips computing its key.
        self._seen: dict[int, tuple[weakref.ref, _Entry]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.pickled = 0  # how many times a function was pickled, for tests and stats

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, fn: Callable) -> tuple[int, bytes]:
        """``(fn_id, pickle)`` for ``fn``; raises SerializationError if it cannot be pickled."""
        seen = self._seen.get(id(fn))
        if seen is not None and seen[0]() is fn:
            entry = seen[1]
            with self._lock:
                if entry.key is not None:  # not evicted
                    self._entries.move_to_end(entry.key)
                    return entry.fn_id, entry.data
        parts: list[Any] = []
        key = _key(fn, parts, 0)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.guards_hold(parts):
                self._entries.move_to_end(key)
                self._remember(fn, entry)
                return entry.fn_id, entry.data
        try:
            data = cloudpickle.dumps(fn, PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"scoring function {_safe_repr(fn)} cannot be pickled: {type(exc).__name__}: {_safe_str(exc)}"
            ) from exc
        with self._lock:
            self.pickled += 1
            entry = _Entry(next(self._ids), data, [_guard(part) for part in parts], key)
            old = self._entries.pop(key, None)
            if old is not None:  # its parts died and their ids were reused
                old.key = None
            self._entries[key] = entry
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)[1].key = None
            self._remember(fn, entry)
        return entry.fn_id, entry.data

    def _remember(self, fn: Callable, entry: _Entry) -> None:
        """Under the lock: note ``fn`` itself for the fast path (a cache of the table, as bounded)."""
        try:
            ref = weakref.ref(fn)
        except TypeError:
            return
        if len(self._seen) >= 2 * self._size:
            self._seen.clear()
        self._seen[id(fn)] = (ref, entry)


class _Entry:
    __slots__ = ("fn_id", "data", "guards", "key")

    def __init__(self, fn_id: int, data: bytes, guards: list[tuple[bool, Any]], key: Hashable) -> None:
        self.fn_id = fn_id
        self.data = data
        self.guards = guards  # what the key's ids stand for: (weak?, reference)
        self.key: Hashable | None = key  # None once evicted

    def guards_hold(self, parts: list[Any]) -> bool:
        """Whether each id in the key still names the object it was made from."""
        guards = self.guards
        if len(parts) != len(guards):
            return False
        for i, part in enumerate(parts):
            weak, ref = guards[i]
            if (ref() if weak else ref) is not part:
                return False
        return True


def _guard(obj: Any) -> tuple[bool, Any]:
    try:
        return True, weakref.ref(obj)
    except TypeError:  # not weak-referenceable (a dict, a list): held until evicted
        return False, obj


# Values compared by value in a key (the type too: 1, 1.0 and True are equal).
_PLAIN = frozenset((str, bytes, int, float, bool, type(None)))
_MAX_DEPTH = 4


def _key(fn: Any, parts: list[Any], depth: int) -> Hashable:
    """A key equal for the same function, or an equivalent one made again;
    objects it names by id are appended to ``parts`` (the entry guards them)."""
    kind = type(fn)
    if depth < _MAX_DEPTH:
        if kind is functools.partial:
            return (
                "partial",
                _key(fn.func, parts, depth + 1),
                tuple(_value(arg, parts) for arg in fn.args),
                tuple((name, _value(value, parts)) for name, value in fn.keywords.items()),
            )
        if kind is types.MethodType:
            return ("method", _key(fn.__func__, parts, depth + 1), _identity(fn.__self__, parts))
        if kind is types.FunctionType and not fn.__dict__:  # a marked function (@batched) keeps its identity
            code, namespace = fn.__code__, fn.__globals__
            if fn.__closure__ is None and fn.__defaults__ is None and fn.__kwdefaults__ is None:  # most
                parts += (code, namespace)
                return ("function", id(code), id(namespace))
            try:
                cells = tuple(_value(cell.cell_contents, parts) for cell in fn.__closure__ or ())
            except ValueError:  # an empty cell
                return _identity(fn, parts)
            return (
                "function",
                _identity(code, parts),
                _identity(namespace, parts),
                cells,
                tuple(_value(value, parts) for value in fn.__defaults__ or ()),
                tuple((name, _value(value, parts)) for name, value in (fn.__kwdefaults__ or {}).items()),
            )
    return _identity(fn, parts)


def _identity(obj: Any, parts: list[Any]) -> Hashable:
    parts.append(obj)
    return id(obj)


def _value(obj: Any, parts: list[Any]) -> Hashable:
    if type(obj) in _PLAIN and (type(obj) not in (str, bytes) or len(obj) <= 256):
        return (type(obj), obj)
    return ("id", _identity(obj, parts))


def pack_exception(exc: BaseException) -> tuple[bytes, str]:
    """Run in a worker: the exception as bytes the parent can load, and its
    formatted traceback. Never raises.

    The exception goes by pickle, else by cloudpickle (a class defined in
    ``__main__`` or locally travels by value and comes back as itself), as
    long as it survives a round trip. Otherwise, and for a BaseException
    that is not an Exception (SystemExit, KeyboardInterrupt), a
    :class:`RemoteError` naming its type and message stands in.
    """
    tb = format_traceback(exc)
    if isinstance(exc, Exception):
        for dump in (pickle.dumps, cloudpickle.dumps):
            try:
                data = dump(exc, PROTOCOL)
                if isinstance(pickle.loads(data), Exception):
                    return data, tb
            except BaseException:  # whatever the exception's own code raises
                pass
        message = f"{describe_exception(exc)} (the exception could not be sent back as itself)"
    else:
        message = f"the scoring function raised {describe_exception(exc)}; the worker served on"
    try:
        return pickle.dumps(RemoteError(message, type_name=_qualified_name(type(exc))), PROTOCOL), tb
    except BaseException:  # a type whose name cannot even be read
        return pickle.dumps(RemoteError("the scoring function raised an exception that cannot be described")), tb


def unpack_exception(data: bytes, tb: str) -> Exception:
    """Run in the parent: the worker's exception, with its traceback as ``__cause__``.

    Always an :class:`Exception`: a payload that fails to unpickle (even with
    a BaseException), or that is not an Exception, becomes a RemoteError.
    """
    try:
        exc = pickle.loads(data)
    except BaseException as load_error:  # a process boundary: see loads()
        exc = RemoteError(
            "an exception raised in the worker could not be unpickled: "
            f"{type(load_error).__name__}: {_safe_str(load_error)}"
        )
    if not isinstance(exc, Exception):
        exc = RemoteError(f"the worker sent {describe_exception(exc)} as an error", type_name=_safe_type_name(exc))
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


def format_traceback(exc: BaseException) -> str:
    """The formatted traceback of ``exc``, or a line saying why it could not be (never raises)."""
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as error:  # a __str__ or __notes__ that raises, a broken frame
        return f"{describe_exception(exc)}\n(the traceback could not be formatted: {type(error).__name__})\n"


def describe_exception(exc: Any) -> str:
    """``module.Type: message``, whatever the object's ``__str__`` does (never raises)."""
    return f"{_safe_type_name(exc)}: {_safe_str(exc)}"


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except BaseException as error:
        return f"<str() raised {type(error).__name__}>"


def _safe_repr(obj: Any) -> str:
    try:
        return repr(obj)
    except BaseException as error:
        return f"<{_safe_type_name(obj)} object; repr() raised {type(error).__name__}>"


def _safe_type_name(obj: Any) -> str:
    try:
        return _qualified_name(type(obj))
    except BaseException:
        return "<unknown type>"


def _qualified_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
