"""Streams over real HTTP and WebSockets (#17): a client that leaves stops the
generator in the worker, which then serves the next request."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets
from helpers.markers import Markers
from helpers.server import EXAMPLES, TESTS, UvicornServer


@pytest.fixture(scope="module")
def server():
    server = UvicornServer("helpers.streaming_app:app", TESTS)
    try:
        yield server
    finally:
        assert not server.stop()


@pytest.fixture
def markers(tmp_path):
    m = Markers(tmp_path / "markers")
    yield m
    m.close()


@pytest.mark.parametrize("format", ["ndjson", "sse"])
def test_an_http_client_that_disconnects_stops_the_generator(server, markers, format):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("GET", "/stream", params={"markers": str(markers), "format": format}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            got = [line for line, _ in zip((line for line in lines if line), range(3), strict=False)]
        # Leaving the block closed the connection mid-stream.
        assert got[0] in ("0", "data: 0")
        _, produced, pid = markers.until("finally").split()
        assert int(produced) < 1000  # stopped, not run on
        assert client.get("/pid").json()["pid"] == int(pid)  # the same worker serves the next request


def test_an_error_mid_stream_ends_it_with_an_error_event(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        text = client.get("/fails").text
    events = [e for e in text.split("\n\n") if e]
    assert events[:2] == ["data: 0", "data: 1"]
    assert events[2].startswith("event: error\ndata: ")
    assert json.loads(events[2].split("data: ", 1)[1])["error"] == "ValueError"


def test_a_stream_that_fails_before_its_first_item_gets_the_error_status(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        failed = client.get("/fails", params={"n": 0})
    assert failed.status_code == 500, failed.text  # the app's status for the error, not 200 and a frame
    assert "text/event-stream" not in failed.headers.get("content-type", "")


def test_a_websocket_client_that_disconnects_stops_the_generator(server, markers):
    async def main() -> None:
        url = server.url.replace("http", "ws") + f"/ws?markers={markers}"
        async with websockets.connect(url) as ws:
            assert [json.loads(await ws.recv()) for _ in range(3)] == [0, 1, 2]
        # Closed: the server's session closes, which closes the stream.
        loop = asyncio.get_running_loop()
        _, produced, pid = (await loop.run_in_executor(None, markers.until, "finally")).split()
        assert int(produced) < 1000
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.get("/pid")).json()["pid"] == int(pid)

    asyncio.run(main())


@pytest.fixture(scope="module")
def demo():
    """The example app with one worker and light rows."""
    import sys

    sys.path.insert(0, str(EXAMPLES))
    from app import models

    models.train_if_missing(with_cnn=True)
    server = UvicornServer("app.main:app", EXAMPLES,
                           env={"MLPOOL_DEMO_WORKERS": "1", "MLPOOL_DEMO_FEATURE_WORK": "1000"})  # fmt: skip
    try:
        yield server
    finally:
        assert not server.stop()


ROW = [0.03, 0.05, 0.06, 0.02, -0.04, -0.03, -0.04, -0.002, 0.02, -0.02]


@pytest.mark.parametrize("format", ["ndjson", "sse"])
def test_the_example_app_streams_per_row_predictions(demo, format):
    with httpx.Client(base_url=demo.url, timeout=60) as client:
        response = client.post("/stream/diabetes", params={"format": format}, json={"rows": [ROW] * 50})
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
        rows = [json.loads(line) for line in lines]
        assert [r["row"] for r in rows] == list(range(50)) and all(isinstance(r["class"], int) for r in rows)
        assert client.post("/stream/diabetes", json={"rows": [[1.0, 2.0]]}).status_code == 422


def test_the_example_apps_websocket_streams_rows_then_done(demo):
    async def main() -> list:
        async with websockets.connect(demo.url.replace("http", "ws") + "/ws/stream") as ws:
            await ws.send(json.dumps({"id": 7, "rows": [ROW] * 20}))
            replies = []
            while not (reply := json.loads(await ws.recv())).get("done"):
                replies.append(reply)
            return replies

    replies = asyncio.run(main())
    assert [r["row"] for r in replies] == list(range(20)) and {r["id"] for r in replies} == {7}
