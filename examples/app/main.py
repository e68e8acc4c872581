"""The demo API: the seed's models and a CNN served over HTTP and WebSockets.

    uvicorn app.main:app --app-dir examples          # scoring on an mlpool
    MLPOOL_DEMO_MODE=inprocess uvicorn ...           # scoring in the API process (the baseline)

Endpoints: ``POST /iris``, ``POST /diabetes`` (JSON features), ``POST /image``
(an uploaded PNG or JPEG), the job API ``POST /jobs``, ``GET /jobs/{id}``,
``DELETE /jobs/{id}``, a WebSocket ``/ws`` that scores each message and
streams results back, ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from app import models
from mlpool import JobTimeoutError, MLPool, PoolStats, ResultNotReadyError
from mlpool.fastapi import cancel_on_disconnect, get_pool, install_error_handlers
from mlpool.prometheus import PoolCollector, metrics_app
from prometheus_client import CollectorRegistry

MODE = os.environ.get("MLPOOL_DEMO_MODE", "pool")  # "pool" or "inprocess"
NB_WORKERS = int(os.environ.get("MLPOOL_DEMO_WORKERS", "2"))
# "local" (worker processes) or "ray" (actors on the Ray instance RAY_ADDRESS
# names, or a new local one): see the README's "More than one machine".
BACKEND = os.environ.get("MLPOOL_BACKEND", "local")
APP_PARENT = Path(__file__).resolve().parents[1]  # where the package "app" is
MAX_IMAGE_BYTES = 2 * 2**20

SCORERS = {"iris": models.score_iris, "diabetes": models.score_diabetes}
FEATURE_COUNTS = {"iris": 4, "diabetes": 10}


class Features(BaseModel):
    features: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(max_length=64)


class JobRequest(Features):
    model: Literal["iris", "diabetes"]


def check_count(model: str, features: list[float]) -> None:
    if len(features) != FEATURE_COUNTS[model]:
        raise HTTPException(422, f"{model} takes {FEATURE_COUNTS[model]} features, got {len(features)}")


registry = CollectorRegistry()


@asynccontextmanager
async def lifespan(app: FastAPI):
    models.train_if_missing(with_cnn=True)
    loaders = {"iris": models.load_iris, "diabetes": models.load_diabetes, "image": models.load_cnn}
    if MODE == "inprocess":
        app.state.inprocess = {name: load() for name, load in loaders.items()}
        yield
        return
    backend: dict = {}
    if BACKEND == "ray":  # the actors import app.models from this checkout
        runtime_env = {"env_vars": {"PYTHONPATH": str(APP_PARENT)}}
        backend = {"backend": "ray", "ray_options": {"runtime_env": runtime_env}}
    async with MLPool(loaders, nb_workers=NB_WORKERS, max_retries=1, **backend) as pool:
        app.state.mlpool = pool
        collector = PoolCollector(pool).register(registry)
        yield
        registry.unregister(collector)


app = FastAPI(title="mlpool demo", lifespan=lifespan)
install_error_handlers(app)


@app.exception_handler(RequestValidationError)
async def invalid_input(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input, and a NaN in it cannot be JSON: a 500.
    errors = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"error": "invalid input", "detail": errors}, 422)
app.mount("/metrics", metrics_app(registry))


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
    if not data.startswith((b"\x89PNG", b"\xff\xd8")):
        raise HTTPException(422, "send a PNG or a JPEG")
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
    return {"cancelled": pool.cancel_job(job_id, interrupt=True)}


@app.websocket("/ws")
async def scores_stream(websocket: WebSocket) -> None:
    """Each message ``{"id": ..., "model": "iris", "features": [...]}`` is scored
    concurrently; results stream back as they finish. When the client goes
    away, every job of its session still queued or running is cancelled."""
    await websocket.accept()
    pool: MLPool = get_pool(websocket)
    tasks: set[asyncio.Task] = set()

    async def answer(message: dict) -> None:
        try:
            request = JobRequest.model_validate(message)
            check_count(request.model, request.features)
            result = await session.score_async(request.model, SCORERS[request.model], request.features)
            await websocket.send_json({"id": message.get("id"), "class": result})
        except (ValidationError, HTTPException) as exc:
            await websocket.send_json({"id": message.get("id"), "error": str(getattr(exc, "detail", exc))})
        except WebSocketDisconnect:
            pass

    async with pool.session(interrupt=True) as session:
        try:
            while True:
                message = await websocket.receive_json()
                task = asyncio.ensure_future(answer(message if isinstance(message, dict) else {}))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()


@app.get("/healthz")
async def healthz() -> dict:
    """Liveness: answers as long as the event loop is free to."""
    return {"status": "ok"}


@app.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    if MODE == "inprocess":
        return JSONResponse({"ready": True})
    pool: MLPool = get_pool(request)
    stats: PoolStats = pool.stats()
    body = {"ready": pool.ready, "workers_alive": stats.workers_alive, "queue_depth": stats.queue_depth}
    return JSONResponse(body, 200 if pool.ready else 503)
