"""A small HTTP load generator: N keep-alive connections for a fixed time.

    python examples/loadtest.py --port 8000 --clients 16 --seconds 10 [--label pool]

Each client alternates ``POST /iris`` and ``POST /diabetes``; one more
connection asks ``GET /healthz`` every 20 ms, to see how responsive the API
stays under load. A progress line goes to stderr; the figures go to stdout
as one JSON object. HTTP/1.1 is spoken directly over asyncio streams: a
full client library would spend more CPU than the server we are measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

IRIS = json.dumps({"features": [6.2, 2.2, 4.5, 1.5]}).encode()
DIABETES = json.dumps({"features": [0.038, 0.05, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.02, -0.018]}).encode()


class Connection:
    """One keep-alive HTTP/1.1 connection to localhost."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        assert self.reader is not None
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run(port: int, clients: int, seconds: float, label: str) -> dict:
    start = time.perf_counter()
    stop = start + seconds
    latencies: list[float] = []
    health: list[float] = []
    errors = 0

    async def client(i: int) -> None:
        nonlocal errors
        conn = Connection(port)
        k = i
        try:
            while time.perf_counter() < stop:
                path, body = ("/iris", IRIS) if k % 2 else ("/diabetes", DIABETES)
                began = time.perf_counter()
                try:
                    status, _ = await conn.request("POST", path, body)
                except (ConnectionError, asyncio.IncompleteReadError):
                    errors += 1
                    conn.close()
                    conn = Connection(port)
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors += 1
                k += 1
        finally:
            conn.close()

    async def prober() -> None:
        conn = Connection(port)
        try:
            while time.perf_counter() < stop:
                began = time.perf_counter()
                await conn.request("GET", "/healthz")
                health.append(time.perf_counter() - began)
                await asyncio.sleep(0.02)  # the probe's pace, not a synchronisation
        finally:
            conn.close()

    async def progress() -> None:
        while time.perf_counter() < stop:
            await asyncio.sleep(0.5)  # redraw pace
            elapsed = min(seconds, time.perf_counter() - start)
            print(f"\r  [{label}] {elapsed:4.1f}/{seconds:.0f} s  {len(latencies):6d} requests  {errors} errors",
                  end="", file=sys.stderr, flush=True)  # fmt: skip

    await asyncio.gather(prober(), progress(), *(client(i) for i in range(clients)))
    print(file=sys.stderr)
    elapsed = time.perf_counter() - start
    return {"label": label, "seconds": elapsed, "requests": len(latencies), "errors": errors,
            "latencies": latencies, "healthz": health}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--label", default="load")
    opts = parser.parse_args()
    print(json.dumps(asyncio.run(run(opts.port, opts.clients, opts.seconds, opts.label))))


if __name__ == "__main__":
    main()
