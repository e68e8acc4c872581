"""Shared memory, the half both processes run: pickling with out-of-band
buffers, and what a worker does with shared-memory files.

A pickle keeps its buffers of at least ``threshold`` bytes aside (protocol 5
out-of-band buffers: NumPy arrays, pandas and PyArrow data, large
``bytes``/``bytearray``/``memoryview``). In a worker:

- arguments: :func:`unpack` maps the parent's region (read-only, kept for the
  next job in the same region) and unpickles with buffers pointing into it;
- results: :func:`write_result` writes the buffers into the room the parent
  offered (``OFFERED``) if they fit, else into a file of its own that goes
  with the reply (``NEW_FILE``), else everything goes in-band (``NOWHERE``).

The parent's side (its regions, their reuse, reading results) is ``_engine.regions``;
this module imports nothing from the parent's side, so a worker (or a
template) does not load it.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
from typing import Any, SupportsIndex

from mlpool._wire.protocol import NEW_FILE, NOWHERE, OFFERED
from mlpool._wire.serialization import by_value, names_main
from mlpool.errors import SerializationError

logger = logging.getLogger(__name__)

AVAILABLE = hasattr(os, "memfd_create")
ALIGN = 64  # each buffer starts on a cache line (and a SIMD-friendly boundary)
# Fault every page in with one call rather than one page at a time (Linux).
POPULATE = getattr(mmap, "MAP_POPULATE", 0)

Spans = tuple[tuple[int, int], ...]

_warned: set[str] = set()


def warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def pickle_out_of_band(
    obj: Any, what: str, threshold: int | None, limit: int | None
) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """The pickle of ``obj`` and, in order, its buffers of ``threshold`` bytes
    or more (none when ``threshold`` is None, shared memory is missing, or
    they pass ``limit`` bytes in all). Raises SerializationError."""
    if threshold is None or not AVAILABLE:
        return _dumps(obj, what, None)
    if type(obj) in _MAY_HOLD_BYTES:
        obj = _wrap_large_bytes(obj, threshold)
    data, big = _dumps(obj, what, threshold)
    if big and limit is not None and sum(nbytes(b) for b in big) > limit:
        warn_once("limit", "mlpool: %d bytes of buffers pass shared_memory_limit=%d; sending them through the "
                  "pipe (slower)", sum(nbytes(b) for b in big), limit)  # fmt: skip
        return _dumps(obj, what, None)
    return data, big


def nbytes(buffer: pickle.PickleBuffer) -> int:
    return buffer.raw().nbytes


def layout(buffers: list[pickle.PickleBuffer]) -> Spans:
    """Where each buffer goes in a region: (offset, length), aligned, in order."""
    spans = []
    offset = 0
    for buffer in buffers:
        size = nbytes(buffer)
        spans.append((offset, size))
        offset += -(-size // ALIGN) * ALIGN
    return tuple(spans)


def write_result(
    obj: Any, what: str, threshold: int | None, limit: int | None, offer: int
) -> tuple[bytes, Spans, int, int]:
    """Worker side: pickle a result, its large buffers into the offered file
    if they fit, else into a new one. ``(data, spans, where, fd_to_send)``
    with ``where`` one of NOWHERE, OFFERED, NEW_FILE."""
    if threshold is None or not AVAILABLE or type(obj) in SCALAR_TYPES:  # the common small result
        return _dumps(obj, what, None)[0], (), NOWHERE, -1
    data, buffers = pickle_out_of_band(obj, what, threshold, limit)
    if not buffers:
        return data, (), NOWHERE, -1
    spans = layout(buffers)
    needed = spans[-1][0] + spans[-1][1]
    if offer >= 0 and os.fstat(offer).st_size >= needed:
        view = _MAPPINGS.view(offer, writable=True)
        for buffer, (start, length) in zip(buffers, spans, strict=True):
            view[start : start + length] = buffer.raw()
        return data, spans, OFFERED, -1
    try:
        fd = _to_memfd(buffers, spans)
    except OSError as exc:
        warn_once("memfd", "mlpool: shared memory unavailable (%s); large buffers go through the pipe", exc)
        return _dumps(obj, what, None)[0], (), NOWHERE, -1
    return data, spans, NEW_FILE, fd


def region_views(fd: int, spans: Spans) -> list[memoryview]:
    """Read-only views on the spans of region ``fd`` (not closed here)."""
    return _MAPPINGS.views(fd, spans)


def unpack(data: bytes, fd: int, spans: Spans, what: str, buffers: Any = None) -> Any:
    """Worker side: unpickle arguments whose buffers are read-only views on the
    region ``fd`` (which it closes). They are valid for the duration of the
    call: the parent reuses the region for a later job. ``buffers``: the
    out-of-band buffers, when they came another way (a Ray actor's arguments)."""
    try:
        if spans:
            buffers = _MAPPINGS.views(fd, spans)
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        return pickle.loads(data, buffers=buffers)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be unpickled: {type(exc).__name__}: {exc}") from exc


class _WorkerMappings:
    """The worker's mappings of the parent's regions (read-only for
    arguments, writable for offered result space), kept for the next job in
    the same region: mapping 8 MB again costs about 0.7 ms.

    At most ``KEEP`` of each kind are kept, so a region the parent dropped
    stays alive only until two newer ones were used.
    """

    KEEP = 2

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int, bool], memoryview] = {}

    def view(self, fd: int, *, writable: bool) -> memoryview:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino, writable)
        view = self._maps.pop(key, None)
        if view is None or len(view) < info.st_size:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            view = memoryview(mmap.mmap(fd, max(info.st_size, 1), flags=mmap.MAP_SHARED | POPULATE, prot=prot))
        self._maps[key] = view  # most recent last
        same_kind = [k for k in self._maps if k[2] is writable]
        for old in same_kind[: -self.KEEP]:
            del self._maps[old]
        return view

    def views(self, fd: int, spans: Spans) -> list[memoryview]:
        view = self.view(fd, writable=False)
        return [view[offset : offset + length] for offset, length in spans]  # slices keep the mapping alive


