"""Deadlines a pool host did not keep.

The host enforces every job's deadline (an expired job fails, its worker is
replaced). A host that is stopped (SIGSTOP) or hung answers nothing: a job
whose deadline passed ``MARGIN`` seconds ago with no answer fails here, in
the API process, so that a caller's wait with a timeout always ends. One
thread, started with the first job that has a deadline, waits on a
condition until the earliest one.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable

from mlpool.errors import JobTimeoutError

MARGIN = 2.0  # seconds past a deadline the host has to say so itself


class Watchdog:
    """Calls ``overdue(job_id)`` for each watched job ``MARGIN`` s after its deadline
    (the engine ignores the jobs answered meanwhile)."""

    def __init__(self, overdue: Callable[[int], None]) -> None:
        self._overdue = overdue
        self._heap: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, deadline: float, job_id: int) -> None:
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (deadline + MARGIN, job_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlpool-shared-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == job_id:
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                due, job_id = self._heap[0]
                left = due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                self._cond.release()
                try:
                    self._overdue(job_id)
                finally:
                    self._cond.acquire()


def overdue_error(job_id: int, fn_name: str, host_pid: int) -> JobTimeoutError:
    return JobTimeoutError(
        f"job {job_id} ({fn_name}) passed its timeout and the pool host (pid {host_pid}) did not answer within "
        f"{MARGIN:g} s more: it may be stopped or hung"
    )
