"""A FastAPI app for the stream tests over real HTTP and WebSockets: one
worker, generators that report to the test through a FIFO (helpers.stream_workloads)."""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect

from helpers import stream_workloads as sw
from helpers.workloads import load_constant
from mlpool import MLPool
from mlpool.fastapi import get_pool, install_error_handlers, pool_lifespan, stream_response

app = FastAPI(lifespan=pool_lifespan({"m": load_constant}, nb_workers=1))
install_error_handlers(app)


@app.get("/stream")
async def stream(markers: str, request: Request, format: str = "ndjson", pool: MLPool = Depends(get_pool)):
    return await stream_response(pool.stream_async("m", sw.marked_forever, markers), request, format=format)


@app.get("/fails")
async def fails(n: int = 2, timeout: float | None = None, pool: MLPool = Depends(get_pool)):
    return await stream_response(pool.options(timeout=timeout).stream_async("m", sw.raise_after, n), format="sse")


@app.get("/pid")
async def pid(pool: MLPool = Depends(get_pool)) -> dict:
    return {"pid": await pool.score_async("m", sw.pid)}


@app.websocket("/ws")
async def ws(websocket: WebSocket, markers: str) -> None:
    """Streams the generator's items until the client leaves; the client's
    messages are only read to see it leave (the session then closes)."""
    await websocket.accept()
    pool: MLPool = get_pool(websocket)

    async def send_items(session) -> None:
        async with session.stream_async("m", sw.marked_forever, markers) as items:
            async for item in items:
                await websocket.send_json(item)

    async with pool.session() as session:
        sender = asyncio.create_task(send_items(session))
        try:
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