_MAPPINGS = _WorkerMappings()


def _to_memfd(buffers: list[pickle.PickleBuffer], spans: Spans) -> int:
    size = max(spans[-1][0] + spans[-1][1], 1)
    fd = os.memfd_create("mlpool", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | POPULATE) as region:
            view = memoryview(region)
            for buffer, (start, length) in zip(buffers, spans, strict=True):
                view[start : start + length] = buffer.raw()
            view.release()
    except BaseException:
        os.close(fd)
        raise
    return fd


def _out_of_band(big: list[pickle.PickleBuffer], threshold: int) -> Any:
    def callback(buffer: pickle.PickleBuffer) -> bool:
        try:
            size = buffer.raw().nbytes
        except BufferError:  # not contiguous: stays in-band
            return True
        if size < threshold:
            return True
        big.append(buffer)
        return False

    return callback


def _dumps(obj: Any, what: str, threshold: int | None) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """The pickle of ``obj`` and its out-of-band buffers (those of ``threshold``
    bytes or more; None: all in-band). Plain pickle first, cloudpickle for
    what it cannot do and for a pickle that names ``__main__`` (an instance of
    a class defined there: the other process's ``__main__`` is not this
    one's), refusing open files and generators (``by_value``). Each attempt collects its buffers in a list of its own:
    a failed attempt may have handed out some already, and the pickle
    that is kept refers to its buffers by their order in that list."""
    big: list[pickle.PickleBuffer] = []
    callback = None if threshold is None else _out_of_band(big, threshold)
    try:
        data = pickle.dumps(obj, 5, buffer_callback=callback)
    except Exception:
        pass
    else:
        if not names_main(data):
            return data, big
    big = []
    callback = None if threshold is None else _out_of_band(big, threshold)
    try:
        return by_value(obj, callback), big
    except Exception as exc:
        error = exc
    raise SerializationError(
        f"{what} cannot be pickled: {type(error).__name__}: {error}. Everything sent to or from a worker "
        "must be picklable (no open files, sockets, locks or generators)."
    ) from error


class _LargeBytes:
    """Pickles a large bytes, bytearray or memoryview out-of-band.

    The pickler never asks bytes-like objects for a reduction (they have a
    fast path), so large ones among the arguments or in a result are wrapped
    in this first (to one level of nesting: the arguments tuple, the keyword
    dict, a returned tuple, list or dict).
    """

    __slots__ = ("obj",)

    def __init__(self, obj: bytes | bytearray | memoryview) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple:
        obj = self.obj
        if type(obj) is memoryview:
            return _rebuild_memoryview, (pickle.PickleBuffer(obj.cast("B")), obj.format, obj.shape)
        return _rebuild_bytes, (type(obj), pickle.PickleBuffer(obj))


def _rebuild_bytes(kind: type, buffer: Any) -> Any:
    return kind(buffer)  # bytes own their memory: one copy here


def _rebuild_memoryview(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    # A view: no copy. (Any struct format works; typeshed lists only literal ones.)
    return memoryview(buffer).cast("B").cast(fmt, shape)  # type: ignore[call-overload]


_MAY_HOLD_BYTES = frozenset((bytes, bytearray, memoryview, tuple, list, dict))
SCALAR_TYPES = frozenset((int, float, bool, str, type(None), complex))  # never hold a large buffer


def _wrap_large_bytes(obj: Any, threshold: int, depth: int = 2) -> Any:
    """``obj`` with its large bytes-likes wrapped in _LargeBytes (the same
    object when there are none: this runs for every job, so it allocates
    nothing then)."""
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        return _LargeBytes(obj) if len(obj) >= threshold else obj
    if kind is memoryview:
        return _LargeBytes(obj) if obj.nbytes >= threshold and obj.contiguous else obj
    if not depth:
        return obj
    if kind is tuple or kind is list:
        for i, item in enumerate(obj):
            wrapped = _wrap_large_bytes(item, threshold, depth - 1)
            if wrapped is not item:
                items = list(obj)
                items[i] = wrapped
                items[i + 1 :] = [_wrap_large_bytes(x, threshold, depth - 1) for x in items[i + 1 :]]
                return kind(items)
        return obj
    if kind is dict:
        for value in obj.values():
            if _wrap_large_bytes(value, threshold, depth - 1) is not value:
                return {k: _wrap_large_bytes(v, threshold, depth - 1) for k, v in obj.items()}
        return obj
    return obj
