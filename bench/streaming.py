"""Streaming (#17): time to first item, items per second, and the CPU-seconds a
worker spends after its client left, side by side in one run.

    python bench/streaming.py            # make bench-streaming
    python bench/streaming.py --smoke    # tiny sizes: checks the script runs

Two settings, each with its peers:
- in the API process, no HTTP: mlpool's ``pool.stream`` against a Ray actor's
  streaming generator (``num_returns="streaming"``, what Ray Serve streams
  with), whose consumer leaves by dropping the generator;
- over HTTP on loopback: mlpool behind uvicorn (``mlpool.fastapi.stream_response``)
  against Gunicorn's dirty workers (its ``asgi`` worker streaming
  ``DirtyClient.stream_async``), whose client leaves by closing the connection.

Each item costs ``WORK`` seconds of CPU in the worker for the "after the
client left" column: the client reads ``READ`` items of a stream that could
run ``LONG * WORK`` seconds, leaves, and the worker's CPU time is read over
the next ``OBSERVE`` seconds. Gunicorn is installed next to the benchmark
(``bench/.peers/gunicorn``, by ``make bench-streaming``); a peer that is
missing is reported as such. One worker each; results in
``bench/results/streaming.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import streaming_apps  # noqa: E402

PEERS = BENCH / ".peers"
GUNICORN_PATH = Path(os.environ.get("MLPOOL_BENCH_GUNICORN", PEERS / "gunicorn"))

SIZES = {
    "full": {"ttfi_runs": 30, "rate_items": 50_000, "work": 0.001, "long": 10_000, "read": 10, "observe": 3.0},
    "smoke": {"ttfi_runs": 3, "rate_items": 200, "work": 0.001, "long": 2_000, "read": 3, "observe": 0.3},
}

Opener = Callable[[int, float], tuple[Iterator, Callable[[], None]]]


def measure(open_stream: Opener, worker_pid: int, size: dict) -> dict[str, float]:
    """Time to first item (median), items/s, CPU-seconds after the consumer left."""
    firsts = []
    for _ in range(size["ttfi_runs"]):
        started = time.perf_counter()
        items, close = open_stream(1, 0.0)
        next(items)
        firsts.append(time.perf_counter() - started)
        close()
    items, close = open_stream(size["rate_items"], 0.0)
    started = time.perf_counter()
    count = sum(1 for _ in items)
    rate = count / (time.perf_counter() - started)
    close()
    worker = psutil.Process(worker_pid)
    items, close = open_stream(size["long"], size["work"])
    for _ in range(size["read"]):
        next(items)
    close()
    before = sum(worker.cpu_times()[:2])
    time.sleep(size["observe"])  # the measuring window, not a synchronisation
    after = sum(worker.cpu_times()[:2]) - before
    return {"first_item_ms": statistics.median(firsts) * 1e3, "items_per_s": rate, "cpu_after_leaving_s": after}


# ------------------------------------------------------------ in-process


def bench_mlpool(size: dict) -> dict[str, float]:
    from mlpool import MLPool

    with MLPool({"m": streaming_apps.load_nothing}, nb_workers=1) as pool:

        def open_stream(n: int, work: float) -> tuple[Iterator, Callable[[], None]]:
            stream = pool.stream("m", streaming_apps.ticks, n, work)
            return stream, stream.close

        return measure(open_stream, pool.score("m", streaming_apps.pid), size)


def bench_ray(size: dict) -> dict[str, float] | str:
    try:
        import ray
    except ImportError:
        return "not installed (pip install 'mlpool[ray]')"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(BENCH)}})  # fmt: skip

    @ray.remote
    class Ticks:
        def ticks(self, n: int, work: float) -> Iterator[int]:
            yield from streaming_apps.ticks(None, n, work)

        def pid(self) -> int:
            return os.getpid()

    try:
        actor = Ticks.remote()

        def open_stream(n: int, work: float) -> tuple[Iterator, Callable[[], None]]:
            generator = actor.ticks.options(num_returns="streaming").remote(n, work)
            holder = [generator]

            def items() -> Iterator:
                for ref in holder[0]:
                    yield ray.get(ref)

            return items(), holder.clear  # leaving: the consumer drops the generator

        return measure(open_stream, ray.get(actor.pid.remote()), size)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ HTTP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 120.0) -> int:
    """The worker pid once the server answers /pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            return int(httpx.get(f"{url}/pid", timeout=30).json()["pid"])
        except (httpx.TransportError, ValueError, KeyError):
            time.sleep(0.2)  # polling a server that is starting
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def http_opener(url: str, client: httpx.Client) -> Opener:
    def open_stream(n: int, work: float) -> tuple[Iterator, Callable[[], None]]:
        response = client.send(client.build_request("GET", f"{url}/stream", params={"n": n, "work": work}),
                               stream=True)  # fmt: skip
        lines = (line for line in response.iter_lines() if line)
        return lines, response.close  # closing mid-body drops the connection

    return open_stream


