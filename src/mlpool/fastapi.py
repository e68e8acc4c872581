"""FastAPI (and Starlette) integration: the pool's lifespan, a dependency,
HTTP errors, and cancelling work for clients that went away.

::

    from fastapi import Depends, FastAPI, Request
    from mlpool import MLPool
    from mlpool.fastapi import cancel_on_disconnect, get_pool, install_error_handlers, pool_lifespan

    app = FastAPI(lifespan=pool_lifespan({"iris": load_iris}, nb_workers=2, start_timeout=120))
    install_error_handlers(app)

    @app.post("/iris")
    async def iris(body: Features, request: Request, pool: MLPool = Depends(get_pool)):
        return {"class": await cancel_on_disconnect(request, pool.score_async("iris", score_iris, body.features))}

Needs FastAPI or Starlette (the ``fastapi`` extra). Only
Starlette is imported, so plain Starlette apps can use it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from types import FrameType
from typing import Any, TypeVar

from mlpool.errors import missing_dependency

try:
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.websockets import WebSocket, WebSocketState
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing_dependency("mlpool.fastapi", "FastAPI or Starlette", "fastapi>=0.110", "fastapi") from exc

from mlpool._api.pool import MLPool
from mlpool._api.streams import AsyncStream
from mlpool.errors import (
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

__all__ = [
    "RETRY_AFTER_MAX",
    "RETRY_AFTER_STARTING",
    "ClientDisconnected",
    "cancel_on_disconnect",
    "stream_response",
    "error_body",
    "error_status",
    "get_pool",
    "install_error_handlers",
    "pool_lifespan",
    "retry_after",
    "websocket_close_code",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)

RETRY_AFTER_MAX = 60  # seconds: past a minute an estimate says nothing; clients should look again
RETRY_AFTER_STARTING = 5  # seconds, while the workers load their models (how long is unknowable)

# The HTTP status for each error; the first matching class wins. A plain
# TimeoutError is a caller's own wait (get_result(timeout=...)) running out.
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
    (TimeoutError, 504),
)

# What a client is told: a fixed sentence per class. The exception's own
# message names pids, functions and OS errors: it goes to the log only.
_PUBLIC_DETAIL: tuple[tuple[type[BaseException], str], ...] = (
    (PoolFullError, "the server is busy: try again later"),
    (WorkerCrashedError, "the worker running this job stopped: try again"),
    (PoolBrokenError, "the server cannot score right now"),
    (PoolClosedError, "the server is shutting down"),
    (JobTimeoutError, "the job took too long"),
    (UnknownJobError, "no such job: never created, already fetched, cancelled or expired"),
    (UnknownModelError, "no such model"),
    (ResultNotReadyError, "the job has not finished yet"),
    (SerializationError, "the job's data could not be sent to a worker"),
    (MLPoolError, "the server could not score this request"),
    (TimeoutError, "the result was not ready in time"),
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
    those of :class:`MLPool`; give web apps a ``start_timeout`` (a loader
    that hangs otherwise holds the start for its default of 600 s).

    The wait for the workers is cancellable: SIGINT or SIGTERM (Ctrl-C, a
    container stop) while they load ends it at once, stops the workers and
    fails the start with a ``RuntimeError`` saying so; the server's own
    handler still sees the signal and exits. (uvicorn only notes a signal
    during start-up, it does not cancel the lifespan.) To combine with your
    own lifespan, enter ``MLPool`` yourself in it: ``async with MLPool(...) as pool``.
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, MLPool]]:
        pool = MLPool(models_to_load, nb_workers, **pool_options)  # in a loop: returns while workers load
        task = asyncio.current_task()
        assert task is not None
        # Loading workers hold no job: on a signal they are stopped at once, not after a grace period.
        stop_now = partial(pool.shutdown, wait=False, cancel_pending=True, timeout=0.0)
        with _cancel_on_exit_signals(task, stop_now) as received:
            try:
                await pool.wait_ready()  # on any failure, cancellation included, it stops the workers
            except asyncio.CancelledError:
                if not received:
                    raise
                if sys.version_info >= (3, 11):  # Python 3.10 counts no cancellations
                    task.uncancel()
                names = ", ".join(signal.Signals(s).name for s in received)
                raise RuntimeError(f"{names} while the pool's workers loaded their models: start abandoned") from None
        try:
            app.state.mlpool = pool
            yield {"mlpool": pool}
        finally:
            await pool.shutdown_async()

    return lifespan


@contextmanager
def _cancel_on_exit_signals(task: asyncio.Task[Any], first: Callable[[], None]) -> Iterator[list[int]]:
    """On SIGINT or SIGTERM while in the block: call ``first`` and cancel
    ``task`` (both on the loop's thread), and call the handler that was there before.

    Yields the signals received. Only the main thread can set handlers;
    elsewhere this does nothing.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    inside = True

    def cancel_if_inside() -> None:  # on the loop: a signal just after the block must not cancel what follows
        if inside:
            first()
            task.cancel()

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        loop.call_soon_threadsafe(cancel_if_inside)
        chained = previous.get(signum)
        if callable(chained):  # the server's own handler (uvicorn: note it, exit after start-up)
            chained(signum, frame)

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield received
    finally:
        inside = False
        for number, old in previous.items():
            if signal.getsignal(number) is handler:
                signal.signal(number, old if old is not None else signal.SIG_DFL)


def get_pool(connection: HTTPConnection) -> MLPool:
    """A FastAPI dependency (``pool: MLPool = Depends(get_pool)``) for HTTP
    and WebSocket endpoints: the pool started by :func:`pool_lifespan`."""
    pool = getattr(connection.state, "mlpool", None) or getattr(connection.app.state, "mlpool", None)
    if pool is None:
        raise RuntimeError(
            "no mlpool on this app: pass lifespan=pool_lifespan(...) to FastAPI(), or set app.state.mlpool"
        )
    return pool


def error_status(exc: BaseException) -> int:
    """The HTTP status code for a pool error (or a caller's ``TimeoutError``).

    A :class:`JobTimeoutError` whose deadline passed while it waited for room
    in a full queue (``waiting_for_room``) is a 503 like :class:`PoolFullError`:
    the server is busy, nothing ran.
    """
    if getattr(exc, "waiting_for_room", False):
        return 503
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def websocket_close_code(exc: BaseException) -> int:
    """The WebSocket close code for a pool error: 1013 (try again later) when
    the pool is busy or closing, 1008 for a request naming an unknown model
    or job, 1011 (internal error) for the rest: broken pool, crashed worker,
    timed-out job."""
    if isinstance(exc, (PoolFullError, PoolClosedError)) or getattr(exc, "waiting_for_room", False):
        return 1013
    if isinstance(exc, (UnknownModelError, UnknownJobError, ResultNotReadyError)):
        return 1008
    if isinstance(exc, TimeoutError) and not isinstance(exc, MLPoolError):
        return 1013
    return 1011


def retry_after(pool: MLPool | None) -> int:
    """Seconds for a ``Retry-After`` header, from 1 to :data:`RETRY_AFTER_MAX`.

    The time the queue needs to drain at the recent pace; while the pool
    starts (no pace known yet, models loading) at least
    :data:`RETRY_AFTER_STARTING`.
    """
    if pool is None:
        return 1
    stats = pool.stats()
    wait = stats.estimated_wait
    if stats.state == "starting":
        wait = max(wait, RETRY_AFTER_STARTING)
    return min(RETRY_AFTER_MAX, max(1, math.ceil(wait)))


def error_body(exc: BaseException, *, expose_details: bool = False) -> dict[str, str]:
    """The JSON body :func:`install_error_handlers` answers for ``exc``:
    ``{"error": <class name>, "detail": <sentence>}``; for WebSocket handlers
    that answer a failed message and keep the connection."""
    return {"error": type(exc).__name__, "detail": _public_detail(exc, expose_details)}


def _public_detail(exc: BaseException, expose: bool) -> str:
    if isinstance(exc, UnknownModelError) and exc.model_name is not None and not expose:
        name = repr(exc.model_name)  # the client's own words, in a JSON string: cut, not trusted
        return f"no such model: {name if len(name) <= 80 else name[:77] + '...'}"
    if expose:
        lines = str(exc).strip().splitlines()
        if lines:
            return lines[0]
    for cls, text in _PUBLIC_DETAIL:
        if isinstance(exc, cls):
            return text
    return "the server could not score this request"


def install_error_handlers(app: Any, *, pool: MLPool | None = None, expose_details: bool = False) -> None:
    """Answer pool errors with their HTTP status and a JSON body naming the error.

    The body is ``{"error": <class name>, "detail": <sentence>}``. The detail
    is a fixed sentence per class unless ``expose_details`` (then the first
    line of the message, which can name pids, functions and OS errors), and
    names what the client asked for where it can act on it (the model of an
    ``UnknownModelError``). The log (``mlpool.fastapi``) always has the whole
    message: at WARNING, and a 500 at ERROR with its traceback.

    ``PoolFullError``, and a ``JobTimeoutError`` that ran out waiting for
    room in a full queue, are 503 with ``Retry-After`` (:func:`retry_after`:
    the queue's drain time at the recent pace, capped at 60 s; at least 5 s
    while the pool starts). ``WorkerCrashedError``, ``PoolBrokenError`` and
    ``PoolClosedError`` are 503, ``JobTimeoutError`` and a plain
    ``TimeoutError`` (a caller's own wait) 504, ``UnknownJobError`` and
    ``UnknownModelError`` 404; :class:`ClientDisconnected` gets a quiet 499.

    In a WebSocket endpoint the same errors close the socket (an HTTP
    response cannot be sent there) with :func:`websocket_close_code` and a
    short reason. Your own exceptions raised by scoring functions are not
    touched: handle them as you would in-process.
    """

    async def handle(connection: HTTPConnection, exc: Exception) -> Response | None:
        status = error_status(exc)
        # At WARNING, so that a default setup shows it (plain uvicorn configures only its own loggers);
        # a 500 (mlpool or the app went wrong) at ERROR with the traceback.
        logger.log(logging.ERROR if status == 500 else logging.WARNING, "%s on %s: %s: %s", status,
                   connection.url.path, type(exc).__name__, exc, exc_info=exc if status == 500 else None)  # fmt: skip
        detail = _public_detail(exc, expose_details)
        if isinstance(connection, WebSocket):
            await _close_websocket(connection, websocket_close_code(exc), f"{type(exc).__name__}: {detail}")
            return None
        headers = {}
        if status == 503 and (isinstance(exc, PoolFullError) or getattr(exc, "waiting_for_room", False)):
            found = pool or getattr(connection.state, "mlpool", None) or getattr(connection.app.state, "mlpool", None)
            headers["Retry-After"] = str(retry_after(found))
        return JSONResponse(error_body(exc, expose_details=expose_details), status, headers=headers)

    async def client_left(request: Request, exc: Exception) -> Response:
        # Nobody reads this answer; 499 is nginx's "client closed request".
        return Response(status_code=499)

    app.add_exception_handler(MLPoolError, handle)
    app.add_exception_handler(TimeoutError, handle)
    app.add_exception_handler(ClientDisconnected, client_left)


async def _close_websocket(websocket: WebSocket, code: int, reason: str) -> None:
    if WebSocketState.DISCONNECTED in (websocket.application_state, websocket.client_state):
        return
    reason = reason.encode()[:123].decode(errors="ignore")  # a close frame's reason is at most 123 bytes
    try:
        await websocket.close(code, reason)
    except (RuntimeError, OSError) as exc:  # the client went away meanwhile
        logger.debug("could not close the WebSocket on %s: %s", websocket.url.path, exc)


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


# Server-sent events and NDJSON: the media type and how one item (or the error
# that ended the stream) is framed.
_STREAM_FORMATS: dict[str, tuple[str, Callable[[str], str], Callable[[str], str]]] = {
    "sse": ("text/event-stream", lambda data: f"data: {data}\n\n", lambda data: f"event: error\ndata: {data}\n\n"),
    "ndjson": ("application/x-ndjson", lambda data: f"{data}\n", lambda data: f"{data}\n"),
}


async def stream_response(
    items: AsyncStream,
    request: Request | None = None,
    *,
    format: str = "ndjson",
    encode: Callable[[Any], str] = json.dumps,
    expose_details: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A ``StreamingResponse`` sending each item of ``pool.stream_async(...)``
    as it comes: server-sent events (``format="sse"``: ``data: <json>``) or
    NDJSON (one JSON document per line); ``encode`` turns an item into text.
    ``return await stream_response(...)`` in an endpoint.

    It waits for the first item: a stream that fails before it (the pool
    full or closed, the generator raising at once, its timeout) raises here,
    so the app's error handlers give the response its status (503, 504...:
    see :func:`install_error_handlers`). The stream is closed, which stops its
    generator in the worker at its next ``yield``, when the response ends for
    any reason: the last item sent, a send failing, Starlette cancelling the
    response, or (with ``request``) the client disconnecting while the
    response waits for the next item. A client that leaves is a normal end,
    logged at DEBUG at most; one that left before the first item gets an empty
    499 (nginx's "client closed request", as :class:`ClientDisconnected`),
    which nobody reads. An error after the first item cannot change the
    status: it ends the stream with one last frame, :func:`error_body` as
    JSON (an ``event: error`` in SSE), and is logged.
    """
    if format not in _STREAM_FORMATS:
        items.close()
        raise ValueError(f"format must be one of {sorted(_STREAM_FORMATS)}, not {format!r}")
    media_type, frame, error_frame = _STREAM_FORMATS[format]
    extra = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} if format == "sse" else {}
    watcher = None if request is None else asyncio.ensure_future(_close_on_disconnect(request, items))
    first: list[Any] = []
    try:
        await items.__aenter__()
        async for item in items:
            first.append(item)
            break
    except BaseException as exc:
        items.close()
        if isinstance(exc, Exception) and _client_left(watcher):  # it closed the stream under us
            return Response(status_code=499)
        if watcher is not None:
            watcher.cancel()
        raise
    if not first and _client_left(watcher):  # not a stream without items: the client left
        return Response(status_code=499)

    async def body() -> AsyncIterator[str]:
        try:
            for item in first:
                yield frame(encode(item))
            first.clear()
            while True:
                # A turn for the server between buffered items, which need no
                # wait: it sees a lost connection before the next write, and
                # the disconnect reaches the watcher, which closes the stream.
                await asyncio.sleep(0)  # sleep-ok: a turn for the loop, not a wait
                if items.closed:  # by the watcher: the client left, a normal end
                    logger.debug("the client of the stream on %s left", request.url.path if request else "?")
                    return
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    return
                yield frame(encode(item))
        except Exception as exc:  # the status is sent: the last frame says it failed
            logger.warning("stream on %s ended by %s: %s", "?" if request is None else request.url.path,
                           type(exc).__name__, exc)  # fmt: skip
            yield error_frame(json.dumps(error_body(exc, expose_details=expose_details)))
        finally:
            items.close()
            if watcher is not None:
                watcher.cancel()

    return StreamingResponse(body(), media_type=media_type, headers={**extra, **(headers or {})})


def _client_left(watcher: asyncio.Future | None) -> bool:
    """Whether the disconnect watcher of a stream saw its client leave (and closed the stream)."""
    return watcher is not None and watcher.done() and not watcher.cancelled() and watcher.exception() is None


async def _close_on_disconnect(request: Request, items: AsyncStream) -> None:
    await _wait_for_disconnect(request)
    items.close()  # the response's wait for the next item ends; the generator stops
