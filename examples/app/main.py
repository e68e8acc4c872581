"""The demo API: two XGBoost models and a CNN served over HTTP and WebSockets.

    uvicorn app.main:app --app-dir examples          # scoring on an mlpool, in worker groups
    MLPOOL_DEMO_MODE=shared uvicorn ...              # one shared pool: every worker loads every model
    MLPOOL_DEMO_MODE=inprocess uvicorn ...           # scoring in the API process (the baseline)
    MLPOOL_DEMO_SHARE=1 uvicorn ... --workers 2      # two API processes, one pool host for both

Worker groups (the default, "groups"): the CPU-heavy image CNN has
``MLPOOL_DEMO_IMAGE_WORKERS`` workers of its own (1) that load only it, and
the cheap XGBoost models share ``MLPOOL_DEMO_WORKERS`` workers (1) that
load only them: an iris request never waits for a worker busy with an
image. "shared" runs the same total of workers (2), each loading all three
models, as a pool without groups does: the comparison ``examples/demo.py`` draws.

Endpoints: ``POST /iris``, ``POST /diabetes`` (JSON features), ``POST /image``
(an uploaded PNG or JPEG), the job API ``POST /jobs``, ``GET /jobs/{id}``,
``DELETE /jobs/{id}``, a WebSocket ``/ws`` that scores each message and
streams results back, per-row predictions of an uploaded batch streamed as
they are made (``POST /stream/diabetes``, NDJSON or ``?format=sse``, and the
WebSocket ``/ws/stream``), ``/healthz`` (liveness: 503 once the pool is
broken for good), ``/readyz``, ``/metrics``, and ``POST /admin/reload``
(rolls the models out again from their files, worker by worker; off unless
``MLPOOL_DEMO_ADMIN_TOKEN`` holds the token it asks for).

What one client cannot do to the others: send a body larger than the
endpoint takes (413 before it is read), an image with more pixels than
``models.MAX_PIXELS`` (422 from its header, before decoding), more than
``WS_MAX_IN_FLIGHT`` WebSocket jobs at once (the socket is not read
meanwhile), or make workers restart in a loop (``INTERRUPT_INTERVAL``).
Error bodies carry fixed sentences; the log has the details.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, UploadFile, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, ValidationError
from starlette.websockets import WebSocketDisconnect

from app import models
from app.guards import BodyLimit, InterruptBudget
from mlpool import JobTimeoutError, MLPool, MLPoolError, Model, PoolStats, ResultNotReadyError
from mlpool.fastapi import cancel_on_disconnect, error_body, get_pool, install_error_handlers, stream_response
from mlpool.prometheus import PoolCollector, metrics_app

logger = logging.getLogger("app")
if not logging.getLogger().handlers:  # the app's log, and mlpool's, next to uvicorn's
    logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(name)s: %(message)s")


def positive_int(name: str, default: int) -> int:
    """The environment variable ``name`` as a count of at least 1; a clear error otherwise."""
    text = os.environ.get(name, str(default))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text!r}: give a whole number of workers, at least 1")
    return int(text)


MODES = ("groups", "shared", "inprocess")
MODE = os.environ.get("MLPOOL_DEMO_MODE", "groups")
if MODE not in MODES:
    raise ValueError(f"MLPOOL_DEMO_MODE={MODE!r}: choose one of {', '.join(MODES)}")
NB_WORKERS = positive_int("MLPOOL_DEMO_WORKERS", 1)  # the workers the XGBoost models share
IMAGE_WORKERS = positive_int("MLPOOL_DEMO_IMAGE_WORKERS", 1)  # the image CNN's own, in "groups"
# "local" (worker processes) or "ray" (actors on the Ray instance RAY_ADDRESS
# names, or a new local one): see "More than one machine" in docs/reference.md.
BACKEND = os.environ.get("MLPOOL_BACKEND", "local")
APP_PARENT = Path(__file__).resolve().parents[1]  # where the package "app" is
JOB_TIMEOUT = float(os.environ.get("MLPOOL_DEMO_JOB_TIMEOUT", "30"))  # seconds; longer is a bug here
MAX_WORKER_MEMORY = int(os.environ.get("MLPOOL_DEMO_MAX_WORKER_MEMORY", str(2**30)))  # then recycled
MAX_JSON_BYTES = 64 * 2**10  # a request of 64 features is about 1 KiB
MAX_IMAGE_BYTES = 2 * 2**20
MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES + 64 * 2**10  # the multipart envelope around the image
WS_MAX_IN_FLIGHT = 8  # jobs one WebSocket may have queued or running
INTERRUPT_INTERVAL = 10.0  # seconds between two worker restarts that DELETE /jobs may cause
MAX_STREAM_ROWS = 20_000  # rows of one streamed batch (about 5 minutes of work)
MAX_STREAM_BYTES = 4 * 2**20

# POST /admin/reload answers 404 unless this holds the token it asks for ("Authorization: Bearer <token>").
ADMIN_TOKEN = os.environ.get("MLPOOL_DEMO_ADMIN_TOKEN", "")
# Several API processes (uvicorn --workers N, gunicorn): "1" shares one pool among the
# processes of this server (share_across_processes=True), another value names the pool.
SHARE = os.environ.get("MLPOOL_DEMO_SHARE", "")
SCORERS = {"iris": models.score_iris, "diabetes": models.score_diabetes}
LOADERS = {"iris": models.load_iris, "diabetes": models.load_diabetes, "image": models.load_cnn}
FEATURE_COUNTS = {"iris": 4, "diabetes": 10}


class Features(BaseModel):
    features: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(max_length=64)


class JobRequest(Features):
    model: Literal["iris", "diabetes"]


class Rows(BaseModel):
    rows: list[list[Annotated[float, Field(allow_inf_nan=False)]]] = Field(min_length=1, max_length=MAX_STREAM_ROWS)


def check_count(model: str, features: list[float]) -> None:
    if len(features) != FEATURE_COUNTS[model]:
        raise HTTPException(422, f"{model} takes {FEATURE_COUNTS[model]} features, got {len(features)}")


registry = CollectorRegistry()
interrupts = InterruptBudget(INTERRUPT_INTERVAL)


def pool_layout(loaders: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The pool's ``models_to_load`` and ``nb_workers`` in this MODE: the
    image CNN in a group of its own ("groups"), or every model on every
    worker of one pool of the same size ("shared")."""
    if MODE == "shared":
        return loaders, NB_WORKERS + IMAGE_WORKERS
    return {**loaders, "image": Model(loaders["image"], workers=IMAGE_WORKERS)}, NB_WORKERS


