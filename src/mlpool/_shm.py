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
Docker), and it needs no resource tracker. Each message gets its own file,
never reused, so no region is overwritten while someone reads it. Creating
one costs tens of microseconds, far below copying a buffer of this size
through a pipe.

Where memfd is missing (macOS, Windows) or fails (out of memory, out of
descriptors), or the buffers pass ``limit``, everything goes in-band through
the pipe, with one log line saying so.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import struct
from typing import Any

import cloudpickle

from mlpool._errors import SerializationError

logger = logging.getLogger(__name__)

AVAILABLE = hasattr(os, "memfd_create")
ALIGN = 64  # each buffer starts on a cache line (and a SIMD-friendly boundary)
_SPAN = struct.Struct("<QQ")  # offset, length
# Fault every page in with one call rather than one page at a time (Linux).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


class Payload:
    """A pickle, and the shared-memory file holding its large buffers (if any).

    The owner closes ``fd`` with :meth:`close` once no message will carry it
    again (the parent keeps a job's payload until the job is finished, since a
    retry sends it again).
    """

    __slots__ = ("data", "fd", "spans")

    def __init__(self, data: bytes, fd: int = -1, spans: tuple[tuple[int, int], ...] = ()) -> None:
        self.data = data
        self.fd = fd
        self.spans = spans

    @property
    def size(self) -> int:
        return len(self.data) + sum(length for _, length in self.spans)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pack(obj: Any, what: str, threshold: int | None, limit: int | None) -> Payload:
    """Pickle ``obj``; buffers of ``threshold`` bytes or more go to shared memory."""
    if threshold is None or not AVAILABLE:
        return Payload(_dumps(obj, what, None))
    big: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            size = buffer.raw().nbytes
        except BufferError:  # not contiguous: stays in-band
            return True
        if size < threshold:
            return True
        big.append(buffer)
        return False

    data = _dumps(_wrap_large_bytes(obj, threshold), what, out_of_band)
    if not big:
        return Payload(data)
    total = sum(b.raw().nbytes for b in big)
    if limit is not None and total > limit:
        _warn_once("limit", "mlpool: %d bytes of buffers pass shared_memory_limit=%d; sending them through the "
                   "pipe (slower)", total, limit)  # fmt: skip
        return Payload(_dumps(obj, what, None))
    try:
        fd, spans = _to_memfd(big)
    except OSError as exc:
        _warn_once("memfd", "mlpool: shared memory unavailable (%s); large buffers go through the pipe", exc)
        return Payload(_dumps(obj, what, None))
    return Payload(data, fd, spans)


def unpack(data: bytes, fd: int, spans: tuple[tuple[int, int], ...], what: str, *, writable: bool) -> Any:
    """Unpickle ``data`` with its buffers mapped from ``fd`` (which it closes).

    The objects returned hold the mapping alive as long as they live. With
    ``writable=False`` their buffers are read-only.
    """
    try:
        buffers = _from_memfd(fd, spans, writable) if spans else None
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        return pickle.loads(data, buffers=buffers)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be unpickled: {type(exc).__name__}: {exc}") from exc


def encode_spans(spans: tuple[tuple[int, int], ...]) -> bytes:
    return b"".join(_SPAN.pack(offset, length) for offset, length in spans)


def decode_spans(body: bytes, start: int, count: int) -> tuple[tuple[int, int], ...]:
    return tuple(_SPAN.unpack_from(body, start + i * _SPAN.size) for i in range(count))


SPAN_SIZE = _SPAN.size


def _dumps(obj: Any, what: str, callback: Any) -> bytes:
    try:
        return pickle.dumps(obj, 5, buffer_callback=callback)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(obj, 5, buffer_callback=callback)
    except Exception as exc:
        raise SerializationError(
            f"{what} cannot be pickled: {type(exc).__name__}: {exc}. Everything sent to or from a worker "
            "must be picklable (no open files, sockets, locks or generators)."
        ) from exc


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


def _wrap_large_bytes(obj: Any, threshold: int, depth: int = 2) -> Any:
    kind = type(obj)
    if kind in (bytes, bytearray):
        return _LargeBytes(obj) if len(obj) >= threshold else obj
    if kind is memoryview:
        return _LargeBytes(obj) if obj.nbytes >= threshold and obj.contiguous else obj
    if depth and kind in (tuple, list):
        items = [_wrap_large_bytes(item, threshold, depth - 1) for item in obj]
        return kind(items) if any(a is not b for a, b in zip(items, obj)) else obj
    if depth and kind is dict:
        values = {key: _wrap_large_bytes(value, threshold, depth - 1) for key, value in obj.items()}
        return values if any(values[key] is not obj[key] for key in obj) else obj
    return obj


def _to_memfd(buffers: list[pickle.PickleBuffer]) -> tuple[int, tuple[tuple[int, int], ...]]:
    spans = []
    offset = 0
    for buffer in buffers:
        size = buffer.raw().nbytes
        spans.append((offset, size))
        offset += -(-size // ALIGN) * ALIGN
    fd = os.memfd_create("mlpool", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, max(offset, 1))
        with mmap.mmap(fd, max(offset, 1), flags=mmap.MAP_SHARED | _POPULATE) as region:
            view = memoryview(region)
            for buffer, (start, size) in zip(buffers, spans):
                view[start : start + size] = buffer.raw()
            view.release()
    except BaseException:
        os.close(fd)
        raise
    return fd, tuple(spans)


def _from_memfd(fd: int, spans: tuple[tuple[int, int], ...], writable: bool) -> list[memoryview]:
    size = max(offset + length for offset, length in spans)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    region = mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED | _POPULATE, prot=prot)
    view = memoryview(region)  # keeps the mapping alive as long as any slice lives
    return [view[offset : offset + length] for offset, length in spans]
