"""mlpool.fastapi's error mapping over real HTTP and WebSockets (issue #19.16, #19.17),
and a lifespan whose start Ctrl-C can end (#19.20)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import psutil
import pytest
import websockets
from helpers.server import TESTS, UvicornServer

from mlpool.fastapi import RETRY_AFTER_MAX, RETRY_AFTER_STARTING


@pytest.fixture
def server():
    """errors_app: one worker, a queue of 100, fixed error details; one per test,
    so each starts with no recent pace (Retry-After depends on it)."""
    server = UvicornServer("helpers.errors_app:app", TESTS)
    try:
        yield server
    finally:
        assert not server.stop()


@pytest.fixture(scope="module")
def shared_server():
    """errors_app as ``server`` has it, one for the tests that do not depend on the
    recent pace; each leaves its worker serving (a crashed one is replaced)."""
    server = UvicornServer("helpers.errors_app:app", TESTS)
    try:
        yield server
    finally:
        assert not server.stop()


def post_block(url: str, fifo) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/run/block", params={"arg": str(fifo)})


def ws_url(server: UvicornServer) -> str:
    return server.url.replace("http", "ws") + "/ws"


def close_of(server: UvicornServer, *messages: dict) -> tuple[int, str, list]:
    """Send ``messages`` on one WebSocket; the answers and the close frame the server sent."""

    async def main():
        answers = []
        async with websockets.connect(ws_url(server)) as ws:
            for message in messages:
                await ws.send(json.dumps(message))
            try:
                while True:
                    answers.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None, "the server closed without a close frame"
                return closed.rcvd.code, closed.rcvd.reason, answers

    return asyncio.run(main())


def test_websocket_pool_error_closes_with_1011_and_a_reason(shared_server):
    server, mark = shared_server, shared_server.log_mark()
    code, reason, answers = close_of(server, {"fn": "add", "arg": 1}, {"fn": "crash"})
    assert answers == [{"result": 11}]
    assert code == 1011
    assert reason.startswith("WorkerCrashedError:") and "pid" not in reason
    server.wait_for_log("WorkerCrashedError", since=mark)  # the detail is in the log
    with httpx.Client(base_url=server.url, timeout=30) as client:  # a replacement serves
        assert client.post("/run/add", params={"arg": 2}).json() == {"result": 12}


def test_websocket_full_queue_closes_with_1013(shared_server, fifo):
    server, gate = shared_server, fifo()
    blocked = threading.Thread(target=post_block, args=(server.url, gate), daemon=True)
    blocked.start()
    gate.wait_running()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/fill", params={"n": 100}).status_code == 200
        code, reason, _ = close_of(server, {"queue": True})
        assert (code, reason.split(":")[0]) == (1013, "PoolFullError")
    finally:
        gate.release_opened()
        blocked.join(30)


def test_full_queue_and_waiting_for_room_are_503_with_retry_after(server, fifo):
    gate = fifo()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(3):  # the recent pace: 0.2 s per job on one worker
            assert client.post("/run/spin", params={"arg": 0.2}).status_code == 200
        blocked = threading.Thread(target=post_block, args=(server.url, gate), daemon=True)
        blocked.start()
        gate.wait_running()
        try:
            assert client.post("/fill", params={"n": 100}).status_code == 200  # 100 x 0.2 s: 20 s to drain
            full = client.post("/fill", params={"n": 1})
            assert full.status_code == 503 and full.json()["error"] == "PoolFullError"
            assert 15 <= int(full.headers["retry-after"]) <= RETRY_AFTER_MAX
            # waiting for room past the job's deadline is the same overload: 503, not 504
            waited = client.post("/wait-for-room", params={"timeout": 0.2})
            assert waited.status_code == 503 and waited.json()["error"] == "JobTimeoutError"
            assert 15 <= int(waited.headers["retry-after"]) <= RETRY_AFTER_MAX
        finally:
            gate.release_opened()
            blocked.join(30)
        assert client.post("/run/add", params={"arg": 1}).json() == {"result": 11}


def test_retry_after_never_exceeds_the_cap(server, fifo):
    gate = fifo()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/run/spin", params={"arg": 1.5}).status_code == 200  # the pace: 1.5 s per job
        blocked = threading.Thread(target=post_block, args=(server.url, gate), daemon=True)
        blocked.start()
        gate.wait_running()
        try:
            assert client.post("/fill", params={"n": 100}).status_code == 200
            full = client.post("/fill", params={"n": 1})
            assert full.status_code == 503
            assert int(full.headers["retry-after"]) == RETRY_AFTER_MAX
        finally:
            gate.release_opened()
            blocked.join(30)


def test_caller_wait_timing_out_is_504(shared_server):
    with httpx.Client(base_url=shared_server.url, timeout=30) as client:
        response = client.post("/caller-timeout", params={"seconds": 0.5})
        assert response.status_code == 504
        assert response.json()["error"] == "TimeoutError"


def test_error_bodies_name_no_pid_or_function(shared_server):
    with httpx.Client(base_url=shared_server.url, timeout=30) as client:
        pids = {str(p.pid) for p in shared_server.children()}
        crashed = client.post("/run/crash")
        assert crashed.status_code == 503
        body = crashed.text
        assert crashed.json()["error"] == "WorkerCrashedError"
        assert not any(pid in body for pid in pids) and "sigkill" not in body and "SIGKILL" not in body
        assert client.post("/run/add", params={"arg": 3}).json() == {"result": 13}


def test_pool_starting_gives_an_honest_retry_after_and_empty_messages_do_not_crash(fifo):
    gate = fifo()
    env = {"ERRORS_APP_FIFO": str(gate), "ERRORS_APP_EXPOSE": "1"}
    server = UvicornServer("helpers.errors_app:app", TESTS, env=env)
    try:
        gate.wait_running()  # the worker is in its loader: the pool is starting
        with httpx.Client(base_url=server.url, timeout=30) as client:
            empty = client.post("/empty-error")  # PoolBrokenError() has no message to expose
            assert empty.status_code == 503
            assert empty.json() == {"error": "PoolBrokenError", "detail": "the server cannot score right now"}
            assert client.post("/fill", params={"n": 1}).status_code == 200  # the queue of one fills
            full = client.post("/fill", params={"n": 1})
            assert full.status_code == 503
            assert int(full.headers["retry-after"]) == RETRY_AFTER_STARTING
        gate.release_opened()
    finally:
        assert not server.stop()


def test_sigint_while_a_loader_hangs_stops_the_server_and_its_workers_at_once(fifo):
    gate = fifo()
    server = UvicornServer("helpers.hanging_app:app", TESTS, env={"HANGING_APP_FIFO": str(gate)}, wait_ready=False)
    try:
        gate.wait_running()  # a worker is inside its loader, which blocks until the FIFO is written
        workers = server.children()
        assert workers
        started = time.monotonic()
        server.process.send_signal(2)
        server.process.wait(60)
        assert time.monotonic() - started < 20  # not the 600 s start timeout, nor a 30 s shutdown wait
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers left behind: {alive}"
        server.wait_for_log("SIGINT while the pool's workers loaded their models")
    finally:
        server.stop()
