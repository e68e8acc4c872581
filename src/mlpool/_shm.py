"""Large buffers cross in shared memory, not through the pipe.

Arguments and results are pickled with protocol 5. Every out-of-band buffer
of at least ``threshold`` bytes (NumPy arrays, pandas and PyArrow data, and
large ``bytes``/``bytearray``/``memoryview`` objects) is copied once into an
anonymous shared-memory file (``memfd_create``, Linux), whose descriptor goes
to the other process with the message (``SCM_RIGHTS`` on the worker's Unix
socket). The receiver maps it and unpickles with the buffers pointing into
that mapping: no copy.

Why memfd rather than ``/dev/shm`` segments: it has no name, so nothing can
be left behind (a killed process's descriptors and mappings go with it), it
is not limited by the size of the ``/dev/shm`` mount (64 MB by default in
Docker), and it needs no resource tracker.

Fresh shared pages are expensive (allocating and zeroing 8 MB of them took
6 ms on our machine, 25 times the copy), so the parent keeps the files it
made in a :class:`RegionPool` and reuses them: for a job's arguments (from
its first dispatch until its worker has answered it or died, so no region
is rewritten while a worker can read it), and as an offer of room for a
result (the worker writes its result there if it fits; the parent copies it
out and takes the region back). A result that did not fit comes in a file
the worker made, which the parent then adopts into the pool.

Where memfd is missing (macOS, Windows) or fails (out of memory, out of
descriptors), or the buffers pass ``limit``, everything goes in-band through
the pipe, with one log line saying so.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import threading
import weakref
from typing import Any

import cloudpickle

from mlpool._errors import SerializationError

logger = logging.getLogger(__name__)

AVAILABLE = hasattr(os, "memfd_create")
ALIGN = 64  # each buffer starts on a cache line (and a SIMD-friendly boundary)
# Fault every page in with one call rather than one page at a time (Linux).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


class Region:
    """A shared-memory file and the parent's mapping of it."""

    __slots__ = ("fd", "size", "_map", "view")

    def __init__(self, size: int, fd: int = -1) -> None:
        if fd < 0:
            fd = os.memfd_create("mlpool", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        self.view = memoryview(self._map)

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)

    def place(self, buffers: list[pickle.PickleBuffer]) -> tuple[tuple[int, int], ...]:
        """Copy ``buffers`` in; their (offset, length) spans."""
        spans = _layout(buffers)
        for buffer, (start, size) in zip(buffers, spans):
            self.view[start : start + size] = buffer.raw()
        return spans

    def lend(self, spans: tuple[tuple[int, int], ...], pool: RegionPool) -> list[memoryview]:
        """Writable views on the spans, through a mapping of their own: the
        region goes back to ``pool`` when the last view (and whatever was
        built on it) is garbage, so a result costs no copy and its memory is
        never reused under it."""
        # No MAP_POPULATE: the caller may never read all of it; pages come in as touched.
        mapping = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        weakref.finalize(mapping, pool.give, self)
        view = memoryview(mapping)
        return [view[offset : offset + length] for offset, length in spans]