@asynccontextmanager
async def lifespan(app: FastAPI):
    models.train_if_missing(with_cnn=True)
    loaders = LOADERS
    if MODE == "inprocess":
        app.state.inprocess = {name: load() for name, load in loaders.items()}
        yield
        return
    models_to_load, nb_workers = pool_layout(loaders)
    backend: dict = {}
    if BACKEND == "ray":  # the actors import app.models from this checkout
        runtime_env = {"env_vars": {"PYTHONPATH": str(APP_PARENT)}}
        backend = {"backend": "ray", "ray_options": {"runtime_env": runtime_env}}
    elif SHARE:
        backend = {"share_across_processes": True if SHARE == "1" else SHARE}
    async with MLPool(
        models_to_load, nb_workers=nb_workers, max_retries=1, job_timeout=JOB_TIMEOUT,
        max_memory_per_worker=MAX_WORKER_MEMORY, start_timeout=120.0, **backend,
    ) as pool:  # fmt: skip
        app.state.mlpool = pool
        collector = PoolCollector(pool, pool_name="demo").register(registry)
        try:
            yield
        finally:
            collector.unregister()


app = FastAPI(title="mlpool demo", lifespan=lifespan)
install_error_handlers(app)
app.add_middleware(
    BodyLimit, default=MAX_JSON_BYTES, limits={"/image": MAX_UPLOAD_BYTES, "/stream/diabetes": MAX_STREAM_BYTES}
)
app.add_route("/metrics", metrics_app(registry))  # an exact route: a mount would redirect /metrics


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where and what, never the client's own input (pydantic's errors carry it)."""
    return [{"loc": [part for part in e["loc"] if part != "body"], "msg": e["msg"], "type": e["type"]} for e in errors]


@app.exception_handler(RequestValidationError)
async def invalid_input(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input, and a NaN in it cannot be JSON: a 500.
    return JSONResponse({"error": "invalid input", "detail": validation_errors(list(exc.errors()))}, 422)


@app.exception_handler(models.InvalidImage)
async def invalid_image(request: Request, exc: models.InvalidImage) -> JSONResponse:
    logger.info("invalid image on %s: %s (%r)", request.url.path, exc, exc.__cause__)
    return JSONResponse({"error": "invalid image", "detail": str(exc)}, 422)


async def score(request: Request, model: str, features: list) -> int:
    if MODE == "inprocess":  # the baseline: scoring blocks this event loop
        return SCORERS[model](request.app.state.inprocess[model], features)
    pool: MLPool = get_pool(request)
    return await cancel_on_disconnect(request, pool.score_async(model, SCORERS[model], features))


@app.post("/iris")
async def iris(body: Features, request: Request) -> dict:
    check_count("iris", body.features)
    return {"class": await score(request, "iris", body.features)}


@app.post("/diabetes")
async def diabetes(body: Features, request: Request) -> dict:
    check_count("diabetes", body.features)
    return {"class": await score(request, "diabetes", body.features)}


@app.post("/image")
async def image(file: UploadFile, request: Request) -> dict:
    data = await file.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"images are limited to {MAX_IMAGE_BYTES} bytes")
    models.image_size(data)  # the header only: refuses other formats and decompression bombs
    if MODE == "inprocess":
        return models.score_image(request.app.state.inprocess["image"], data)
    pool: MLPool = get_pool(request)
    return await cancel_on_disconnect(request, pool.score_async("image", models.score_image, data))


@app.post("/jobs", status_code=202)
async def create_job(body: JobRequest, pool: Annotated[MLPool, Depends(get_pool)]) -> dict:
    check_count(body.model, body.features)
    job_id = await pool.create_job_async(SCORERS[body.model], body.model, args=(body.features,), timeout=30.0)
    return {"job_id": job_id}


@app.get("/jobs/{job_id}")
async def get_job(job_id: str, pool: Annotated[MLPool, Depends(get_pool)], wait: float = 0.0) -> JSONResponse:
    """The job's result (200), or 202 while it runs; ``?wait=S`` waits up to S seconds (30 at most)."""
    try:
        if wait > 0:
            result = await pool.get_result_async(job_id, timeout=min(wait, 30.0))
        else:
            result = await pool.get_result_async(job_id, wait_if_unavailable=False)
    except JobTimeoutError:
        raise  # the job itself timed out: 504
    except (TimeoutError, ResultNotReadyError):
        return JSONResponse({"status": "pending"}, 202)
    return JSONResponse({"status": "done", "class": result})