def bench_http(command: list[str], env: dict[str, str], url: str, size: dict) -> dict[str, float]:
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=BENCH,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        pid = wait_until_serving(url, process)
        with httpx.Client(timeout=300) as client:
            return measure(http_opener(url, client), pid, size)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def python_path(*first: Path) -> str:
    """``first``, then this process's PYTHONPATH made absolute (the servers run in bench/)."""
    inherited = [str(Path(entry).resolve()) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return os.pathsep.join([*map(str, first), *inherited])


def bench_mlpool_http(size: dict) -> dict[str, float]:
    port = free_port()
    path = python_path(BENCH)
    command = [sys.executable, "-m", "uvicorn", "streaming_apps:mlpool_app", "--factory", "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
    return bench_http(command, {"PYTHONPATH": path}, f"http://127.0.0.1:{port}", size)


def bench_gunicorn_http(size: dict) -> dict[str, float] | str:
    if not (GUNICORN_PATH / "gunicorn" / "dirty").is_dir():
        return f"not installed at {GUNICORN_PATH} (make bench-streaming installs it)"
    port = free_port()
    path = python_path(BENCH, GUNICORN_PATH)
    command = [sys.executable, "-m", "gunicorn", "streaming_apps:gunicorn_app", "--worker-class", "asgi",
               "--workers", "1", "--dirty-workers", "1", "--dirty-app", "streaming_apps:TicksApp",
               "--dirty-timeout", "600", "--bind", f"127.0.0.1:{port}", "--no-control-socket"]  # fmt: skip
    return bench_http(command, {"PYTHONPATH": path}, f"http://127.0.0.1:{port}", size)


# ------------------------------------------------------------------ main


def table(rows: dict[str, dict[str, float] | str], size: dict) -> str:
    lines = [
        f"Each item: {size['work'] * 1e3:g} ms of CPU in the worker for the last column; the consumer reads "
        f"{size['read']} items of {size['long']} and leaves; CPU read over the next {size['observe']:g} s.",
        "",
        "| system | first item (ms, median) | items/s | worker CPU-s after the client left |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {name} | {row} | | |")
        else:
            lines.append(f"| {name} | {row['first_item_ms']:.2f} | {row['items_per_s']:,.0f} | "
                         f"{row['cpu_after_leaving_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that the script runs")
    args = parser.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    rows: dict[str, dict[str, float] | str] = {}
    for name, run in [
        ("mlpool, in process", bench_mlpool),
        ("Ray actor streaming generator, in process", bench_ray),
        ("mlpool, HTTP (uvicorn + stream_response)", bench_mlpool_http),
        ("Gunicorn dirty worker, HTTP (asgi worker)", bench_gunicorn_http),
    ]:
        print(f"{name}...", file=sys.stderr, flush=True)
        rows[name] = run(size)
    text = table(rows, size)
    print(text)
    if not args.smoke:
        (BENCH / "results" / "streaming.md").write_text("# Streaming (bench/streaming.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
