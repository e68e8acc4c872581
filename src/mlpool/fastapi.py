"""FastAPI (and Starlette) integration: the pool's lifespan, a dependency,
HTTP errors, and cancelling work for clients that went away.

::

    from fastapi import Depends, FastAPI, Request
    from mlpool import MLPool
    from mlpool.fastapi import cancel_on_disconnect, get_pool, install_error_handlers, pool_lifespan

    app = FastAPI(lifespan=pool_lifespan({"iris": load_iris}, nb_workers=2))
    install_error_handlers(app)

    @app.post("/iris")
    async def iris(body: Features, request: Request, pool: MLPool = Depends(get_pool)):
        return {"class": await cancel_on_disconnect(request, pool.score_async("iris", score_iris, body.features))}

Needs the ``fastapi`` extra (``pip install 'mlpool[fastapi]'``). Only
Starlette is imported, so plain Starlette apps can use it too.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Callable, TypeVar

try:
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import JSONResponse, Response
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("mlpool.fastapi needs FastAPI or Starlette: pip install 'mlpool[fastapi]'") from exc

from mlpool._errors import (
    JobTimeoutError,
    MLPoolError,
    ModelLoadError,
    PoolBrokenError,
    PoolClosedError,
    PoolFullError,
    ResultNotReadyError,
    SerializationError,
    UnknownJobError,
    UnknownModelError,
    WorkerCrashedError,
)
from mlpool._pool import MLPool

__all__ = ["ClientDisconnected", "cancel_on_disconnect", "error_status", "get_pool", "install_error_handlers", "pool_lifespan"]

T = TypeVar("T")

# The HTTP status for each pool error; the first matching class wins.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (PoolFullError, 503),
    (WorkerCrashedError, 503),
    (PoolBrokenError, 503),
    (PoolClosedError, 503),
    (JobTimeoutError, 504),
    (UnknownJobError, 404),
    (UnknownModelError, 404),
    (ResultNotReadyError, 409),
    (SerializationError, 500),
    (ModelLoadError, 500),
    (MLPoolError, 500),
)


class ClientDisconnected(Exception):
    """Raised by :func:`cancel_on_disconnect` when the client went away first."""


def pool_lifespan(
    models_to_load: Mapping[str, Callable[[], Any]], nb_workers: int | None = None, **pool_options: Any
) -> Callable[[Any], Any]:
    """A FastAPI/Starlette ``lifespan``: the pool starts with the app (without
    blocking its event loop) and shuts down with it.

    The pool is on ``app.state.mlpool`` and in the lifespan state
    (``request.state.mlpool``); :func:`get_pool` finds it. Arguments are
    those of :class:`MLPool`. To combine with your own lifespan, enter
    ``MLPool`` yourself in it: ``async with MLPool(...) as pool``.
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, MLPool]]:
        async with MLPool(models_to_load, nb_workers, **pool_options) as pool:
            app.state.mlpool = pool
            yield {"mlpool": pool}

    return lifespan


def get_pool(connection: HTTPConnection) -> MLPool:
    """A FastAPI dependency (``pool: MLPool = Depends(get_pool)``) for HTTP
    and WebSocket endpoints: the pool started by :func:`pool_lifespan`."""
    pool = getattr(connection.state, "mlpool", None) or getattr(connection.app.state, "mlpool", None)
    if pool is None:
        raise RuntimeError("no mlpool on this app: pass lifespan=pool_lifespan(...) to FastAPI(), or set app.state.mlpool")
    return pool


def error_status(exc: BaseException) -> int:
    """The HTTP status code for a pool error."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def install_error_handlers(app: Any, *, pool: MLPool | None = None) -> None:
    """Answer pool errors with their HTTP status and a JSON body naming the error.

    ``PoolFullError`` (503) carries ``Retry-After``: the seconds the queue
    needs to drain at the recent pace (at least 1), not a constant.
    ``WorkerCrashedError``, ``PoolBrokenError`` and ``PoolClosedError`` are
    503, ``JobTimeoutError`` 504, ``UnknownJobError`` and
    ``UnknownModelError`` 404; :class:`ClientDisconnected` gets a quiet 499.
    Your own exceptions raised by scoring functions are not touched: handle
    them as you would in-process.
    """

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status = error_status(exc)
        headers = {}
        if isinstance(exc, PoolFullError):
            found = pool or getattr(request.state, "mlpool", None) or getattr(request.app.state, "mlpool", None)
            wait = found.stats().estimated_wait if found is not None else 0.0
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc).splitlines()[0]}, status, headers=headers)

    async def client_left(request: Request, exc: Exception) -> Response:
        # Nobody reads this answer; 499 is nginx's "client closed request".
        return Response(status_code=499)

    app.add_exception_handler(MLPoolError, handle)
    app.add_exception_handler(ClientDisconnected, client_left)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (a pool call), cancelling it if the HTTP client disconnects first.

    Cancelling a ``score_async`` cancels its job: queued, it never runs;
    running, its result is discarded (use a ``pool.session(interrupt=True)``
    to free its worker's CPU at once). Raises :class:`ClientDisconnected`
    when the client went away; there is nobody left to answer.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected(f"the client of {request.url.path} disconnected before its result was ready")


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read before the endpoint ran, so the next ASGI message
    # for this request can only be http.disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