@app.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, pool: Annotated[MLPool, Depends(get_pool)]) -> dict:
    """Cancel a job: queued, it never runs; running, its result is dropped, and
    its worker is killed (freeing the CPU) only if no DELETE did so in the
    last ``INTERRUPT_INTERVAL`` seconds: restarting a worker reloads every
    model, far dearer than letting a job of milliseconds finish."""
    return {"cancelled": pool.cancel_job(job_id, interrupt=interrupts.take())}


@app.websocket("/ws")
async def scores_stream(websocket: WebSocket) -> None:
    """Each text message ``{"id": ..., "model": "iris", "features": [...]}`` is
    scored; every message gets one answer, ``{"id", "class"}`` or ``{"id",
    "error", "detail"}``, as jobs finish. At most ``WS_MAX_IN_FLIGHT`` jobs per
    connection: past that, the socket is not read until one finishes
    (backpressure). When the client goes away, its jobs are cancelled; running
    ones finish (they take milliseconds, a restart costs a model reload)."""
    await websocket.accept()
    pool: MLPool = get_pool(websocket)
    slots = asyncio.Semaphore(WS_MAX_IN_FLIGHT)
    tasks: set[asyncio.Task] = set()

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        slots.release()

    async with pool.session() as session:
        try:
            while True:
                await slots.acquire()
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    logger.info("WebSocket client left with %d jobs unfinished: cancelled", len(tasks))
                    break
                task = asyncio.create_task(answer_message(websocket, session, message))
                tasks.add(task)
                task.add_done_callback(finished)
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()


async def answer_message(websocket: WebSocket, session: Any, message: dict[str, Any]) -> None:
    """Score one WebSocket message and send its answer; never raises."""
    request_id = None
    try:
        text = message.get("text")
        if text is None:
            reply = {"error": "invalid message", "detail": "send JSON text frames, not binary ones"}
        else:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            request_id = data.get("id")
            if not isinstance(request_id, (int, str)) or len(str(request_id)) > 64:
                request_id = None  # only a short id goes back, and nothing else the client sent
            request = JobRequest.model_validate(data)
            check_count(request.model, request.features)
            result = await session.score_async(request.model, SCORERS[request.model], request.features)
            reply = {"class": result}
    except ValidationError as exc:
        reply = {"error": "invalid input", "detail": validation_errors(list(exc.errors()))}
    except ValueError:  # json.loads, or not an object
        reply = {"error": "invalid message", "detail": "send a JSON object: {\"id\", \"model\", \"features\"}"}
    except HTTPException as exc:
        reply = {"error": "invalid input", "detail": exc.detail}
    except MLPoolError as exc:
        logger.warning("WebSocket job failed: %s: %s", type(exc).__name__, exc)
        reply = error_body(exc)
    except Exception:
        logger.exception("WebSocket job failed")
        reply = {"error": "internal error", "detail": "the server could not score this message"}
    try:
        await websocket.send_json({"id": request_id, **reply})
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client left; its session cancels the rest


