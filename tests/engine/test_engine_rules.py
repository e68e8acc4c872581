"""Rules of the engine that each broke once: outcomes counted once, retiring
workers stopped, long deadlines served, an idle manager that uses no CPU."""

from __future__ import annotations

import errno
import logging
import multiprocessing.process
import os
import signal
import threading
import time
from concurrent.futures import CancelledError

import psutil
import pytest
from helpers.workloads import add, load_constant, pid, wait_for_release

import mlpool
from mlpool import MLPool, PoolClosedError


@mlpool.batched(max_batch_size=6, max_wait_ms=100)
def batch_pids(model: dict, items: list) -> list:
    return [os.getpid()] * len(items)


@mlpool.batched(max_batch_size=8, max_wait_ms=300)
def batch_plus_one(model: dict, items: list) -> list:
    return [item + 1 for item in items]


def outcome_total(stats: mlpool.PoolStats) -> int:
    return (stats.jobs_completed + stats.jobs_failed + stats.jobs_crashed
            + stats.jobs_timed_out + stats.jobs_cancelled)  # fmt: skip


@pytest.mark.timeout(60)
def test_jobs_failed_by_a_timed_out_shutdown_are_counted_once(fifo):
    pool = MLPool({"m": load_constant}, nb_workers=1)
    gate = fifo()
    futures = [pool.submit("m", wait_for_release, str(gate))]
    gate.wait_running()
    futures += [pool.submit("m", add, i) for i in range(3)]
    pool.shutdown(timeout=0.2)
    for future in futures:
        with pytest.raises(PoolClosedError):
            future.result(timeout=30)
    stats = pool.stats()
    assert outcome_total(stats) == 4
    assert stats.latency_count == 4


@pytest.mark.timeout(60)
def test_every_kind_of_outcome_is_counted_once(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        assert pool.score("m", add, 1) == 11
        with pytest.raises(ValueError):
            pool.score("m", mlpool_raise, "no")
        gate = fifo()
        running = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        queued = pool.submit("m", add, 2)
        assert queued.cancel()
        gate.release_opened()
        assert running.result(timeout=30) is not None
        stats = pool.stats()
        assert (stats.jobs_completed, stats.jobs_failed, stats.jobs_cancelled) == (2, 1, 1)
        assert outcome_total(stats) == 4


def mlpool_raise(model: dict, message: str) -> None:
    raise ValueError(message)


@pytest.mark.timeout(90)
def test_a_worker_retired_in_the_middle_of_a_batch_is_stopped(fifo):
    with MLPool({"m": load_constant}, nb_workers=1, max_jobs_per_worker=3) as pool:
        seen: set[int] = set()
        for _ in range(4):
            gate = fifo()
            blocker = pool.submit("m", wait_for_release, str(gate))
            gate.wait_running()
            batch = [pool.submit("m", batch_pids, i) for i in range(6)]
            gate.release_opened()
            blocker.result(timeout=30)
            seen.update(f.result(timeout=30) for f in batch)
        current = pool.score("m", batch_pids, 0)
        old = [psutil.Process(p) for p in seen - {current} if psutil.pid_exists(p)]
        _, alive = psutil.wait_procs(old, timeout=20)
        assert not alive, f"retired workers never stopped: {alive}"
        assert pool.stats().workers_alive == 1


@pytest.mark.timeout(60)
def test_deadlines_of_weeks_and_years_are_served():
    with MLPool({"m": load_constant}, nb_workers=1, result_ttl=1e8, start_timeout=1e8,
                job_timeout=30 * 86400) as pool:  # fmt: skip
        assert pool.score("m", add, 1) == 11
        job_id = pool.create_job(add, "m", args=(2,), timeout=1e9)
        assert pool.get_result(job_id, timeout=30) == 12
        assert pool.healthy


@pytest.mark.timeout(60)
def test_a_shutdown_drain_after_a_held_batch_does_not_spin_the_manager(fifo):
    pool = MLPool({"m": load_constant}, nb_workers=2)
    first, second = fifo(), fifo()
    one = pool.submit("m", wait_for_release, str(first))
    first.wait_running()
    held = pool.submit("m", batch_plus_one, 1)  # waits for more items: the other worker is busy
    two = pool.submit("m", wait_for_release, str(second))  # takes the idle worker
    second.wait_running()
    pool.shutdown(wait=False, cancel_pending=True)  # the held batch is cancelled; the drain waits for the FIFOs
    with pytest.raises(CancelledError):
        held.result(timeout=30)
    me = psutil.Process()
    before = sum(me.cpu_times()[:2])
    time.sleep(1.0)  # a measurement window, not synchronisation
    used = sum(me.cpu_times()[:2]) - before
    first.release_opened()
    second.release_opened()
    one.result(timeout=30), two.result(timeout=30)
    pool.shutdown()
    assert used < 0.2, f"the manager used {used:.2f}s of CPU in 1s of draining"


class CountingHandler(logging.Handler):
    """Sets ``reached`` once ``needed`` records containing ``text`` were logged."""

    def __init__(self, text: str, needed: int) -> None:
        super().__init__()
        self.text, self.needed, self.seen = text, needed, 0
        self.reached = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen += 1
            if self.seen >= self.needed:
                self.reached.set()


@pytest.mark.timeout(90)
def test_a_brief_descriptor_shortage_never_breaks_the_pool(fifo, descriptor_limit):
    with MLPool({"m": load_constant}, nb_workers=2) as pool:
        victim = pool.score("m", pid)
        failures = CountingHandler("could not start a worker process", needed=6)
        logger = logging.getLogger("mlpool")
        logger.addHandler(failures)
        try:
            with descriptor_limit(12):
                os.kill(victim, signal.SIGKILL)
                assert failures.reached.wait(60), "the replacement never failed to start"
                assert pool.healthy
        finally:
            logger.removeHandler(failures)
        assert pool.score("m", add, 1) == 11
        # Descriptors are back: the replacement starts, both workers serve at once.
        gates = [fifo(), fifo()]
        futures = [pool.submit("m", wait_for_release, str(gate)) for gate in gates]
        for gate in gates:
            gate.wait_running(timeout=60)
        for gate in gates:
            gate.release_opened()
        assert len({future.result(timeout=30) for future in futures} - {victim}) == 2


@pytest.mark.timeout(10)  # it waited 16 s for a manager thread blocked with nothing to wait for
def test_a_pool_whose_workers_cannot_start_raises_at_once_and_leaves_no_thread(monkeypatch):
    def cannot_start(process):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", cannot_start)
    with pytest.raises(mlpool.ModelLoadError, match="could not start a worker process"):
        MLPool({"m": load_constant}, nb_workers=1)
    assert not [t for t in threading.enumerate() if t.name.startswith("mlpool")]
