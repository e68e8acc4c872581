"""End to end: a real uvicorn server on loopback, a real HTTP client, a real WebSocket client
(the example app's own end-to-end tests are in test_app.py, on its one server)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import websockets
from helpers.server import TESTS, UvicornServer

IRIS = [6.2, 2.2, 4.5, 1.5]


@pytest.fixture(scope="module")
def small():
    """The test app: one worker, a queue of one."""
    server = UvicornServer("helpers.serving_app:app", TESTS)
    try:
        yield server
    finally:
        assert not server.stop()


def post_block(url: str, gate) -> None:
    """POST /block from its own client (an httpx.Client is not for two threads)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/block", params={"fifo": str(gate)})


def test_websocket_client_leaving_cancels_its_jobs(small, fifo, tmp_path):
    gate = fifo()
    markers = [tmp_path / f"ran-{i}" for i in range(5)]

    async def send_and_leave():
        async with websockets.connect(small.url.replace("http", "ws") + "/ws") as ws:
            await ws.send(json.dumps({"fn": "block", "arg": str(gate)}))
            await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)
            for marker in markers:  # queued behind the blocked job on the only worker
                await ws.send(json.dumps({"fn": "touch", "arg": str(marker)}))
        # leaving: the server's session cancels all six (the running one's worker is killed)

    asyncio.run(send_and_leave())
    with httpx.Client(base_url=small.url, timeout=30) as client:
        assert client.post("/add", params={"x": 1}).json() == {"sum": 11}  # runs after anything queued
    assert not any(marker.exists() for marker in markers)


def test_pool_errors_map_to_http(small, fifo, tmp_path):
    gate = fifo()
    with httpx.Client(base_url=small.url, timeout=30) as client:
        assert client.get("/stats").json()["queue_depth"] == 0, client.get("/stats").json()
        blocked = threading.Thread(target=post_block, args=(small.url, gate), daemon=True)
        blocked.start()
        gate.wait_running()
        assert client.get("/stats").json()["queue_depth"] == 0, client.get("/stats").json()
        queued = client.post("/queue-or-503")  # the queue of one fills
        assert queued.status_code == 200
        full = client.post("/queue-or-503")
        assert full.status_code == 503, client.get("/stats").json()
        assert full.json()["error"] == "PoolFullError"
        assert int(full.headers["retry-after"]) >= 1
        assert client.get("/result/nope").status_code == 404
        gate.release_opened()
        blocked.join(30)
        assert client.get(f"/result/{queued.json()['job_id']}").json()["result"] > 0
        slow = client.post("/too-slow")
        assert slow.status_code == 504 and slow.json()["error"] == "JobTimeoutError"
        assert client.post("/add", params={"x": 5}).json() == {"sum": 15}


def test_http_client_disconnecting_cancels_its_queued_job(small, fifo, tmp_path):
    gate = fifo()
    marker = tmp_path / "ran"
    with httpx.Client(base_url=small.url, timeout=30) as client:
        blocked = threading.Thread(target=post_block, args=(small.url, gate), daemon=True)
        blocked.start()
        gate.wait_running()

        async def ask_and_leave():
            async with httpx.AsyncClient(base_url=small.url) as impatient:
                with pytest.raises(httpx.TimeoutException):
                    await impatient.post("/touch", params={"path": str(marker)}, timeout=0.5)

        asyncio.run(ask_and_leave())  # the client gives up while its job waits in the queue
        small.wait_for_log(f"client left: {marker}")  # the server has cancelled the job
        gate.release_opened()
        blocked.join(30)
        assert client.post("/add", params={"x": 1}).json() == {"sum": 11}  # runs after anything queued
    assert not marker.exists()
