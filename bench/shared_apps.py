"""What bench/shared_serving.py serves: the same model behind mlpool (FastAPI on
uvicorn, a pool of its own or one shared by the API processes) and behind
Gunicorn's dirty workers (its ``asgi`` worker + ``DirtyClient.execute_async``).

The model: a 64 MiB array, loaded once per worker; each request costs
``WORK`` seconds of CPU in the worker (a spin), plus the sum of the request's
array for ``/array`` (8 MB of float64 in the body, raw).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from fastapi import FastAPI, Request  # at module level: FastAPI reads the endpoints' annotations here
from streaming_apps import DirtyApp, serve_lifespan  # Gunicorn's base class (object without the peer)

WORK = float(os.environ.get("BENCH_WORK", "0.020"))
MODEL_BYTES = 64 * 2**20


def load_model() -> np.ndarray:
    return np.random.default_rng(0).random(MODEL_BYTES // 8)


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def score_small(model: np.ndarray, features: list[float]) -> dict:
    _spin(WORK)
    return {"score": float(sum(features)) + float(model[0])}


def score_array(model: np.ndarray, array: np.ndarray) -> dict:
    _spin(WORK)
    return {"sum": float(array.sum()), "n": int(array.size)}


# ----------------------------------------------------------------- mlpool


def mlpool_app() -> FastAPI:  # uvicorn --factory shared_apps:mlpool_app
    from mlpool.fastapi import get_pool, pool_lifespan

    share = os.environ.get("BENCH_SHARE", "")
    options = {"share_across_processes": share} if share else {}
    app = FastAPI(lifespan=pool_lifespan({"m": load_model}, nb_workers=2, threads_per_worker=1, **options))

    @app.post("/small")
    async def small(request: Request) -> dict:
        body = json.loads(await request.body())
        return await get_pool(request).score_async("m", score_small, body["features"])

    @app.post("/array")
    async def array(request: Request) -> dict:
        data = np.frombuffer(await request.body(), dtype=np.float64)
        return await get_pool(request).score_async("m", score_array, data)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    return app


# --------------------------------------------------------------- gunicorn


class ModelApp(DirtyApp):  # type: ignore[misc,valid-type]
    """The dirty app: the model loaded once per dirty worker."""

    def init(self) -> None:
        self.model = load_model()

    def small(self, features: list[float]) -> dict:
        return score_small(self.model, features)

    def array(self, data: bytes) -> dict:
        return score_array(self.model, np.frombuffer(data, dtype=np.float64))


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def gunicorn_app(scope: dict, receive, send) -> None:
    """A bare ASGI app for Gunicorn's asgi worker, calling the dirty app as its docs show
    (the client closed after each request: a context-local one is made per request)."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    from gunicorn.dirty import close_dirty_client_async, get_dirty_client_async

    path = scope["path"]
    if path == "/healthz":
        body = b'{"ok": true}'
    else:
        data = await _body(receive)
        client = await get_dirty_client_async(timeout=300)
        try:
            if path == "/small":
                result = await client.execute_async("shared_apps:ModelApp", "small", json.loads(data)["features"])
            else:
                result = await client.execute_async("shared_apps:ModelApp", "array", data)
        finally:
            await close_dirty_client_async()
        body = json.dumps(result).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
