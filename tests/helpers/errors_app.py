"""A FastAPI app for the error-mapping tests: one worker, a queue of 100.

Environment: ``ERRORS_APP_FIFO`` makes the loader block on that FIFO and the
app serve while the pool starts; ``ERRORS_APP_EXPOSE=1`` exposes error messages.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from functools import partial

from fastapi import Depends, FastAPI, WebSocket

from helpers.workloads import add, load_constant, sigkill_self, spin, wait_for_release
from mlpool import MLPool, PoolBrokenError
from mlpool.fastapi import get_pool, install_error_handlers, pool_lifespan

QUEUE = 100
FIFO = os.environ.get("ERRORS_APP_FIFO")


def load_after_fifo(fifo: str) -> dict:
    with open(fifo) as f:
        f.read()
    return load_constant()


@asynccontextmanager
async def serve_while_starting(app: FastAPI):
    assert FIFO is not None
    pool = MLPool({"m": partial(load_after_fifo, FIFO)}, nb_workers=1, max_queue_size=1)  # returns while loading
    app.state.mlpool = pool
    try:
        yield
    finally:
        await pool.shutdown_async(cancel_pending=True, timeout=5.0)


app = FastAPI(
    lifespan=serve_while_starting if FIFO else pool_lifespan({"m": load_constant}, nb_workers=1, max_queue_size=QUEUE)
)
install_error_handlers(app, expose_details=os.environ.get("ERRORS_APP_EXPOSE") == "1")
FUNCTIONS = {"spin": spin, "block": wait_for_release, "add": add, "crash": sigkill_self}


@app.post("/run/{fn}")
async def run(fn: str, arg: str | None = None, pool: MLPool = Depends(get_pool)) -> dict:
    args = () if arg is None else ((float(arg) if fn == "spin" else int(arg) if fn == "add" else arg),)
    return {"result": await pool.score_async("m", FUNCTIONS[fn], *args)}


@app.post("/model/{model}")
async def score_model(model: str, pool: MLPool = Depends(get_pool)) -> dict:
    """Score a model the client names (UnknownModelError for one the pool does not serve)."""
    return {"result": await pool.score_async(model, add, 1)}


@app.post("/generator")
async def generator(pool: MLPool = Depends(get_pool)) -> dict:
    """A scoring function that returns a generator: its result cannot cross (a 500)."""
    return {"result": await pool.score_async("m", count_to, 3)}


def count_to(model: dict, n: int):
    yield from range(n)


@app.post("/fill")
async def fill(n: int, pool: MLPool = Depends(get_pool)) -> dict:
    """Queue ``n`` tiny jobs without waiting for room."""
    ids = [await pool.create_job_async(add, "m", args=(1,), block_until_scheduled=False) for _ in range(n)]
    return {"job_ids": ids}


@app.post("/wait-for-room")
async def wait_for_room(timeout: float, pool: MLPool = Depends(get_pool)) -> dict:
    return {"job_id": await pool.create_job_async(add, "m", args=(1,), timeout=timeout)}


@app.post("/caller-timeout")
async def caller_timeout(seconds: float, pool: MLPool = Depends(get_pool)) -> dict:
    job_id = await pool.create_job_async(spin, "m", args=(seconds,))
    return {"result": await pool.get_result_async(job_id, timeout=0.05)}


@app.post("/empty-error")
async def empty_error() -> dict:
    raise PoolBrokenError()


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    """Each message ``{"fn": ..., "arg": ..., "queue": bool}`` runs unguarded:
    a pool error leaves the endpoint and reaches the installed handlers."""
    await websocket.accept()
    pool = get_pool(websocket)
    while True:
        message = await websocket.receive_json()
        if message.get("queue"):
            job_id = await pool.create_job_async(add, "m", args=(1,), block_until_scheduled=False)
            await websocket.send_json({"job_id": job_id})
        else:
            args = () if message.get("arg") is None else (message["arg"],)
            await websocket.send_json({"result": await pool.score_async("m", FUNCTIONS[message["fn"]], *args)})