class RegionPool:
    """The parent's free regions, kept for reuse up to ``keep`` bytes. Thread-safe."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[Region] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self, size: int) -> Region:
        """A free region of at least ``size`` bytes (the smallest that fits), or a new one."""
        size = max(size, 1)
        with self._lock:
            fits = [r for r in self._free if r.size >= size]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
        return Region(-(-size // _GRANULE) * _GRANULE)

    def give(self, region: Region) -> None:
        """Take back a region nobody reads or writes any more."""
        excess: list[Region] = []
        with self._lock:
            if self._closed:  # a result outlived its pool
                excess = [region]
            else:
                self._free.append(region)
                self._free.sort(key=lambda r: r.size, reverse=True)
                kept = 0
                for i, r in enumerate(self._free):
                    kept += r.size
                    if kept > self._keep:  # keep the largest, up to the budget
                        excess, self._free = self._free[i:], self._free[:i]
                        break
        for r in excess:
            r.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for region in free:
            region.close()


_GRANULE = 1 << 20  # regions grow by whole MiB, so nearby sizes share them


class Payload:
    """A pickle and its large buffers (parent side), placed in a region when
    first sent. The region is the job's until :meth:`release`."""

    __slots__ = ("data", "buffers", "region", "spans", "nbytes")

    def __init__(self, data: bytes, buffers: list[pickle.PickleBuffer] | None = None) -> None:
        self.data = data
        self.buffers = buffers or []
        self.region: Region | None = None
        self.spans: tuple[tuple[int, int], ...] = ()
        self.nbytes = sum(_nbytes(b) for b in self.buffers) if self.buffers else 0

    @property
    def size(self) -> int:
        return len(self.data) + self.nbytes

    def place(self, pool: RegionPool) -> int:
        """Copy the buffers into a region (once); the descriptor to send, or -1."""
        if not self.buffers:
            return -1
        if self.region is None:
            self.region = pool.take(self.nbytes + ALIGN * len(self.buffers))
            self.spans = self.region.place(self.buffers)
        return self.region.fd

    def loads(self, what: str) -> Any:
        """Unpickle in this process (the inline pool): the buffers as they are."""
        try:
            return pickle.loads(self.data, buffers=[b.raw().toreadonly() for b in self.buffers])
        except Exception as exc:
            raise SerializationError(f"{what} cannot be unpickled: {type(exc).__name__}: {exc}") from exc

    def release(self, pool: RegionPool) -> None:
        self.buffers = []
        if self.region is not None:
            pool.give(self.region)
            self.region = None


def pickle_payload(obj: Any, what: str, threshold: int | None, limit: int | None) -> Payload:
    """Pickle ``obj`` keeping its buffers of ``threshold`` bytes or more aside
    (parent side: they are placed in shared memory at dispatch)."""
    if threshold is None or not AVAILABLE:
        return Payload(_dumps(obj, what, None)[0])
    if type(obj) in _MAY_HOLD_BYTES:
        obj = _wrap_large_bytes(obj, threshold)
    data, big = _dumps(obj, what, threshold)
    if big and limit is not None and sum(_nbytes(b) for b in big) > limit:
        _warn_once("limit", "mlpool: %d bytes of buffers pass shared_memory_limit=%d; sending them through the "
                   "pipe (slower)", sum(_nbytes(b) for b in big), limit)  # fmt: skip
        return Payload(_dumps(obj, what, None)[0])
    return Payload(data, big)


def _nbytes(buffer: pickle.PickleBuffer) -> int:
    return buffer.raw().nbytes


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


