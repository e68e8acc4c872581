"""Pickling of jobs, functions, results and exceptions.

Arguments and results use the standard pickle (protocol 5, fast C code) and
fall back to cloudpickle for what it cannot do (lambdas, closures) and for
any pickle that names ``__main__`` (instances of classes defined there: a
worker's ``__main__`` is not the caller's, so they go by value). What cannot
cross faithfully is refused with its reason (:func:`by_value`): open files of
any mode (cloudpickle would send a read-mode text file as a ``StringIO`` of
its contents) and generators. Scoring functions and loaders always go through
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
import inspect
import io
import itertools
import pickle
import threading
import traceback
import types
import weakref
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import cloudpickle

from mlpool.errors import RemoteError, RemoteTraceback, SerializationError

PROTOCOL = 5

# A worker caches this many functions; the parent mirrors the cache exactly
# (both clear it at the same message), so it knows when to resend a pickle.
FUNCTION_CACHE_SIZE = 1024
# The parent keeps the pickles of this many recently used functions, this
# many bytes of them at most.
FUNCTION_TABLE_SIZE = 256
FUNCTION_TABLE_BYTES = 64 * 2**20


def dumps(obj: Any, what: str) -> bytes:
    """Pickle ``obj``; ``what`` names it in the error ("the arguments of job 3")."""
    try:
        data = pickle.dumps(obj, PROTOCOL)
    except Exception:
        pass
    else:
        if not names_main(data):
            return data
    return dumps_by_value(obj, what)


def names_main(data: bytes) -> bool:
    """Whether a pickle may refer to something in ``__main__`` by name (which
    the other process's ``__main__`` does not have). A false alarm (the
    string in the data) only costs a pickle by value."""
    return b"__main__" in data


def dumps_by_value(obj: Any, what: str) -> bytes:
    """Pickle ``obj`` with cloudpickle: functions and classes of ``__main__``
    and local ones go by value (loaders, scoring functions), importable ones
    by reference. Raises SerializationError naming ``what``."""
    try:
        return by_value(obj)
    except Exception as exc:
        raise SerializationError(
            f"{what} cannot be pickled: {type(exc).__name__}: {_safe_str(exc)}. "
            "Everything sent to or from a worker must be picklable "
            "(no open files, sockets, locks or generators)."
        ) from exc


def _refuse_file(file: io.IOBase) -> Any:
    name = getattr(file, "name", "?")
    mode = getattr(file, "mode", "?")
    raise TypeError(
        f"an open file ({name!r}, mode {mode!r}) cannot cross to another process; send its path or its contents"
    )


def _refuse_generator(generator: Any) -> Any:
    kind = type(generator).__name__
    if kind == "coroutine":
        advice = "pass or return its result instead"
    else:
        advice = ("pass or return a list of its items instead; a scoring function that yields its results "
                  "runs with pool.stream(...) or pool.stream_async(...)")  # fmt: skip
    raise TypeError(f"a {kind} cannot cross to another process (its state lives in this one); {advice}")


_cloud_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _code_reduce(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with its own file name
    (cloudpickle >= 3.1 writes "<dynamic-code>"): a worker's tracebacks and
    stacks name the caller's file and line, and show the source line when
    the worker can read that file."""
    rebuild, args = _cloud_code_reduce(code)
    return rebuild, tuple(code.co_filename if isinstance(arg, str) and arg == "<dynamic-code>" else arg for arg in args)


class _ByValuePickler(cloudpickle.Pickler):
    """cloudpickle, refusing what it would not send faithfully, keeping code's file names."""

    dispatch_table = ChainMap(
        {
            io.TextIOWrapper: _refuse_file,
            io.BufferedReader: _refuse_file,
            io.BufferedWriter: _refuse_file,
            io.BufferedRandom: _refuse_file,
            io.FileIO: _refuse_file,
            types.GeneratorType: _refuse_generator,
            types.AsyncGeneratorType: _refuse_generator,
            types.CoroutineType: _refuse_generator,
            types.CodeType: _code_reduce,
        },
        cloudpickle.Pickler.dispatch_table,
    )