@app.post("/stream/diabetes")
async def stream_diabetes(body: Rows, request: Request, format: Literal["ndjson", "sse"] = "ndjson") -> Response:
    """Per-row predictions of an uploaded batch, ``{"row", "class"}`` each,
    sent as soon as a worker made it (NDJSON, or server-sent events). The
    worker runs at most ``stream_buffer`` rows ahead of a slow client; a
    client that disconnects stops the work at the next row."""
    for row in body.rows:
        check_count("diabetes", row)
    if MODE == "inprocess":  # the baseline: every row blocks this event loop
        model = request.app.state.inprocess["diabetes"]
        lines = (json.dumps(item) + "\n" for item in models.predict_rows(model, body.rows))
        return StreamingResponse(lines, media_type="application/x-ndjson")
    pool: MLPool = get_pool(request)
    return await stream_response(pool.stream_async("diabetes", models.predict_rows, body.rows), request, format=format)


@app.websocket("/ws/stream")
async def rows_stream(websocket: WebSocket) -> None:
    """Each message ``{"id": ..., "rows": [[...10 features], ...]}`` streams back
    ``{"id", "row", "class"}`` per row as it is made, then ``{"id", "done": true}``
    (or ``{"id", "error", "detail"}``). A new message stops the batch still
    streaming; a client that leaves stops it at once (its session closes)."""
    await websocket.accept()
    pool: MLPool = get_pool(websocket)
    streaming: asyncio.Task | None = None
    async with pool.session() as session:
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if streaming is not None:
                    streaming.cancel()
                streaming = asyncio.create_task(stream_rows(websocket, session, message))
        except WebSocketDisconnect:
            pass
        finally:
            if streaming is not None:
                streaming.cancel()


async def stream_rows(websocket: WebSocket, session: Any, message: dict[str, Any]) -> None:
    """Stream one batch's rows to the socket; never raises (but CancelledError)."""
    request_id = None
    try:
        data = json.loads(message.get("text") or "null")
        if not isinstance(data, dict):
            raise ValueError("not an object")
        request_id = data.get("id")
        if not isinstance(request_id, (int, str)) or len(str(request_id)) > 64:
            request_id = None
        rows = Rows.model_validate(data).rows
        for row in rows:
            check_count("diabetes", row)
        async with session.stream_async("diabetes", models.predict_rows, rows) as items:
            async for item in items:
                await websocket.send_json({"id": request_id, **item})
        reply: dict[str, Any] = {"done": True}
    except ValidationError as exc:
        reply = {"error": "invalid input", "detail": validation_errors(list(exc.errors()))}
    except ValueError:
        reply = {"error": "invalid message", "detail": "send a JSON object: {\"id\", \"rows\"}"}
    except HTTPException as exc:
        reply = {"error": "invalid input", "detail": exc.detail}
    except MLPoolError as exc:
        logger.warning("WebSocket stream failed: %s: %s", type(exc).__name__, exc)
        reply = error_body(exc)
    except (WebSocketDisconnect, RuntimeError, OSError):
        return  # the client left: leaving the block closed the stream
    try:
        await websocket.send_json({"id": request_id, **reply})
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


class Reload(BaseModel):
    models: list[Literal["iris", "diabetes", "image"]] | None = None  # None: every model


@app.post("/admin/reload")
async def reload_models(request: Request, body: Reload | None = None) -> JSONResponse:
    """Load the models again from their files (a deployment replaced them),
    one worker at a time: no request fails and capacity never drops. Answers
    when every worker serves the new version, with each model's version; a
    new file that fails to load is a 500 and the old version keeps serving."""
    if not ADMIN_TOKEN:
        raise HTTPException(404, "Not Found")
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {ADMIN_TOKEN}".encode()):
        raise HTTPException(401, "this route needs the admin token", headers={"WWW-Authenticate": "Bearer"})
    if MODE == "inprocess":
        raise HTTPException(409, "no pool to reload in the inprocess mode")
    pool: MLPool = get_pool(request)
    names = body.models if body is not None and body.models else None
    await pool.reload_models_async(None if names is None else {name: LOADERS[name] for name in names})
    return JSONResponse({"versions": {name: figures.version for name, figures in pool.stats().models.items()}})


@app.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Liveness: answers while the event loop is free to; 503 once the pool is
    broken for good (workers cannot be kept alive), so that the orchestrator
    restarts the container."""
    if MODE == "inprocess" or get_pool(request).healthy:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "broken", "detail": "the scoring pool cannot serve; restart this process"}, 503)


@app.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    if MODE == "inprocess":
        return JSONResponse({"ready": True})
    pool: MLPool = get_pool(request)
    stats: PoolStats = pool.stats()
    body = {"ready": pool.ready, "workers_alive": stats.workers_alive, "queue_depth": stats.queue_depth}
    return JSONResponse(body, 200 if pool.ready else 503)
