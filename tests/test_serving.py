"""End to end: real uvicorn servers on loopback, a real HTTP client, a real WebSocket client."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import threading

import httpx
import pytest
import websockets
from helpers.server import EXAMPLES, TESTS, UvicornServer

sys.path.insert(0, str(EXAMPLES))
from app import models

IRIS = [6.2, 2.2, 4.5, 1.5]
DIABETES = [0.038, 0.05, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.02, -0.018]


@pytest.fixture(scope="module")
def demo():
    """The example app, scoring on a pool of 2 workers."""
    models.train_if_missing(with_cnn=True)
    server = UvicornServer("app.main:app", EXAMPLES)
    try:
        yield server
    finally:
        left = server.stop()
        assert not left, f"processes left behind by the example app: {left}"


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


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{[^}]*" + re.escape(selector) + r"[^}]*\}" if labels else r"(\{[^}]*\})?")
    found = re.search(r"^" + pattern + r" ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} {labels} not in /metrics"
    return float(found.group(found.lastindex))


def test_models_answer_as_they_do_in_process(demo):
    iris, diabetes = models.load_iris(), models.load_diabetes()
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        response = client.post("/iris", json={"features": IRIS})
        assert response.status_code == 200
        assert response.json() == {"class": models.score_iris(iris, IRIS)}
        response = client.post("/diabetes", json={"features": DIABETES})
        assert response.json() == {"class": models.score_diabetes(diabetes, DIABETES)}


def test_torch_model_scores_an_uploaded_image_in_a_worker(demo):
    from PIL import Image

    picture = Image.new("RGB", (120, 90))
    picture.putdata([((x * 7) % 256, (y * 3) % 256, (x * y) % 256) for y in range(90) for x in range(120)])
    png = io.BytesIO()
    picture.save(png, format="PNG")
    expected = models.score_image(models.load_cnn(), png.getvalue())
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        response = client.post("/image", files={"file": ("picture.png", png.getvalue(), "image/png")})
    assert response.status_code == 200
    assert response.json() == expected


def test_job_endpoints(demo):
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        created = client.post("/jobs", json={"model": "iris", "features": IRIS})
        assert created.status_code == 202
        job_id = created.json()["job_id"]
        done = client.get(f"/jobs/{job_id}", params={"wait": 20})
        assert done.status_code == 200 and done.json()["status"] == "done"
        gone = client.get(f"/jobs/{job_id}")
        assert gone.status_code == 404 and gone.json()["error"] == "UnknownJobError"
        assert client.delete("/jobs/no-such-job").status_code == 404


def test_bad_inputs_get_4xx_and_the_pool_keeps_serving(demo):
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        assert client.post("/iris", json={"features": [1.0, 2.0]}).status_code == 422
        assert client.post("/iris", json={"features": ["a", "b", "c", "d"]}).status_code == 422
        nan = b'{"features": [NaN, 1, 2, 3]}'
        assert client.post("/iris", content=nan, headers={"content-type": "application/json"}).status_code == 422
        assert client.post("/jobs", json={"model": "nope", "features": IRIS}).status_code == 422
        big = b"\x89PNG" + b"\0" * (3 * 2**20)
        assert client.post("/image", files={"file": ("big.png", big, "image/png")}).status_code == 413
        assert client.post("/image", files={"file": ("x.txt", b"hello", "text/plain")}).status_code == 422
        assert client.post("/iris", json={"features": IRIS}).status_code == 200


def test_metrics_are_exposed_and_count(demo):
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        before = metric(client.get("/metrics").text, "mlpool_jobs_total", outcome="completed")
        for _ in range(3):
            assert client.post("/iris", json={"features": IRIS}).status_code == 200
        text = client.get("/metrics").text
        assert metric(text, "mlpool_jobs_total", outcome="completed") == before + 3
        assert metric(text, "mlpool_workers_alive") == 2
        assert metric(text, "mlpool_job_latency_seconds_count") >= before + 3
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["ready"] is True


def test_websocket_streams_results(demo):
    async def main():
        async with websockets.connect(demo.url.replace("http", "ws") + "/ws") as ws:
            for i in range(6):
                await ws.send(json.dumps({"id": i, "model": "iris" if i % 2 else "diabetes",
                                          "features": IRIS if i % 2 else DIABETES}))  # fmt: skip
            await ws.send(json.dumps({"id": 99, "model": "iris", "features": [1]}))
            return [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(7)]

    answers = {a["id"]: a for a in asyncio.run(main())}
    assert set(answers) == {0, 1, 2, 3, 4, 5, 99}
    assert "error" in answers[99]
    assert all(isinstance(answers[i]["class"], int) for i in range(6))


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


def test_demo_websocket_client_leaving_cancels_jobs(demo):
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        before = metric(client.get("/metrics").text, "mlpool_jobs_total", outcome="cancelled")
    mark = demo.log_mark()

    async def send_and_leave():
        async with websockets.connect(demo.url.replace("http", "ws") + "/ws") as ws:
            for i in range(40):  # 40 x 15 ms of work for 2 workers
                await ws.send(json.dumps({"id": i, "model": "iris", "features": IRIS}))

    asyncio.run(send_and_leave())
    # Messages are read in order, at most 8 jobs in flight: the server sees the
    # close after the last message and cancels what is still in flight.
    demo.wait_for_log("WebSocket client left", since=mark)
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        assert client.post("/iris", json={"features": IRIS}).status_code == 200
        after = metric(client.get("/metrics").text, "mlpool_jobs_total", outcome="cancelled")
    assert after > before


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
