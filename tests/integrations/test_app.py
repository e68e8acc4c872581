"""The example app's guards, over real HTTP and WebSockets against the real app
under uvicorn (issue #13 and #19, "The example app")."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import websockets
from helpers import held_iris
from helpers.held_iris import HOLD_FOREVER, HOLD_UNTIL_RELEASED
from helpers.server import EXAMPLES, UvicornServer

sys.path.insert(0, str(EXAMPLES))
from app import main, models

IRIS = [6.2, 2.2, 4.5, 1.5]
ADMIN_TOKEN = "s3cret-for-tests"
DIABETES = [0.038, 0.05, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.02, -0.018]


@pytest.fixture(scope="module")
def demo():
    """The example app as `make demo` runs it: 2 workers, 15 ms per request
    (and its admin route on, with ``ADMIN_TOKEN``)."""
    models.train_if_missing(with_cnn=True)
    server = UvicornServer("app.main:app", EXAMPLES, env={"MLPOOL_DEMO_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        yield server
    finally:
        assert not server.stop()


@pytest.fixture(scope="module")
def slow_demo(tmp_path_factory):
    """The example app with a 1 s default job timeout, two workers for the
    XGBoost models (beside the image's own), its own copy of the model files
    (a test deletes them), and a test-only iris scorer that holds a request
    on a named pipe when its first feature says so (``helpers.held_iris``):
    ``held(HOLD_FOREVER)`` outlasts any timeout, ``held(HOLD_UNTIL_RELEASED)``
    runs until the test opens ``slow_demo.release()``."""
    models.train_if_missing(with_cnn=True)
    model_dir = tmp_path_factory.mktemp("models")
    for path in (models.IRIS_PATH, models.DIABETES_PATH, models.CNN_PATH):
        shutil.copy(path, model_dir / path.name)
    gates = tmp_path_factory.mktemp("gates")
    held_iris.make_gates(gates)
    env = {
        "MLPOOL_DEMO_MODEL_DIR": str(model_dir),
        "MLPOOL_DEMO_JOB_TIMEOUT": "1",
        "MLPOOL_DEMO_WORKERS": "2",
        "HELD_IRIS_DIR": str(gates),
    }
    server = UvicornServer("helpers.held_demo_app:app", EXAMPLES, env=env)
    server.model_dir = model_dir
    released: list[int] = []
    server.release = lambda: released.append(held_iris.open_release(gates))
    try:
        yield server
    finally:
        for fd in released:
            os.close(fd)
        assert not server.stop()


def held(code: float) -> list[float]:
    """Iris features whose job the held scorer keeps waiting (see ``slow_demo``)."""
    return [code, *IRIS[1:]]


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics", follow_redirects=True).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, format="PNG")
    return out.getvalue()


def ws_url(server: UvicornServer) -> str:
    return server.url.replace("http", "ws") + "/ws"


def workers_alive(server: UvicornServer) -> list[psutil.Process]:
    """The server's worker processes still running (a worker just killed may
    linger a moment as a zombie, until the pool reaps it)."""
    alive = []
    for process in server.children():
        try:
            if "spawn_main" in " ".join(process.cmdline()):
                alive.append(process)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return alive


def loaded_torch(process: psutil.Process) -> bool:
    """Whether the process has PyTorch's library mapped: it loaded the image CNN."""
    with open(f"/proc/{process.pid}/maps") as maps:
        return "libtorch" in maps.read()


# ------------------------------------------------------------------ modes (#16)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("mode", "image_workers", "xgboost_workers", "with_torch"),
    [(None, 1, 1, 1), ("shared", 2, 2, 2)],
    ids=["groups-by-default", "one-shared-pool"],
)
def test_app_serves_the_three_models_from_its_mode_s_workers(request, mode, image_workers, xgboost_workers,
                                                             with_torch):  # fmt: skip
    """By default the image CNN has a worker of its own and the XGBoost models
    share the other (only one worker loads PyTorch); "shared" is one pool of
    the same 2 workers, each loading every model. (The default is the module's
    ``demo`` server, started here if no test did yet.)"""
    models.train_if_missing(with_cnn=True)
    started = time.monotonic()
    if mode is None:
        server = request.getfixturevalue("demo")
    else:
        server = UvicornServer("app.main:app", EXAMPLES, env={"MLPOOL_DEMO_MODE": mode})
    try:
        assert time.monotonic() - started < 150  # the lifespan ends once every worker has loaded its models
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert isinstance(client.post("/iris", json={"features": IRIS}).json()["class"], int)
            diabetes = client.post("/diabetes", json={"features": models.diabetes_example()})
            assert isinstance(diabetes.json()["class"], int)
            image = client.post("/image", files={"file": ("black.png", png(200, 100), "image/png")}).json()
            assert isinstance(image["class"], int) and 0 < image["probability"] <= 1
            assert metric(client, "mlpool_workers_alive", pool="demo") == 2
            assert metric(client, "mlpool_model_workers", pool="demo", model="image") == image_workers
            for name in ("iris", "diabetes"):
                assert metric(client, "mlpool_model_workers", pool="demo", model=name) == xgboost_workers
        workers = workers_alive(server)
        assert len(workers) == 2
        assert sum(loaded_torch(worker) for worker in workers) == with_torch
    finally:
        if mode is not None:
            assert not server.stop()