def by_value(obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None) -> bytes:
    """``cloudpickle.dumps(obj, 5)``, but an open file or a generator raises
    TypeError saying why (cloudpickle would send a read-mode text file as a
    ``StringIO`` of its contents)."""
    with io.BytesIO() as file:
        _ByValuePickler(file, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def loads_pickled(data: bytes) -> Any:
    """The object pickled in ``data``: what a loader a pool host passed on
    unopened becomes in its worker (``_shared.host.PickledLoader``)."""
    return pickle.loads(data)


def loads(data: bytes, what: str, buffers: Any = None) -> Any:
    """Unpickle what came from another process; whatever goes wrong,
    including a BaseException raised by a ``__setstate__`` or ``__reduce__``
    (SystemExit...), is a SerializationError naming ``what``."""
    try:
        return pickle.loads(data, buffers=buffers)
    except BaseException as exc:  # a process boundary: nothing from the other side ends this one
        raise unpickling_error(what, exc) from (exc if isinstance(exc, Exception) else None)


def unpickling_error(what: str, exc: BaseException) -> SerializationError:
    """The error for ``what`` that could not be unpickled, raising ``exc``
    (its cause when it is an Exception: a BaseException such as SystemExit
    is not chained, so nothing re-raises it)."""
    error = SerializationError(f"{what} cannot be unpickled: {type(exc).__name__}: {_safe_str(exc)}")
    error.__cause__ = exc if isinstance(exc, Exception) else None
    return error


def async_kind(fn: Any) -> str | None:
    """"async function" or "async generator function" if calling ``fn`` gives
    a coroutine or an async generator (an object whose ``__call__`` is one
    too), else None."""
    for target in (fn, type(fn).__call__):
        if inspect.iscoroutinefunction(target):
            return "async function"
        if inspect.isasyncgenfunction(target):
            return "async generator function"
    return None


class FunctionTable:
    """Gives each scoring function an id and its pickle, computed once.

    The table keeps the pickles of the ``FUNCTION_TABLE_SIZE`` most recently
    used functions, at most ``FUNCTION_TABLE_BYTES`` in all (least recently
    used out first), so per-call lambdas, partials and bound methods cannot
    grow it. Functions are recognised by identity, and so are equivalent
    ones made again for each call: ``partial(f, a)`` with the same ``f`` and
    the same (or equal plain) arguments, ``obj.method`` of the same object,
    and a lambda or closure re-created from the same code with the same
    captured values. The table holds those parts weakly where they allow it,
    and forgets a pickle once one of them is gone (other parts, such as a
    partial's list argument, are held until evicted). Thread-safe.
    """

    def __init__(self, size: int = FUNCTION_TABLE_SIZE, max_bytes: int = FUNCTION_TABLE_BYTES) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        # The same function object again (the usual case) skips computing its key.
        self._seen: dict[int, tuple[weakref.ref, Hashable]] = {}
        # Keys whose parts died (appended by weakref callbacks, at any moment:
        # list.append needs no lock), purged at the next lookup.
        self._dead: list[Hashable] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.pickled = 0  # how many times a function was pickled, for tests and stats

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of pickles kept."""
        return self._bytes

    def lookup(self, fn: Callable) -> tuple[int, bytes]:
        """``(fn_id, pickle)`` for ``fn``; raises SerializationError if it cannot be
        pickled, TypeError if it is an async function."""
        if self._dead:
            self._purge()
        seen = self._seen.get(id(fn))
        if seen is not None and seen[0]() is fn:
            # No lock: each OrderedDict call is atomic under the GIL (keys are
            # tuples of ints and strings), and an entry evicted meanwhile
            # still holds a valid pickle and id.
            entry = self._entries.get(seen[1])
            if entry is not None:  # fn is alive, so are the parts of its key
                try:
                    self._entries.move_to_end(seen[1])
                except KeyError:
                    pass
                return entry.fn_id, entry.data
        parts: list[Any] = []
        key = _key(fn, parts, 0)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.guards_hold(parts):
                self._entries.move_to_end(key)
                self._remember(fn, key)
                return entry.fn_id, entry.data
        if (kind := async_kind(fn)) is not None:  # once per function: here
            raise TypeError(
                f"scoring function {_safe_repr(fn)} is an {kind}; a worker calls it without an event loop, "
                "and what it returns would never run: make it a plain def (a generator function, for pool.stream)"
            )
        try:
            data = by_value(fn)
        except Exception as exc:
            raise SerializationError(
                f"scoring function {_safe_repr(fn)} cannot be pickled: {type(exc).__name__}: {_safe_str(exc)}"
            ) from exc
        forget = functools.partial(_append, self._dead, key)
        with self._lock:
            self.pickled += 1
            entry = _Entry(next(self._ids), data, [_guard(part, forget) for part in parts])
            self._drop(key)  # an older entry whose parts died and whose ids were reused
            self._entries[key] = entry
            self._bytes += len(data)
            while len(self._entries) > 1 and (len(self._entries) > self._size or self._bytes > self._max_bytes):
                self._drop(next(iter(self._entries)))
            self._remember(fn, key)
        return entry.fn_id, entry.data

    def _drop(self, key: Hashable) -> None:
        """Under the lock: forget ``key``'s pickle."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.data)

    def _purge(self) -> None:
        """Forget the pickles whose functions' parts died."""
        with self._lock:
            while self._dead:
                key = self._dead.pop()  # atomic: a callback may append meanwhile
                entry = self._entries.get(key)
                if entry is not None and not entry.alive():
                    self._drop(key)

    def _remember(self, fn: Callable, key: Hashable) -> None:
        """Under the lock: note ``fn`` itself for the fast path (bounded as the table)."""
        try:
            ref = weakref.ref(fn)
        except TypeError:
            return
        if len(self._seen) >= 2 * self._size:
            self._seen.clear()
        self._seen[id(fn)] = (ref, key)


class _Entry:
    __slots__ = ("fn_id", "data", "guards")

    def __init__(self, fn_id: int, data: bytes, guards: list[tuple[bool, Any]]) -> None:
        self.fn_id = fn_id
        self.data = data
        self.guards = guards  # what the key's ids stand for: (weak?, reference)

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

    def alive(self) -> bool:
        return all(ref() is not None for weak, ref in self.guards if weak)


def _guard(obj: Any, on_death: Callable[[Any], None]) -> tuple[bool, Any]:
    try:
        return True, weakref.ref(obj, on_death)
    except TypeError:  # not weak-referenceable (a dict, a list): held until evicted
        return False, obj


def _append(dead: list, key: Hashable, ref: Any) -> None:
    dead.append(key)


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
