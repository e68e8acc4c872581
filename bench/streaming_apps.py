"""What bench/streaming.py serves: the generator, and the same stream behind
mlpool (uvicorn + ``mlpool.fastapi.stream_response``) and Gunicorn's dirty
workers (its ``asgi`` worker + ``DirtyClient.stream_async``).

Each item costs ``work`` seconds of CPU in the worker (a spin), so the CPU a
worker spends after its client left says how long the generator ran on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from fastapi import FastAPI, Request  # at module level: FastAPI reads the endpoints' annotations here


def load_nothing() -> dict:
    return {}


def ticks(model: object, n: int, work: float) -> Iterator[int]:
    """Yield 0..n-1, each after ``work`` seconds of CPU."""
    for i in range(n):
        if work:
            end = time.process_time() + work
            while time.process_time() < end:
                pass
        yield i


def pid(model: object) -> int:
    return os.getpid()


def _query(scope: dict) -> dict[str, str]:
    pairs = (part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part)
    return dict(pairs)


# ----------------------------------------------------------------- mlpool


def mlpool_app() -> FastAPI:  # uvicorn --factory streaming_apps:mlpool_app
    from mlpool.fastapi import get_pool, pool_lifespan, stream_response

    app = FastAPI(lifespan=pool_lifespan({"m": load_nothing}, nb_workers=1))

    @app.get("/stream")
    async def stream(n: int, work: float, request: Request):
        items = get_pool(request).stream_async("m", ticks, n, work)
        return await stream_response(items, request)

    @app.get("/pid")
    async def worker_pid(request: Request) -> dict:
        return {"pid": await get_pool(request).score_async("m", pid)}

    return app


# --------------------------------------------------------------- gunicorn

try:
    from gunicorn.dirty import DirtyApp
except ImportError:  # the peer is not installed: only mlpool_app is served
    DirtyApp = object  # type: ignore[assignment,misc]


class TicksApp(DirtyApp):  # type: ignore[misc,valid-type]
    """The dirty app: the same generator as an action."""

    def init(self) -> None:
        self.model: dict = {}

    def ticks(self, n: int, work: float) -> Iterator[int]:
        yield from ticks(self.model, n, work)

    def pid(self) -> int:
        return os.getpid()


async def serve_lifespan(receive, send) -> None:
    """A bare ASGI app's lifespan: nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def gunicorn_app(scope: dict, receive, send) -> None:
    """A bare ASGI app for Gunicorn's asgi worker: NDJSON of the dirty stream."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    from gunicorn.dirty import get_dirty_client_async

    client = await get_dirty_client_async(timeout=300)
    query = _query(scope)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
    if scope["path"] == "/pid":
        body = b'{"pid": %d}\n' % await client.execute_async("streaming_apps:TicksApp", "pid")
        await send({"type": "http.response.body", "body": body})
        return
    async for item in client.stream_async("streaming_apps:TicksApp", "ticks", int(query["n"]), float(query["work"])):
        await send({"type": "http.response.body", "body": b"%d\n" % item, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