BAD_SETTINGS = [
    ("MLPOOL_DEMO_MODE", "pool", "MLPOOL_DEMO_MODE='pool': choose one of groups, shared, inprocess"),
    ("MLPOOL_DEMO_IMAGE_WORKERS", "0", "MLPOOL_DEMO_IMAGE_WORKERS='0': give a whole number of workers"),
    ("MLPOOL_DEMO_WORKERS", "two", "MLPOOL_DEMO_WORKERS='two': give a whole number of workers"),
]


@pytest.fixture(scope="module")
def bad_starts():
    """``import app.main`` with each bad setting, the three processes at once:
    {setting: (exit code, stderr)}."""
    started = {}
    for setting, value, _ in BAD_SETTINGS:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]),
               setting: value}  # fmt: skip
        started[setting] = subprocess.Popen([sys.executable, "-c", "import app.main"], env=env, text=True,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    stderrs = {setting: process.communicate(timeout=60)[1] for setting, process in started.items()}
    return {setting: (process.returncode, stderrs[setting]) for setting, process in started.items()}


@pytest.mark.parametrize(("setting", "value", "named"), BAD_SETTINGS)
def test_a_bad_mode_or_worker_count_stops_the_app_with_an_error_naming_it(bad_starts, setting, value, named):
    returncode, stderr = bad_starts[setting]
    assert returncode != 0
    assert f"ValueError: {named}" in stderr


# ------------------------------------------------------------------ bodies


def test_oversized_json_body_is_refused_with_413_before_it_is_read(demo):
    rss_before = psutil.Process(demo.process.pid).memory_info().rss
    body = b'{"features": [' + b"1.0, " * (8 * 2**20) + b"1.0]}"  # 40 MiB
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        response = client.post("/iris", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json()["error"] == "request body too large"
        assert str(main.MAX_JSON_BYTES) in response.json()["detail"]
        assert client.post("/iris", json={"features": IRIS}).status_code == 200
    # Not read: the server did not hold the body (its 40 MiB, nor the list parsed from it).
    assert psutil.Process(demo.process.pid).memory_info().rss - rss_before < 30 * 2**20


def test_chunked_body_over_the_limit_is_refused_with_413(demo):
    def chunks():
        yield b'{"features": ['
        for _ in range(64):
            yield b"1.0, " * 4096

    with httpx.Client(base_url=demo.url, timeout=30) as client:
        response = client.post("/iris", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"] == "request body too large"
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        assert client.post("/iris", json={"features": IRIS}).status_code == 200


def test_image_upload_over_the_limit_is_refused_before_it_is_spooled(demo):
    big = b"\x89PNG" + b"\0" * (30 * 2**20)
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        response = client.post("/image", files={"file": ("big.png", big, "image/png")})
        assert response.status_code == 413
        assert response.json()["error"] == "request body too large"  # from the header, not after reading


# ------------------------------------------------------------------ images


def test_decompression_bomb_is_refused_with_422_from_its_header(demo):
    bomb = png(13_000, 13_000, mode="1")  # tiny on the wire, 480 MiB decoded as RGB
    assert len(bomb) < 2**20
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        response = client.post("/image", files={"file": ("bomb.png", bomb, "image/png")})
    assert response.status_code == 422
    # From its header: that sentence is the header check's (models.image_size), made before any decoding.
    assert response.json()["detail"] == f"images are limited to {models.MAX_PIXELS} pixels, this one has 13000 x 13000"
    assert response.json()["error"] == "invalid image"


def test_undecodable_image_is_422_and_the_cause_is_only_in_the_log(demo):
    from PIL import Image

    noise = io.BytesIO()
    Image.frombytes("RGB", (300, 200), random.Random(0).randbytes(300 * 200 * 3)).save(noise, format="PNG")
    broken = noise.getvalue()[: len(noise.getvalue()) // 2] + b"\0" * 100  # a valid header, then garbage
    mark = demo.log_mark()
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        response = client.post("/image", files={"file": ("broken.png", broken, "image/png")})
        assert response.status_code == 422
        assert response.json() == {"error": "invalid image", "detail": "the image could not be decoded"}
        not_an_image = client.post("/image", files={"file": ("x.txt", b"hello", "text/plain")})
        assert not_an_image.status_code == 422 and not_an_image.json()["error"] == "invalid image"
    assert "could not be decoded" in demo.wait_for_log("invalid image on /image", since=mark)


# ------------------------------------------------------------------ /ws


def test_every_websocket_message_gets_an_answer_and_the_connection_stays(demo):
    async def main_():
        async with websockets.connect(ws_url(demo)) as ws:
            await ws.send(b"\x00\x01binary")
            await ws.send("{not json")
            await ws.send("[1, 2]")
            await ws.send(json.dumps({"id": 4, "model": "iris", "features": ["SECRET-INPUT-4", 1, 2, 3]}))
            await ws.send(json.dumps({"id": 5, "model": "iris", "features": [1.0]}))
            await ws.send(json.dumps({"id": 6, "model": "iris", "features": IRIS}))
            return [await asyncio.wait_for(ws.recv(), 30) for _ in range(6)]

    raw = asyncio.run(main_())
    answers = [json.loads(text) for text in raw]
    assert [a["error"] for a in answers[:3]] == ["invalid message"] * 3
    by_id = {a["id"]: a for a in answers[3:]}
    assert by_id[4]["error"] == "invalid input" and "SECRET-INPUT" not in raw[3] + raw[4] + raw[5]
    assert by_id[5]["error"] == "invalid input"
    assert isinstance(by_id[6]["class"], int)


def test_websocket_flood_is_held_to_the_connection_limit_and_others_are_served(demo):
    """A flood of 200 jobs on one WebSocket (25 times its limit in flight)
    holds the queue to the limit, and requests from others are answered in
    the middle of it, not after it: each while the flood is still unanswered."""
    n = 200

    async def flood_and_probe():
        answers: dict = {}
        async with websockets.connect(ws_url(demo)) as ws, httpx.AsyncClient(base_url=demo.url, timeout=30) as client:

            async def send_all():
                for i in range(n):
                    await ws.send(json.dumps({"id": i, "model": "iris", "features": IRIS}))

            async def read_all():
                while len(answers) < n:
                    answer = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    answers[answer["id"]] = answer

            sender, reader = asyncio.create_task(send_all()), asyncio.create_task(read_all())
            while not answers:  # the flood has reached the pool
                await asyncio.wait({reader}, timeout=0.05)
            depths, flood_left = [], []
            for _ in range(5):
                response = await client.post("/iris", json={"features": IRIS})
                flood_left.append(n - len(answers))
                assert response.status_code == 200
                text = (await client.get("/metrics", follow_redirects=True)).text
                depths.append(float(next(line.split()[-1] for line in text.splitlines()
                                         if line.startswith("mlpool_queue_depth{"))))  # fmt: skip
            await asyncio.gather(sender, reader)
        return answers, depths, flood_left

    answers, depths, flood_left = asyncio.run(flood_and_probe())
    assert set(answers) == set(range(n)) and all("class" in a for a in answers.values())
    assert max(depths) <= main.WS_MAX_IN_FLIGHT
    # Each probe waited behind at most the flood's jobs in flight (8), not behind the 200.
    assert min(flood_left) > n // 2, flood_left


# ------------------------------------------------------------------ errors, metrics


def test_error_bodies_do_not_echo_input_or_name_internals(demo):
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        invalid = client.post("/iris", json={"features": ["SECRET-INPUT-1", 2, 3, 4]})
        assert invalid.status_code == 422 and "SECRET-INPUT" not in invalid.text
        unknown = client.get("/jobs/SECRET-JOB-ID")
        assert unknown.status_code == 404 and unknown.json()["error"] == "UnknownJobError"
        assert "SECRET-JOB-ID" not in unknown.text


def test_metrics_are_served_without_a_redirect(demo):
    with httpx.Client(base_url=demo.url, timeout=30, follow_redirects=False) as client:
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert 'mlpool_workers_alive{pool="demo"} 2.0' in response.text


# ------------------------------------------------------------------ serving (moved from test_serving: one demo server)


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
        before = metric(client, "mlpool_jobs_total", outcome="completed")
        for _ in range(3):
            assert client.post("/iris", json={"features": IRIS}).status_code == 200
        assert metric(client, "mlpool_jobs_total", outcome="completed") == before + 3
        assert metric(client, "mlpool_workers_alive") == 2
        assert metric(client, "mlpool_job_latency_seconds_count") >= before + 3
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


def test_demo_websocket_client_leaving_cancels_jobs(demo):
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        before = metric(client, "mlpool_jobs_total", outcome="cancelled")
    mark = demo.log_mark()

    async def send_and_leave():
        async with websockets.connect(demo.url.replace("http", "ws") + "/ws") as ws:
            for i in range(40):  # 40 x 15 ms of work for 2 workers
                await ws.send(json.dumps({"id": i, "model": "iris", "features": IRIS}))

    asyncio.run(send_and_leave())
    # Messages are read in order, at most 8 jobs in flight: the server sees the
    # close after the last message and cancels what is still in flight.
    # This connection's line: an earlier test's connection may log its own
    # (with 0 jobs) after the mark.
    demo.wait_for_log(re.compile(r"WebSocket client left with [1-9]\d* jobs"), since=mark)
    with httpx.Client(base_url=demo.url, timeout=30) as client:
        assert client.post("/iris", json={"features": IRIS}).status_code == 200
        after = metric(client, "mlpool_jobs_total", outcome="cancelled")
    assert after > before


# ------------------------------------------------------------------ restarts, health (slow app)


def test_deleting_running_jobs_restarts_at_most_one_worker(slow_demo):
    with httpx.Client(base_url=slow_demo.url, timeout=60) as client:
        restarts = metric(client, "mlpool_worker_restarts_total")
        for _ in range(3):  # 6 deletes; the first two jobs run on the two idle (shared) workers
            held_job = {"model": "iris", "features": held(HOLD_UNTIL_RELEASED)}
            ids = [client.post("/jobs", json=held_job).json()["job_id"] for _ in range(2)]
            for job_id in ids:
                assert client.delete(f"/jobs/{job_id}").json() == {"cancelled": True}
                assert client.get(f"/jobs/{job_id}").status_code == 404
        slow_demo.release()  # the held jobs whose workers were not killed end
        # a job served from start to end: whatever the deletes killed has been replaced by now
        job_id = client.post("/jobs", json={"model": "iris", "features": IRIS}).json()["job_id"]
        assert client.get(f"/jobs/{job_id}", params={"wait": 30}).json()["status"] == "done"
        assert metric(client, "mlpool_worker_restarts_total") - restarts <= 1


def test_a_failing_websocket_job_is_answered_with_an_error(slow_demo):
    async def main_():
        async with websockets.connect(ws_url(slow_demo)) as ws:
            # the job waits on a pipe nobody writes: it outlasts the app's 1 s job timeout
            await ws.send(json.dumps({"id": "slow", "model": "iris", "features": held(HOLD_FOREVER)}))
            return json.loads(await asyncio.wait_for(ws.recv(), 30))

    answer = asyncio.run(main_())
    assert answer == {"id": "slow", "error": "JobTimeoutError", "detail": "the job took too long"}


def test_the_admin_route_is_off_without_a_token(slow_demo):
    with httpx.Client(base_url=slow_demo.url, timeout=30) as client:
        assert client.post("/admin/reload").status_code == 404


def test_the_admin_route_reloads_the_models_under_load_with_no_failed_request(demo):
    # The demo's job timeout (30 s) is far above any wait a loaded machine adds: a failure here is the reload's.
    with httpx.Client(base_url=demo.url, timeout=60) as client:
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        stop = False

        async def load() -> list[int]:
            async with httpx.AsyncClient(base_url=demo.url, timeout=60) as load_client:
                codes = []
                while not stop:
                    replies = await asyncio.gather(*(load_client.post("/iris", json={"features": IRIS})
                                                     for _ in range(4)))  # fmt: skip
                    codes += [reply.status_code for reply in replies]
                return codes

        with ThreadPoolExecutor(1) as executor:
            codes = executor.submit(asyncio.run, load())
            first = client.post("/admin/reload", headers=admin, json={"models": ["iris"]})
            second = client.post("/admin/reload", headers=admin)
            stop = True
            codes = codes.result(60)
        assert first.status_code == 200 and first.json()["versions"]["iris"] == 2
        assert second.json()["versions"] == {"iris": 3, "diabetes": 2, "image": 2}
        assert codes and set(codes) == {200}
        assert metric(client, "mlpool_model_version", pool="demo", model="iris") == 3


def test_healthz_is_503_once_the_pool_is_broken_for_good(slow_demo):
    with httpx.Client(base_url=slow_demo.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        mark = slow_demo.log_mark()
        for path in slow_demo.model_dir.iterdir():  # replacements cannot load the models any more
            path.unlink()
        workers = workers_alive(slow_demo)
        assert workers
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        slow_demo.wait_for_log("mlpool is broken", timeout=120, since=mark)
        # the engine logs just before it records the state: ask again for a moment if need be
        deadline = time.monotonic() + 10
        while (health := client.get("/healthz")).status_code == 200 and time.monotonic() < deadline:
            pass
        assert health.status_code == 503 and health.json()["status"] == "broken"
        assert client.get("/readyz").status_code == 503
