"""A small HTTP load generator: a mixed load on keep-alive connections for a fixed time.

    python examples/loadtest.py --port 8000 [--rate 25] [--clients 16] [--image-clients 2]
                                [--seconds 10] [--label groups]

The load, the same whatever serves it:

- cheap requests: ``--clients`` connections alternating ``POST /iris`` and
  ``POST /diabetes`` (15 ms of CPU each), paced to ``--rate`` requests per
  second in all (each client sends one every ``clients / rate`` seconds, or
  at once if its previous answer came later than that);
- a steady stream of CPU-heavy requests: ``--image-clients`` connections
  uploading a 2400 x 1800 JPEG to ``POST /image`` back to back (decoding
  and resizing it costs about 100 ms of CPU);
- one more connection asks ``GET /healthz`` every 20 ms, to see how
  responsive the API stays.

Before the clock starts, a few requests of each kind warm the server up (not
counted). Progress goes to stderr: one line redrawn on a terminal, else (a
log file, a pipe) a line every 5 s and a last one. The figures go to stdout
as one JSON object. HTTP/1.1 is spoken directly over asyncio streams: a full
client library would spend more CPU than the server we are measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time

IRIS = json.dumps({"features": [6.2, 2.2, 4.5, 1.5]}).encode()
DIABETES = json.dumps({"features": [0.038, 0.05, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.02, -0.018]}).encode()
JSON = "application/json"
BOUNDARY = "mlpool-demo-boundary"


def image_upload(width: int = 2400, height: int = 1800) -> bytes:
    """A multipart/form-data body with one smooth JPEG (about 100 KB: well under the app's 2 MiB limit)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    jpeg = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(jpeg, format="JPEG", quality=85)
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="demo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n")  # fmt: skip
    return head.encode() + jpeg.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode()


class Connection:
    """One keep-alive HTTP/1.1 connection to localhost."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = JSON) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += f"Content-Type: {content_type}\r\n"
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


async def warm_up(port: int, upload: bytes, image_type: str, concurrency: int) -> None:
    """Each kind of request a few times at once, so that every worker has run each model once."""
    requests = [("/iris", IRIS, JSON), ("/diabetes", DIABETES, JSON), ("/image", upload, image_type)] * concurrency
    connections = [Connection(port) for _ in requests]
    try:
        await asyncio.gather(*(conn.request("POST", path, body, kind)
                               for conn, (path, body, kind) in zip(connections, requests, strict=True)))  # fmt: skip
    finally:
        for conn in connections:
            conn.close()


async def run(port: int, rate: float, clients: int, image_clients: int, seconds: float, label: str) -> dict:
    upload = image_upload()
    image_type = f"multipart/form-data; boundary={BOUNDARY}"
    await warm_up(port, upload, image_type, concurrency=max(2, image_clients))
    start = time.perf_counter()
    stop = start + seconds
    latencies: list[float] = []  # the cheap requests'
    image_latencies: list[float] = []
    health: list[float] = []
    errors = 0
    period = clients / rate  # between two requests of one cheap client

    async def send(conn: Connection, path: str, body: bytes, kind: str, into: list[float]) -> Connection:
        """One request, its latency recorded if it succeeded; the connection to use next."""
        nonlocal errors
        began = time.perf_counter()
        try:
            status, _ = await conn.request("POST", path, body, kind)
        except (ConnectionError, asyncio.IncompleteReadError):
            errors += 1
            conn.close()
            return Connection(port)
        if status == 200:
            into.append(time.perf_counter() - began)
        else:
            errors += 1
        return conn

    async def cheap_client(i: int) -> None:
        conn = Connection(port)
        due = start + period * i / clients  # the clients' requests spread evenly over a period
        try:
            while (now := time.perf_counter()) < stop:
                if due > now:
                    await asyncio.sleep(due - now)  # the client's pace, not a synchronisation
                path, body = ("/iris", IRIS) if i % 2 else ("/diabetes", DIABETES)
                conn = await send(conn, path, body, JSON, latencies)
                due = max(due + period, time.perf_counter())  # late: the next one at once, no burst to catch up
                i += 1
        finally:
            conn.close()

    async def image_client() -> None:
        conn = Connection(port)
        try:
            while time.perf_counter() < stop:
                conn = await send(conn, "/image", upload, image_type, image_latencies)
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

    # A terminal redraws one line; a log file or a pipe gets one line per step and the last one.
    redraw = sys.stderr.isatty()

    def show_progress() -> None:
        elapsed = min(seconds, time.perf_counter() - start)
        line = (f"  [{label}] {elapsed:4.1f}/{seconds:.0f} s  {len(latencies):5d} cheap, "
                f"{len(image_latencies):4d} image requests, {errors} errors")  # fmt: skip
        print("\r" + line if redraw else line, end="" if redraw else "\n", file=sys.stderr, flush=True)

    async def progress() -> None:
        while time.perf_counter() < stop:
            await asyncio.sleep(min(0.5 if redraw else 5.0, max(0.0, stop - time.perf_counter())))  # the pace
            if time.perf_counter() < stop:
                show_progress()

    await asyncio.gather(prober(), progress(), *(cheap_client(i) for i in range(clients)),
                         *(image_client() for _ in range(image_clients)))  # fmt: skip
    show_progress()
    if redraw:
        print(file=sys.stderr)
    elapsed = time.perf_counter() - start
    return {"label": label, "seconds": elapsed, "requests": len(latencies), "images": len(image_latencies),
            "errors": errors, "latencies": latencies, "image_latencies": image_latencies,
            "healthz": health}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=25.0, help="cheap requests per second, all clients together")
    parser.add_argument("--clients", type=int, default=16, help="connections sending the cheap requests")
    parser.add_argument("--image-clients", type=int, default=2, help="connections uploading images back to back")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--label", default="load")
    opts = parser.parse_args()
    if opts.rate <= 0 or opts.clients < 1 or opts.image_clients < 0 or opts.seconds <= 0:
        parser.error("--rate and --seconds must be positive, --clients at least 1, --image-clients at least 0")
    figures = asyncio.run(run(opts.port, opts.rate, opts.clients, opts.image_clients, opts.seconds, opts.label))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
