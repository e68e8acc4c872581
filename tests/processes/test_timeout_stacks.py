"""A timed-out job's stack is taken outside the engine's lock: a worker slow to
answer its dump request never holds up the pool's other callers."""

from __future__ import annotations

import threading

import pytest
from helpers.workloads import add, load_constant

import mlpool
from mlpool import JobTimeoutError, MLPool


def hold_dump_requests(model: dict, requested: str, go: str) -> None:
    """Take this worker's dump requests (see mlpool._processes.stacks) and answer the
    first only once the test says go, as faulthandler would have."""
    import faulthandler
    import os
    import signal

    fd = signal.set_wakeup_fd(-1)  # the stack pipe; Python's handler no longer writes to it
    got: list[int] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))  # replaces faulthandler's
    while not got:
        signal.pause()  # until the pool asks for this worker's stack (the job's deadline passed)
    with open(requested) as f:
        f.read()
    with open(go) as f:
        f.read()
    faulthandler.dump_traceback(file=fd, all_threads=True)
    os.write(fd, bytes([signal.SIGUSR2]))  # the end of a dump
    while True:
        signal.pause()  # until the pool kills this worker


@pytest.mark.timeout(90)
def test_a_worker_slow_to_give_its_stack_never_holds_up_the_other_callers(fifo, monkeypatch):
    # The pool would wait a minute for this worker's stack (the default is half a second).
    monkeypatch.setattr(mlpool._processes.stacks, "KILL_STACK_TIMEOUT", 60.0)
    monkeypatch.setattr(mlpool._engine.engine, "KILL_STACK_TIMEOUT", 60.0, raising=False)
    requested, go = fifo(), fifo()
    with MLPool({"m": load_constant}, nb_workers=2) as pool:
        late = pool.options(timeout=1.0).submit("m", hold_dump_requests, str(requested), str(go))
        requested.release()  # the deadline passed and the pool asked for the worker's stack
        served: list[int] = []
        caller = threading.Thread(target=lambda: served.append(pool.score("m", add, 1)), daemon=True)
        caller.start()
        caller.join(20)
        go.release()  # the stack comes now
        with pytest.raises(JobTimeoutError) as info:
            late.result(timeout=60)
        caller.join(60)
        assert served == [11], "a caller waited on the pool while it took a timed-out job's stack"
        assert pool.score("m", add, 2) == 12
    notes = "\n".join(getattr(info.value, "__notes__", ())) or str(info.value)
    assert "hold_dump_requests" in notes  # the line the job was on
