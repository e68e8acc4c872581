"""The "started" word: which job a worker last began, readable after it died.

The parent makes one 8-byte shared-memory file per worker
(:meth:`LastStarted.create`) and sends its descriptor as the worker's first
message (``Setup``, see ``_wire.protocol``), before the worker even starts. Each
time the worker takes a job off its queue to begin it (before unpickling the
arguments), it stores the job id there (little-endian uint64 at offset 0; for
a batch, its first job's id). When the worker dies, the parent reads the word:
a job it holds whose id is past the word never started, and can be requeued
whatever its retries say.

Job ids start at 1, so 0 means "no job started yet". A word costs each side
one descriptor while mapped (Python's mmap keeps a duplicate). Where memfd is missing
(not Linux) the word is a no-op and :meth:`LastStarted.read` returns -1
(unknown). Imported by both sides; imports nothing from mlpool.
"""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ["LastStarted", "UNKNOWN"]

UNKNOWN = -1  # read() where there is no shared word
_WORD = struct.Struct("<Q")


class LastStarted:
    """An 8-byte shared word holding the id of the job a worker last began."""

    __slots__ = ("_map",)

    def __init__(self, fd: int = -1) -> None:
        """Map the word in ``fd`` (not closed here); -1: a no-op word."""
        self._map: mmap.mmap | None = None
        if fd >= 0:
            self._map = mmap.mmap(fd, _WORD.size, flags=mmap.MAP_SHARED)

    @classmethod
    def create(cls) -> tuple[int, LastStarted]:
        """Parent side: a new word (0: nothing started) and its descriptor.

        Send the descriptor to the worker (``setup_frame(fd)``), then close
        it: the word stays mapped. Without memfd: ``(-1, a no-op word)``; do
        not send a Setup then.
        """
        if not hasattr(os, "memfd_create"):
            return -1, cls()
        fd = os.memfd_create("mlpool-started", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _WORD.size)
            return fd, cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> LastStarted:
        """Worker side: map the word the parent sent, and close its descriptor."""
        try:
            return cls(fd)
        finally:
            os.close(fd)

    def write(self, job_id: int) -> None:
        """Record that the job ``job_id`` begins now (worker side)."""
        if self._map is not None:
            _WORD.pack_into(self._map, 0, job_id)

    def read(self) -> int:
        """The id of the last job begun, 0 if none, UNKNOWN (-1) without a word."""
        if self._map is None:
            return UNKNOWN
        return _WORD.unpack_from(self._map, 0)[0]

    def close(self) -> None:
        """Unmap the word (idempotent); read() returns UNKNOWN afterwards."""
        if self._map is not None:
            self._map.close()
            self._map = None
