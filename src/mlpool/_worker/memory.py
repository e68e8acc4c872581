"""The worker's memory check against ``max_memory_per_worker`` (runs in a worker)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mlpool._wire.protocol import OverMemory, encode

if TYPE_CHECKING:
    from mlpool._worker.main import WorkerSettings

Reply = tuple[bytes, list[int]]  # an encoded frame and the descriptors to send with it


class MemoryWatch:
    """Reports, once, that this worker passed max_memory_per_worker (the
    parent then replaces it, once its jobs are done).

    A reading costs at most about 1% of the worker's time, whatever it
    costs: reading ``/proc/self/statm`` takes microseconds, reading
    ``/proc/self/smaps_rollup`` (``share_models``) 1-5 ms in a process that
    imported torch. With ``cost`` the last reading's duration:

    - after a job of at least 100 x cost: read before its result goes (1% of
      its latency), so an OverMemory goes with the result and the parent
      gives this worker nothing more (the jobs that grow memory are seldom
      quick);
    - after a job of at least 10 x cost: read right after its result;
    - after a quicker job: right after its result, once 100 x cost (at most
      1 s) passed since the last reading.
    """

    COST_RATIO = 100
    AFTER_RATIO = 10
    MAX_INTERVAL = 1.0  # seconds

    def __init__(self, settings: WorkerSettings) -> None:
        self.limit = settings.memory_limit
        self._read = _memory_reader(settings.private_memory) if self.limit is not None else None
        self._cost = 0.0  # seconds the last reading took
        self._last = float("-inf")  # monotonic time of the last reading

    @property
    def watching(self) -> bool:
        """Whether readings are taken at all (a limit set, and not passed yet)."""
        return self._read is not None

    def long_job(self, job_seconds: float) -> bool:
        """Whether a job this long is worth a reading before its result goes."""
        return self._read is not None and job_seconds >= self.COST_RATIO * self._cost

    def check(self, job_seconds: float = 0.0) -> list[Reply]:
        """After a job that took ``job_seconds``: an OverMemory reply the first
        time the limit is passed, else nothing (see the class docstring)."""
        if self._read is None:
            return []
        now = time.monotonic()
        cost = self._cost
        if job_seconds < self.AFTER_RATIO * cost and now < self._last + min(self.MAX_INTERVAL, self.COST_RATIO * cost):
            return []
        rss = self._read()
        self._last = now
        self._cost = time.monotonic() - now
        if self.limit is None or rss <= self.limit:
            return []
        self._read = None
        return [(encode(OverMemory(rss)), [])]


def _memory_reader(private: bool) -> Callable[[], int]:
    """A cheap reader of this process's memory: resident bytes, or with
    ``private`` the bytes no other process shares (what a forked worker adds
    to the template's models)."""
    if private:
        try:
            rollup = open("/proc/self/smaps_rollup", "rb", buffering=0)
        except OSError:
            import psutil

            process = psutil.Process()
            return lambda: process.memory_full_info().uss

        def from_rollup() -> int:
            rollup.seek(0)
            kib = 0
            for line in rollup.read().splitlines():
                if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    kib += int(line.split()[1])
            return kib * 1024

        return from_rollup

    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        statm = open("/proc/self/statm", "rb", buffering=0)
    except OSError:
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss

    def from_statm() -> int:
        statm.seek(0)
        return int(statm.read().split()[1]) * page

    return from_statm
