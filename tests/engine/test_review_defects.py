"""The third outside review (#24.6): a stream read on another event loop, a
streaming client that leaves, a process forked after the pool started, and
cancelled queued jobs of a session. Each test failed on the code before its
fix, except the last two: they guard what the fix of the last one added
(a batch whose jobs all left)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi import Depends, FastAPI, Request
from helpers import leaving
from helpers import stream_workloads as sw
from helpers.markers import Markers
from helpers.pools import make_pool
from helpers.workloads import batch_echo, echo, load_constant, wait_for_release

from mlpool import MLPool
from mlpool._engine.batching import BatchPolicy
from mlpool._engine.jobs import Job, JobState
from mlpool._engine.regions import Payload
from mlpool._engine.scheduler import Scheduler
from mlpool.fastapi import get_pool, install_error_handlers, pool_lifespan, stream_response

TESTS = Path(__file__).resolve().parent.parent
SRC = TESTS.parent / "src"
# Bounds a wait that must not hang; the end comes long before it on any machine.
HANG = 60.0


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool({"m": load_constant}, nb_workers=1, max_retries=0, stream_buffer=4) as pool:
        yield pool


# ------------------------------------------ 1. a stream read on another loop


def _made_on_a_loop_that_stops(make, *, close: bool, started: bool):
    """What ``make()`` returns, called in a coroutine of a loop that then stops
    (and closes, with ``close``); ``started``: its first item read there."""
    first = asyncio.new_event_loop()

    async def opened():
        stream = make()
        return stream, (await stream.__anext__() if started else None)

    try:
        return first.run_until_complete(opened())
    finally:
        if close:
            first.close()


async def _drain(stream) -> list:
    async def read() -> list:
        return [item async for item in stream]

    return await asyncio.wait_for(read(), HANG)


@pytest.mark.parametrize("close", [False, True], ids=["stopped", "closed"])
@pytest.mark.parametrize("started", [False, True], ids=["unstarted", "started"])
def test_an_async_stream_read_on_another_loop_ends(pool, close, started):
    make = lambda: pool.stream_async("m", sw.count, 10)  # noqa: E731
    stream, first = _made_on_a_loop_that_stops(make, close=close, started=started)
    rest = asyncio.run(_drain(stream))
    assert ([first] if started else []) + rest == list(range(10))


def test_an_async_stream_read_on_another_loop_raises_its_generators_error(pool, caplog):
    make = lambda: pool.stream_async("m", sw.raise_after, 3)  # noqa: E731
    stream, first = _made_on_a_loop_that_stops(make, close=True, started=True)
    with pytest.raises(ValueError, match="after 3"):
        asyncio.run(_drain(stream))
    del stream
    gc.collect()
    assert "never retrieved" not in caplog.text  # the job's asyncio handle: read through the stream


def test_an_async_stream_read_on_another_loop_ends_when_its_session_closes(pool, fifo):
    gate = fifo()
    session = pool.session()
    make = lambda: session.stream_async("m", sw.first_then_gate, str(gate))  # noqa: E731
    stream, first = _made_on_a_loop_that_stops(make, close=True, started=True)
    assert first == "first"

    async def read() -> list:
        reading = asyncio.ensure_future(_drain(stream))
        await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)
        session.close()  # from this loop's thread; the stream's end must reach this loop
        return await reading

    with pytest.raises(asyncio.CancelledError, match="session closed"):
        asyncio.run(read())
    gate.release_opened()


def test_an_inline_async_stream_read_on_another_loop_ends():
    with MLPool({"m": load_constant}, nb_workers=0) as inline:
        make = lambda: inline.stream_async("m", sw.count, 5)  # noqa: E731
        stream, first = _made_on_a_loop_that_stops(make, close=True, started=True)
        assert [first, *asyncio.run(_drain(stream))] == list(range(5))


# ------------------------------------- 2. a streaming client that leaves


@pytest.fixture
def markers(tmp_path):
    m = Markers(tmp_path / "markers")
    yield m
    m.close()


class _Served:
    """A FastAPI app with a streaming endpoint, served by uvicorn on loopback in
    a thread of this process (its log records reach caplog); ``finished`` is
    set when the ASGI call of a request to ``/s`` returned."""

    def __init__(self) -> None:
        app = FastAPI(lifespan=pool_lifespan({"m": load_constant}, nb_workers=1))
        install_error_handlers(app)

        @app.get("/s")
        async def stream(markers: str, gate: str, request: Request, pool: MLPool = Depends(get_pool)):
            return await stream_response(pool.stream_async("m", leaving.gated, markers, gate), request)

        @app.get("/ready")
        async def ready() -> str:
            return "ready"

        self.finished = threading.Event()

        async def tracked(scope, receive, send) -> None:
            try:
                await app(scope, receive, send)
            finally:
                if scope["type"] == "http" and scope["path"] == "/s":
                    self.finished.set()

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)  # a client connects at once; uvicorn accepts once its lifespan started
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(tracked, log_level="debug", access_log=False, lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as client:  # served once started
            client.sendall(b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert client.makefile("rb").readline().startswith(b"HTTP/1.1 200")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(60)
        self._sock.close()
        assert not self._thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def served():
    served = _Served()
    try:
        yield served
    finally:
        served.stop()


def _leave(served: _Served, markers: Markers, gate, *, first: bool) -> None:
    """A client asks for a stream and drops the connection once its generator
    started (blocked before its first item on ``gate``), or once the first item
    came (``first``: the generator then yields for ever); the test waits
    until the generator stopped and the server is done with the request."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as client:
        query = f"markers={markers}&gate={'' if first else gate}"
        client.sendall(f"GET /s?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        markers.until("started")
        if first:
            received = b""
            while b"first" not in received:
                chunk = client.recv(4096)
                assert chunk, "the server closed the connection before the first item"
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")
    if not first:
        gate.release()  # the generator runs on to its first yield, where the closed stream stops it
    markers.until("finally")
    assert served.finished.wait(30), "the server never finished the request of the client that left"


@pytest.mark.parametrize("first", [False, True], ids=["before-the-first-item", "after-it"])
def test_a_streaming_client_that_leaves_is_a_normal_end_logged_at_debug_at_most(served, markers, fifo, caplog, first):
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        served.finished.clear()
        mark = len(caplog.records)
        _leave(served, markers, fifo(), first=first)
        # uvicorn's access log (INFO) is the server's, for every request
        loud = [r for r in caplog.records[mark:] if r.levelno > logging.DEBUG and r.name != "uvicorn.access"]
        assert not loud, [f"{r.name} {r.levelname}: {r.getMessage()}" for r in loud]


# --------------------------- 3. a process forked after the pool started

_FORKING_SCRIPT = """
import ctypes, os, sys
import numpy as np
from mlpool import MLPool
from helpers.workloads import add, echo_plus_one, load_constant, pid

SHARE, SHUTDOWN, HOW = sys.argv[1] == "share", sys.argv[2] == "shutdown", sys.argv[3]


def main() -> None:
    pool = MLPool({"m": load_constant}, 2, share_models=SHARE)
    workers = {pool.score("m", pid) for _ in range(8)}
    big = np.arange(2**20)  # crosses in shared memory, both ways
    assert (pool.score("m", echo_plus_one, big) == big + 1).all()
    # "c": forked in C (an extension, ctypes), which runs no at-fork hook
    child = ctypes.CDLL(None).fork() if HOW == "c" else os.fork()
    if child == 0:  # the child of a server or helper that forks: it exits normally
        if HOW != "return":
            pool.shutdown(timeout=3600)  # the parent's pool: nothing to stop, nothing to wait for
            sys.exit(0)
        return  # off the end of the script
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert pool.score("m", add, 2, 3) == 15  # the pool serves on, its workers untouched
    assert (pool.score("m", echo_plus_one, big) == big + 1).all()
    for worker in workers:
        os.kill(worker, 0)
    print("parent done", flush=True)
    if SHUTDOWN:
        pool.shutdown()


if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("how", ["exit", "return", "c"])
@pytest.mark.parametrize("shutdown", ["shutdown", "never-shut-down"])
@pytest.mark.parametrize("share", ["spawn", "share"])
def test_a_child_forked_after_the_pool_started_exits_silently(tmp_path, share, shutdown, how):
    script = tmp_path / "forks.py"
    script.write_text(_FORKING_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(script), share, shutdown, how],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == "parent done\n"
    for symptom in ("Exception ignored", "AssertionError", "process object is closed", "Traceback"):
        assert symptom not in run.stderr, run.stderr


# ------------------------------ 4. cancelled queued jobs leave the queue

BIG = 1_000_000  # bytes of each job's argument: a payload worth freeing


def _payloads(futures) -> list[weakref.ref]:
    """Weak references to the payloads (the pickled arguments) of the jobs of ``futures``."""
    return [weakref.ref(future._job.payload) for future in futures]


def _alive(payloads: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in payloads)


@contextlib.contextmanager
def _worker_held(pool, fifo):
    """The pool's one worker blocked on a job until the block ends: what is
    submitted meanwhile waits in the queue."""
    gate = fifo()
    blocker = pool.submit("m", wait_for_release, str(gate))
    gate.wait_running()
    try:
        yield
    finally:
        gate.release_opened()
        blocker.result(HANG)


@pytest.mark.parametrize("fn", [echo, batch_echo], ids=["plain", "batched"])
def test_a_closed_sessions_queued_jobs_leave_the_queue_with_their_payloads(pool, fifo, fn):
    with _worker_held(pool, fifo):
        others = [pool.submit("m", fn, i) for i in range(3)]  # live jobs of no session, queued before and after
        session = pool.session()
        futures = [session.submit("m", fn, bytes(BIG)) for _ in range(20)]
        others += [pool.submit("m", fn, i) for i in range(3, 6)]
        payloads = _payloads(futures)
        assert _alive(payloads) == 20
        assert session.close() == 20
        del futures
        assert _alive(payloads) == 0  # was 20: the lanes held them until a plan walked past
        assert pool.stats().queue_depth == 6
    results = [future.result(HANG) for future in others]
    assert results == (list(range(6)) if fn is echo else [(i, results[i][1]) for i in range(6)])


@pytest.mark.parametrize("fn", [echo, batch_echo], ids=["plain", "batched"])
def test_queued_jobs_cancelled_in_any_order_leave_an_idle_queue_empty(pool, fifo, fn):
    with _worker_held(pool, fifo):
        futures = [pool.submit("m", fn, bytes(BIG)) for _ in range(20)]
        payloads = _payloads(futures)
        for future in random.Random(24).sample(futures, len(futures)):
            assert future.cancel()
        del futures, future
        assert _alive(payloads) == 0
        assert pool.stats().queue_depth == 0


@pytest.mark.parametrize("fn", [echo, batch_echo], ids=["plain", "batched"])
def test_queued_jobs_cancelled_between_live_ones_never_outnumber_them(pool, fifo, fn):
    with _worker_held(pool, fifo):
        futures = [pool.submit("m", fn, bytes(BIG)) for _ in range(40)]
        payloads = _payloads(futures)
        live, cancelled = futures[0::4], [f for i, f in enumerate(futures) if i % 4]
        for future in cancelled:  # each one between two live jobs, or next to another cancelled one
            assert future.cancel()
        del futures, cancelled, future
        # Dropped once they make up half of their FIFO (amortised O(1) a cancel).
        assert _alive(payloads) - len(live) <= len(live)  # was 30 cancelled ones held, for 10 live
        assert pool.stats().queue_depth == 10
    results = [future.result(HANG) for future in live]
    assert [r if fn is echo else r[0] for r in results] == [bytes(BIG)] * 10


_job_ids = itertools.count(1)


def _queued(lane_token: object = None, *, policy=None) -> Job:
    made = Job(next(_job_ids), "m", 1, b"", Payload(b"args"), "f", deadline=None, retries=0,
               batch_policy=policy, lane=lane_token)  # fmt: skip
    return made


def _cancel(scheduler: Scheduler, job: Job) -> None:
    """What the engine does with a queued job that is cancelled."""
    scheduler.withdraw(job)
    job.state = JobState.FINISHED


def _plan_all(scheduler: Scheduler) -> list[int]:
    """Every job the plan hands out, to workers that take anything."""
    taken: list[int] = []
    while scheduler:
        free = SimpleNamespace(inflight=[], backlog=0.0, pipe=SimpleNamespace(read_by=None), group="")
        for _, jobs, _ in scheduler.plan([free], None, 0.0, lambda: False, lambda here: False):
            taken += [job.id for job in jobs]
            for job in jobs:
                job.state = JobState.RUNNING
    return taken


def test_an_emptied_batch_between_live_jobs_keeps_its_place_and_takes_new_jobs():
    scheduler = Scheduler()
    policy = BatchPolicy(max_batch_size=4, max_wait=0.0)
    before, batched, after = _queued(), _queued(policy=policy), _queued()
    for job in (before, batched, after):
        scheduler.push(job)
    _cancel(scheduler, batched)  # its batch, in the middle of the lane, is left empty there
    again = _queued(policy=policy)
    scheduler.push(again)  # goes to that batch, which still has its place
    assert _plan_all(scheduler) == [before.id, again.id, after.id]


def test_an_emptied_batch_at_the_end_of_its_lane_goes_and_a_new_one_forms():
    scheduler = Scheduler()
    policy = BatchPolicy(max_batch_size=4, max_wait=0.0)
    before, batched = _queued(), _queued(policy=policy)
    scheduler.push(before)
    scheduler.push(batched)
    _cancel(scheduler, batched)
    lane = scheduler._models["m"].default
    assert list(lane.entries) == [before]  # the batch went with its last job
    again = _queued(policy=policy)
    scheduler.push(again)
    assert _plan_all(scheduler) == [before.id, again.id]
