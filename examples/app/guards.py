"""What keeps one client from hurting the others: request body limits and a
budget for the worker restarts that interrupting a job costs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    """ASGI middleware: a request body larger than its path's limit is answered
    413 before the endpoint reads it whole.

    A ``Content-Length`` over the limit is refused before a byte of the body is
    read. A body without one (chunked) is counted as it arrives: past the
    limit, the client gets the 413 and the endpoint sees a disconnect, so at
    most ``limit`` bytes are ever buffered or spooled.
    """

    def __init__(self, app: Callable[..., Any], *, default: int, limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.default = default
        self.limits = dict(limits or {})

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(send, limit)
            return
        received = 0
        refused = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    await _too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # after the 413, the endpoint's answer goes nowhere
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:  # the endpoint failed on the disconnect we made up: expected
                raise


async def _too_large(send: Callable[[Message], Any], limit: int) -> None:
    body = json.dumps({"error": "request body too large", "detail": f"this endpoint takes at most {limit} bytes"})
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body.encode()})


class InterruptBudget:
    """At most one interrupt (a worker killed and its models reloaded) per
    ``interval`` seconds, whoever asks: a client deleting jobs in a loop
    cannot turn the pool into a model-reloading machine."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """True (and the budget is spent) if an interrupt is allowed now."""
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return False
            self._next = now + self.interval
            return True
