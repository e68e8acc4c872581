"""Large buffers cross in shared memory, not through the pipe (parent side).

Arguments and results are pickled with protocol 5. Every out-of-band buffer
of at least ``threshold`` bytes (NumPy arrays, pandas and PyArrow data, and
large ``bytes``/``bytearray``/``memoryview`` objects) is copied once, when
the job is made and in the caller's thread, into an anonymous shared-memory
file (``memfd_create``, Linux), whose descriptor goes
to the other process with the message (``SCM_RIGHTS`` on the worker's Unix
socket). The receiver maps it and unpickles with the buffers pointing into
that mapping. The half a worker runs is ``_wire.shm``.

Why memfd rather than ``/dev/shm`` segments: it has no name, so nothing can
be left behind (a killed process's descriptors and mappings go with it), it
is not limited by the size of the ``/dev/shm`` mount (64 MB by default in
Docker), and it needs no resource tracker.

Fresh shared pages are expensive (allocating and zeroing 8 MB of them took
6 ms on our machine, 25 times the copy), so the parent keeps the files it
made in a :class:`RegionPool` and reuses them, within a bound on idle
memory that the user sets: for a job's arguments (from when the job is made
until its worker has answered it or died, or it was cancelled before it ran:
no region is rewritten while a worker can read it), and as an offer of room
for a result (the worker writes its result there if it fits). A result that
did not fit comes in a file the worker made, which the parent adopts.

What a held result costs: a result under ``COPY_BELOW`` bytes is
copied out of its region, which goes back to the pool at once: it holds no
descriptor and costs its own size. A larger one is a view on its region
(no copy), which goes back to the pool when the result is garbage: one
descriptor, and a region at most a quarter (plus 1 MiB) larger than the
result. Each region is one descriptor: the parent maps it with ``mmap(2)``
through ctypes, since Python's ``mmap`` keeps a duplicate descriptor
(before 3.13).

Where memfd is missing (macOS, Windows) or fails (out of memory, out of
descriptors), or the buffers pass ``limit``, everything goes in-band through
the pipe, with one log line saying so.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import threading
import weakref
from collections import deque
from typing import Any

from mlpool._wire.serialization import PROTOCOL, loads
from mlpool._wire.shm import (
    ALIGN,
    AVAILABLE,
    NEW_FILE,
    NOWHERE,
    OFFERED,
    POPULATE,
    SCALAR_TYPES,
    Spans,
    layout,
    nbytes,
    pickle_out_of_band,
    warn_once,
)

__all__ = ["AVAILABLE", "NEW_FILE", "NOWHERE", "OFFERED", "Payload", "Region", "RegionPool", "pickle_call",
           "pickle_payload", "read_result"]  # fmt: skip

# Results smaller than this are copied out of shared memory (about 0.2 ms
# for 4 MiB), so that holding one pins no region and no descriptor.
COPY_BELOW = 4 << 20
# What the pool keeps idle by default (see RegionPool; MLPool's shared_memory_cache).
IDLE_BYTES = 256 << 20
IDLE_REGIONS = 16
_GRANULE = 1 << 20  # regions grow by whole MiB, so nearby sizes share them


class Region:
    """A shared-memory file (one descriptor) and the parent's mapping of it."""

    __slots__ = ("fd", "size", "view", "_address")

    def __init__(self, size: int, fd: int = -1) -> None:
        """A new file of ``size`` bytes, or (``fd``) one the worker made, which
        this region then owns (closes) whatever happens."""
        try:
            if fd < 0:
                fd = os.memfd_create("mlpool", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
            self._address = _mmap(fd, size)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self.view = memoryview((ctypes.c_char * size).from_address(self._address)).cast("B")

    def close(self) -> None:
        """Unmap and close. Only once nothing reads the region any more."""
        self.view.release()
        _munmap(self._address, self.size)
        os.close(self.fd)

    def place(self, buffers: list[pickle.PickleBuffer]) -> Spans:
        """Copy ``buffers`` in; their (offset, length) spans."""
        spans = layout(buffers)
        for buffer, (start, size) in zip(buffers, spans, strict=True):
            self.view[start : start + size] = buffer.raw()
        return spans

    def lend(self, spans: Spans, pool: RegionPool) -> list[memoryview]:
        """Writable views on the spans: the region goes back to ``pool`` when
        the last view (and whatever was built on it) is garbage, so a result
        costs no copy and its memory is never reused under it."""
        lent = (ctypes.c_char * self.size).from_address(self._address)
        weakref.finalize(lent, pool.give_later, self)
        view = memoryview(lent).cast("B")
        return [view[offset : offset + length] for offset, length in spans]


class ForeignRegion:
    """A region of another process (a pool host's job: the API process that
    made it owns the file): passed on by descriptor, never mapped here.
    Giving it to a :class:`RegionPool` closes this process's descriptor."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


class RegionPool:
    """The parent's idle regions, kept for reuse. Thread-safe.

    At most ``keep`` bytes and ``max_regions`` regions stay idle (by default
    256 MiB and 16; MLPool's ``shared_memory_cache``), the largest first.
    Reuse matters in the steady state, where each job holds about two regions
    (its arguments, from when it is made until its worker answered, and the
    room offered for its result) and gives them back within a job: only a few
    are idle at any time, but for 64 MB arrays those few are large. What a
    burst leaves beyond the bound would cost the API process memory and
    descriptors for nothing until the next burst.
    """

    def __init__(self, keep: int = IDLE_BYTES, max_regions: int = IDLE_REGIONS) -> None:
        self._keep = keep
        self._max_regions = max_regions
        self._free: list[Region] = []
        self._returned: deque[Region] = deque()  # by give_later, not yet in _free
        self._lock = threading.Lock()
        self._closed = False

    def take(self, size: int) -> Region:
        """An idle region that fits ``size`` bytes without wasting more than a
        quarter (plus the 1 MiB granule), the smallest such (of equal sizes,
        the one given back last); else a new one."""
        self._reclaim()
        size = max(size, 1)
        largest = size + size // 4 + _GRANULE
        region = None
        with self._lock:
            fits = [r for r in self._free if size <= r.size <= largest]
            if fits:
                # Of equal sizes, the one given back last: a worker still has it
                # mapped (mapping 64 MB again costs more than the copy).
                region = min(reversed(fits), key=lambda r: r.size)
                self._free.remove(region)
        self._reclaim()
        return region or Region(-(-size // _GRANULE) * _GRANULE)

    def give_later(self, region: Region) -> None:
        """:meth:`give`, from a finalizer: it may run in any thread, in a
        garbage collection started while this thread holds our lock."""
        self._returned.append(region)  # atomic
        if self._lock.acquire(blocking=False):  # else a holder takes it back as it leaves
            self._lock.release()
            self._reclaim()

    def give(self, region: Region | ForeignRegion) -> None:
        """Take back a region nobody reads or writes any more (a foreign one is closed)."""
        if type(region) is ForeignRegion:
            region.close()
            return
        self._give(region)  # type: ignore[arg-type]
        self._reclaim()

    def _reclaim(self) -> None:
        while self._returned:
            try:
                region = self._returned.popleft()
            except IndexError:  # another thread took it
                return
            self._give(region)

    def _give(self, region: Region) -> None:
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
                    if kept > self._keep or i >= self._max_regions:  # keep the largest, within the bounds
                        excess, self._free = self._free[i:], self._free[:i]
                        break
        for r in excess:
            r.close()

    def close(self) -> None:
        """Close the idle regions; regions given back later are closed at once."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for region in free:
            region.close()
        self._reclaim()


class Payload:
    """A pickle and its large buffers (parent side).

    Made with a :class:`RegionPool` (the process engine), the buffers are
    copied once, when the job is made, straight into a region: the job's
    arguments are what they were then, whatever the caller does to its
    arrays while the job waits, and dispatch sends the region's descriptor
    with no copy. Made without one (the inline engine), they are copied into
    private memory. The region is the job's until :meth:`release`; a payload
    dropped without it (a job refused after it was made) gives its region
    back when it is garbage.
    """

    __slots__ = ("data", "buffers", "region", "spans", "nbytes", "size", "_return", "__weakref__")

    def __init__(self, data: bytes, buffers: list[pickle.PickleBuffer] | None = None) -> None:
        self.data = data
        self.buffers = buffers or []
        self.region: Region | ForeignRegion | None = None
        self.spans: Spans = ()
        self.nbytes = sum(nbytes(b) for b in self.buffers) if self.buffers else 0
        self.size = len(data) + self.nbytes  # bytes in all: the pickle and its buffers
        self._return: weakref.finalize | None = None

    @classmethod
    def foreign(cls, data: bytes, spans: Spans, fd: int) -> Payload:
        """A payload whose buffers another process already placed in the
        shared-memory file ``fd`` (a pool host's job): this payload owns the
        descriptor, closed when released or when it is garbage."""
        payload = cls(data)
        payload.region = ForeignRegion(fd)
        payload.spans = spans
        payload.nbytes = sum(length for _, length in spans) or 1  # shared: dispatch sends its descriptor
        payload.size = len(data) + payload.nbytes
        payload._return = weakref.finalize(payload, os.close, fd)
        payload._return.atexit = False
        return payload

    @property
    def shared(self) -> bool:
        """Whether it has buffers that cross in shared memory (a region to send and release)."""
        return self.nbytes > 0

    def place(self, pool: RegionPool) -> int:
        """The descriptor of the region holding the buffers (copied in now if
        they are not yet), or -1 if there are none."""
        region = self.region
        if region is None:
            if not self.buffers:
                return -1
            region = pool.take(self.nbytes + ALIGN * len(self.buffers))
            try:
                self.spans = region.place(self.buffers)
            except BaseException:
                pool.give(region)
                raise
            self.buffers = []
            self.region = region
            self._return = weakref.finalize(self, pool.give_later, region)
            self._return.atexit = False  # at exit (or in a forked child) there is nothing to give back to
        return region.fd

    def loads(self, what: str) -> Any:
        """Unpickle in this process (the inline pool, whose payloads hold their
        buffers in private memory): the buffers as they are."""
        return loads(self.data, what, [b.raw().toreadonly() for b in self.buffers])

    def release(self, pool: RegionPool) -> None:
        """Give the region back to ``pool``: no process reads it any more."""
        self.buffers = []
        self.nbytes = 0
        if self.region is not None:
            self._return.detach()  # type: ignore[union-attr]
            pool.give(self.region)
            self.region = None


    def abandon(self) -> None:
        """Close the region without giving it back: another process may still
        write or read it (a pool host's job cancelled while it ran)."""
        self.buffers = []
        self.nbytes = 0
        region, self.region = self.region, None
        if region is not None:
            self._return.detach()  # type: ignore[union-attr]
            region.close()


def pickle_call(
    args: tuple, kwargs: dict, fn_name: str, threshold: int | None, limit: int | None, pool: RegionPool | None = None
) -> Payload:
    """The arguments of a call of ``fn_name`` as a :class:`Payload` (see :func:`pickle_payload`).
    Scalars only, the common small job, take the short way: they hold no
    buffer and name nothing by reference, so one plain pickle does."""
    for arg in args:
        if type(arg) not in SCALAR_TYPES:
            break
    else:
        for arg in kwargs.values():
            if type(arg) not in SCALAR_TYPES:
                break
        else:
            return Payload(pickle.dumps((args, kwargs), PROTOCOL))
    return pickle_payload((args, kwargs), f"the arguments of {fn_name}", threshold, limit, pool)


def pickle_payload(
    obj: Any, what: str, threshold: int | None, limit: int | None, pool: RegionPool | None = None
) -> Payload:
    """Pickle ``obj`` keeping its buffers of ``threshold`` bytes or more aside,
    copied now (see :class:`Payload`): into a region of ``pool`` if given,
    else into private memory. Shared memory that cannot be had (out of
    memory or descriptors) sends everything through the pipe, with one log
    line saying so."""
    data, buffers = pickle_out_of_band(obj, what, threshold, limit)
    if not buffers:
        return Payload(data)
    if pool is None:
        return Payload(data, [pickle.PickleBuffer(bytearray(buffer.raw())) for buffer in buffers])
    payload = Payload(data, buffers)
    try:
        payload.place(pool)
    except OSError as exc:
        warn_once("memfd", "mlpool: shared memory unavailable (%s); large buffers go through the pipe", exc)
        return Payload(pickle_out_of_band(obj, what, None, None)[0])
    return payload


def read_result(
    data: bytes, spans: Spans, where: int, fd: int, offered: Region | None, pool: RegionPool, what: str
) -> Any:
    """Parent side: unpickle a result (see :func:`result_buffers`)."""
    # On failure (any BaseException becomes a SerializationError there) its
    # buffers are garbage at once: a lent region goes back.
    return loads(data, what, result_buffers(spans, where, fd, offered, pool))


def result_buffers(
    spans: Spans, where: int, fd: int, offered: Region | None, pool: RegionPool
) -> list[memoryview] | None:
    """Parent side: a result's out-of-band buffers, None if it has none.
    ``offered`` (the room offered for it, if any) and ``fd`` (the file the
    worker made, for NEW_FILE) are this function's to release, whatever
    happens. Buffers under COPY_BELOW bytes in all are copied out and their
    region goes back to ``pool`` at once; larger ones are views on their
    region (no copy), which goes back when the views are garbage."""
    region: Region | None = None
    if where == NEW_FILE:
        try:
            region = Region(os.fstat(fd).st_size, fd)  # adopted: its pages exist, reusing them is cheap
        finally:
            if offered is not None:  # the result did not fit there
                pool.give(offered)
    elif where == OFFERED:
        region = offered
    elif offered is not None:
        pool.give(offered)
    if region is None:
        return None
    extent = spans[-1][0] + spans[-1][1] if spans else 0
    if extent >= COPY_BELOW:
        return region.lend(spans, pool)
    copy = memoryview(bytearray(region.view[:extent]))
    pool.give(region)
    return [copy[offset : offset + length] for offset, length in spans]


_PROT = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc: Any = None


def _mmap(fd: int, size: int) -> int:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _libc = libc
    address = _libc.mmap(None, size, _PROT, mmap.MAP_SHARED | POPULATE, fd, 0)
    if address is None or address == _MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mmap of {size} bytes of shared memory failed: {os.strerror(errno)}")
    return address


def _munmap(address: int, size: int) -> None:
    _libc.munmap(address, size)