def _layout(buffers: list[pickle.PickleBuffer]) -> tuple[tuple[int, int], ...]:
    spans = []
    offset = 0
    for buffer in buffers:
        size = _nbytes(buffer)
        spans.append((offset, size))
        offset += -(-size // ALIGN) * ALIGN
    return tuple(spans)


def write_result(obj: Any, what: str, threshold: int | None, limit: int | None, offer: int) -> tuple[bytes, tuple, int, int]:
    """Worker side: pickle a result, its large buffers into the offered file
    if they fit, else into a new one. ``(data, spans, where, fd_to_send)``
    with ``where`` one of NOWHERE, OFFERED, NEW_FILE."""
    if threshold is None or not AVAILABLE or type(obj) in _SCALARS:  # the common small result
        return _dumps(obj, what, None)[0], (), NOWHERE, -1
    payload = pickle_payload(obj, what, threshold, limit)
    if not payload.buffers:
        return payload.data, (), NOWHERE, -1
    needed = sum(-(-_nbytes(b) // ALIGN) * ALIGN for b in payload.buffers)
    if offer >= 0 and os.fstat(offer).st_size >= needed:
        view = _MAPPINGS.view(offer, writable=True)
        for buffer, (start, length) in zip(payload.buffers, _layout(payload.buffers)):
            view[start : start + length] = buffer.raw()
        return payload.data, _layout(payload.buffers), OFFERED, -1
    try:
        fd, spans = _to_memfd(payload.buffers)
    except OSError as exc:
        _warn_once("memfd", "mlpool: shared memory unavailable (%s); large buffers go through the pipe", exc)
        return _dumps(obj, what, None)[0], (), NOWHERE, -1
    return payload.data, spans, NEW_FILE, fd


NOWHERE, OFFERED, NEW_FILE = 0, 1, 2


def _write_into(fd: int, buffers: list[pickle.PickleBuffer]) -> None:
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE) as region:
        view = memoryview(region)
        for buffer, (start, length) in zip(buffers, _layout(buffers)):
            view[start : start + length] = buffer.raw()
        view.release()


def read_result(
    data: bytes, spans: tuple, where: int, fd: int, offered: Region | None, pool: RegionPool, what: str
) -> Any:
    """Parent side: unpickle a result whose buffers are views on shared memory
    (no copy). The region returns to ``pool`` once the result is garbage; a
    file the worker made is adopted into the pool then (its pages are
    allocated: reusing them is cheap)."""
    if where == OFFERED:
        assert offered is not None
        buffers = offered.lend(spans, pool)
    elif where == NEW_FILE:
        buffers = Region(os.fstat(fd).st_size, fd).lend(spans, pool)
        if offered is not None:  # it did not fit there
            pool.give(offered)
    else:
        buffers = None
        if offered is not None:
            pool.give(offered)
    try:
        return pickle.loads(data, buffers=buffers)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be unpickled: {type(exc).__name__}: {exc}") from exc


def region_views(fd: int, spans: tuple[tuple[int, int], ...]) -> list[memoryview]:
    """Read-only views on the spans of region ``fd`` (not closed here)."""
    return _MAPPINGS.views(fd, spans)


def unpack(data: bytes, fd: int, spans: tuple[tuple[int, int], ...], what: str, buffers: Any = None) -> Any:
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
            view = memoryview(mmap.mmap(fd, max(info.st_size, 1), flags=mmap.MAP_SHARED | _POPULATE, prot=prot))
        self._maps[key] = view  # most recent last
        same_kind = [k for k in self._maps if k[2] is writable]
        for old in same_kind[: -self.KEEP]:
            del self._maps[old]
        return view

    def views(self, fd: int, spans: tuple[tuple[int, int], ...]) -> list[memoryview]:
        view = self.view(fd, writable=False)
        return [view[offset : offset + length] for offset, length in spans]  # slices keep the mapping alive


_MAPPINGS = _WorkerMappings()


def _dumps(obj: Any, what: str, threshold: int | None) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """The pickle of ``obj`` and its out-of-band buffers (those of ``threshold``
    bytes or more; None: all in-band). Plain pickle first, cloudpickle for
    what it cannot do. Each attempt collects its buffers in a list of its own:
    a failed attempt may have handed out some already (#13.1), and the pickle
    that is kept refers to its buffers by their order in that list."""
    error: Exception | None = None
    for dumps in (pickle.dumps, cloudpickle.dumps):
        big: list[pickle.PickleBuffer] = []
        callback = None if threshold is None else _out_of_band(big, threshold)
        try:
            return dumps(obj, 5, buffer_callback=callback), big
        except Exception as exc:
            error = exc
    assert error is not None
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

    def __reduce_ex__(self, protocol: int) -> tuple:
        obj = self.obj
        if type(obj) is memoryview:
            return _rebuild_memoryview, (pickle.PickleBuffer(obj.cast("B")), obj.format, obj.shape)
        return _rebuild_bytes, (type(obj), pickle.PickleBuffer(obj))


def _rebuild_bytes(kind: type, buffer: Any) -> Any:
    return kind(buffer)  # bytes own their memory: one copy here


def _rebuild_memoryview(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    return memoryview(buffer).cast("B").cast(fmt, shape)  # a view: no copy


_MAY_HOLD_BYTES = frozenset((bytes, bytearray, memoryview, tuple, list, dict))
_SCALARS = frozenset((int, float, bool, str, type(None), complex))  # never hold a large buffer


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
        for key, value in obj.items():
            if _wrap_large_bytes(value, threshold, depth - 1) is not value:
                return {k: _wrap_large_bytes(v, threshold, depth - 1) for k, v in obj.items()}
        return obj
    return obj


def _to_memfd(buffers: list[pickle.PickleBuffer]) -> tuple[int, tuple[tuple[int, int], ...]]:
    spans = _layout(buffers)
    size = max(spans[-1][0] + spans[-1][1], 1)
    fd = os.memfd_create("mlpool", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        _write_into(fd, buffers)
    except BaseException:
        os.close(fd)
        raise
    return fd, spans
