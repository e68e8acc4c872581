"""A small FastAPI app for the integration tests: one worker, a queue of one,
endpoints that block on FIFOs so tests control what runs when."""

from __future__ import annotations

import asyncio
import os
import sys

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect

from helpers.workloads import add, load_constant, spin, touch, wait_for_release
from mlpool import MLPool
from mlpool.fastapi import ClientDisconnected, cancel_on_disconnect, get_pool, install_error_handlers, pool_lifespan

app = FastAPI(lifespan=pool_lifespan({"m": load_constant}, nb_workers=1, max_queue_size=1))
install_error_handlers(app)


@app.post("/block")
async def block(fifo: str, pool: MLPool = Depends(get_pool)) -> dict:
    return {"pid": await pool.score_async("m", wait_for_release, fifo)}


@app.post("/add")
async def add_one(x: int, request: Request, pool: MLPool = Depends(get_pool)) -> dict:
    return {"sum": await cancel_on_disconnect(request, pool.score_async("m", add, x))}


@app.post("/touch")
async def touch_file(path: str, request: Request, pool: MLPool = Depends(get_pool)) -> dict:
    try:
        return {"path": await cancel_on_disconnect(request, pool.score_async("m", touch, path))}
    except ClientDisconnected:
        print(f"client left: {path}", file=sys.stderr, flush=True)  # the tests wait for this line
        raise


@app.post("/queue-or-503")
async def queue_or_503(pool: MLPool = Depends(get_pool)) -> dict:
    # 10 ms of work: long enough never to be sent to a busy worker, so it waits in the queue
    return {"job_id": await pool.create_job_async(spin, "m", args=(0.01,), block_until_scheduled=False)}


@app.get("/result/{job_id}")
async def result(job_id: str, pool: MLPool = Depends(get_pool)) -> dict:
    return {"result": await pool.get_result_async(job_id, timeout=30)}


@app.post("/too-slow")
async def too_slow(pool: MLPool = Depends(get_pool)) -> dict:
    job_id = await pool.create_job_async(spin, "m", args=(600.0,), timeout=0.2)
    return {"result": await pool.get_result_async(job_id, timeout=30)}


@app.get("/pid")
async def pid() -> dict:
    return {"pid": os.getpid()}


@app.websocket("/ws")
async def stream(websocket: WebSocket) -> None:
    """Messages ``{"fn": "block"|"touch", "arg": ...}``; a client's jobs are cancelled when it leaves."""
    await websocket.accept()
    pool = get_pool(websocket)
    functions = {"block": wait_for_release, "touch": touch}
    async with pool.session(interrupt=True) as session:
        tasks = set()

        async def answer(message: dict) -> None:
            result = await session.score_async("m", functions[message["fn"]], message["arg"])
            await websocket.send_json({"result": result})

        try:
            while True:
                task = asyncio.ensure_future(answer(await websocket.receive_json()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except WebSocketDisconnect:
            for task in tasks:
                task.cancel()


@app.get("/stats")
async def stats(pool: MLPool = Depends(get_pool)) -> dict:
    snapshot = pool.stats()
    fields = ("queue_depth", "jobs_running", "jobs_completed", "worker_restarts", "jobs_cancelled", "jobs_timed_out")
    return {field: getattr(snapshot, field) for field in fields}
