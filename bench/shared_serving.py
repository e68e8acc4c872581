"""Several API processes, one pool (#27): mlpool's shared pool against Gunicorn's
dirty workers and against a pool per API process, side by side in one run.

    python bench/shared_serving.py            # make bench-shared
    python bench/shared_serving.py --smoke    # short runs: checks the script runs

Setups, each with 2 model workers (the same model: 64 MiB loaded per worker,
``shared_apps.WORK`` = 20 ms of CPU per request), served over HTTP on loopback:

- uvicorn --workers 2, one shared pool (``share_across_processes``)
- uvicorn --workers 4, one shared pool
- one uvicorn process with its own pool
- uvicorn --workers 2, each with its own pool of 2 (what users do today: 4 workers)
- Gunicorn, 2 HTTP workers (its ``asgi`` worker) + 2 dirty workers

Load: ``CONNECTIONS`` client threads, each with one keep-alive connection,
sending requests back to back for ``seconds``; small JSON bodies, then 8 MB
arrays (raw float64 in the body). Meanwhile a probe in a process of its own
asks ``/healthz`` back to back: its p99 is how responsive the API stays. Then
the PSS of every process of the setup (servers, pool host, workers).

Last, a tiny job through the pool host against the same job in a pool of
this process (p50 of ``score``, interleaved rounds).

Gunicorn is installed next to the benchmark (``bench/.peers/gunicorn``, by
``make bench-shared``); results in ``bench/results/shared_serving.md``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / ".peers"
GUNICORN_PATH = Path(os.environ.get("MLPOOL_BENCH_GUNICORN", PEERS / "gunicorn"))
CONNECTIONS = 8
ARRAY = np.random.default_rng(1).random(2**20).tobytes()  # 8 MiB
SMALL = json.dumps({"features": [0.5] * 16}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python_path(*first: Path) -> str:
    inherited = [str(Path(entry).resolve()) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return os.pathsep.join([*map(str, first), *inherited])


class Server:
    def __init__(self, command: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(
            command, env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **env}, cwd=BENCH,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while True:  # a benchmark's start-up: ask until it answers
            try:
                status, _ = request(self.connect(), "GET", "/healthz")
                if status == 200 and self.ready():
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not start")
            time.sleep(0.2)

    def ready(self) -> bool:
        """Every API process answers a scoring request (the pools are loaded)."""
        try:
            status, _ = request(self.connect(), "POST", "/small", SMALL)
        except OSError:
            return False
        return status == 200

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def pss(self) -> int:
        total = 0
        for process in self.tree():
            try:
                total += process.memory_full_info().pss
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        tree = self.tree()
        self.process.send_signal(2)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        _, alive = psutil.wait_procs(tree, timeout=20)
        for process in alive:
            process.kill()


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers={"content-type": "application/octet-stream"} if body else {})
    response = conn.getresponse()
    return response.status, response.read()


def load(server: Server, path: str, body: bytes, seconds: float) -> dict[str, float]:
    """Requests/s of ``CONNECTIONS`` clients, and the /healthz p99 (ms) meanwhile."""
    stop = threading.Event()
    counts = [0] * CONNECTIONS
    errors = [0]

    def client(i: int) -> None:
        conn = server.connect()
        while not stop.is_set():
            status, _ = request(conn, "POST", path, body)
            if status == 200:
                counts[i] += 1
            else:
                errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    time.sleep(seconds * 0.2)  # warm-up, not counted
    # The probe runs in a process of its own: the load's threads do not delay it (GIL).
    receiver, sender = multiprocessing.get_context("spawn").Pipe(duplex=False)
    probe = multiprocessing.get_context("spawn").Process(target=probe_healthz, args=(server.port, seconds, sender))
    probe.start()
    start_counts, started = sum(counts), time.perf_counter()
    health = receiver.recv()  # the probe's latencies, once its seconds are over
    done, elapsed = sum(counts) - start_counts, time.perf_counter() - started
    probe.join()
    p99 = statistics.quantiles(health, n=100)[98] * 1e3 if len(health) > 100 else float("nan")
    stop.set()
    for thread in threads:
        thread.join()
    return {"rps": done / elapsed, "healthz_p99_ms": p99, "errors": errors[0]}


def probe_healthz(port: int, seconds: float, results: Any) -> None:
    """Ask /healthz back to back for ``seconds``; send the latencies."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        request(conn, "GET", "/healthz")
        latencies.append(time.perf_counter() - started)
    conn.close()
    results.send(latencies)


def uvicorn(workers: int, share: str) -> tuple[list[str], dict[str, str], int]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "shared_apps:mlpool_app", "--factory", "--port", str(port),
               "--log-level", "warning", "--no-access-log", "--workers", str(workers)]  # fmt: skip
    env = {"PYTHONPATH": python_path(BENCH), "BENCH_SHARE": share}
    return command, env, port


def gunicorn() -> tuple[list[str], dict[str, str], int] | str:
    if not (GUNICORN_PATH / "gunicorn" / "dirty").is_dir():
        return f"not installed at {GUNICORN_PATH} (make bench-shared installs it)"
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "shared_apps:gunicorn_app", "--worker-class", "asgi",
               "--workers", "2", "--dirty-workers", "2", "--dirty-app", "shared_apps:ModelApp",
               "--dirty-timeout", "600", "--bind", f"127.0.0.1:{port}", "--no-control-socket"]  # fmt: skip
    return command, {"PYTHONPATH": python_path(BENCH, GUNICORN_PATH)}, port


SETUPS = {
    "uvicorn --workers 2, one shared pool": lambda: uvicorn(2, "bench-shared-2"),
    "uvicorn --workers 4, one shared pool": lambda: uvicorn(4, "bench-shared-4"),
    "1 uvicorn process, its own pool": lambda: uvicorn(1, ""),
    "uvicorn --workers 2, a pool each (4 workers)": lambda: uvicorn(2, ""),
    "Gunicorn: 2 HTTP workers + 2 dirty workers": gunicorn,
}


def run_setup(name: str, seconds: float) -> dict[str, float] | str:
    spec = SETUPS[name]()
    if isinstance(spec, str):
        return spec
    server = Server(*spec)
    try:
        small = load(server, "/small", SMALL, seconds)
        array = load(server, "/array", ARRAY, seconds)
        return {
            "small_rps": small["rps"], "array_rps": array["rps"], "healthz_p99_small": small["healthz_p99_ms"],
            "healthz_p99_array": array["healthz_p99_ms"], "pss_mib": server.pss() / 2**20,
            "errors": small["errors"] + array["errors"],
        }  # fmt: skip
    finally:
        server.stop()


# --------------------------------------------------------------- tiny jobs


def tiny(model: object, x: int) -> int:
    return x


def tiny_jobs(rounds: int, jobs: int) -> dict[str, float]:
    """p50 of a tiny ``score`` (µs): through a pool host, and in a pool of this process."""
    sys.path.insert(0, str(BENCH))
    from mlpool import MLPool

    os.environ["MLPOOL_SHARE_GRACE"] = "0.5"
    samples: dict[str, list[float]] = {"own": [], "shared": []}
    with MLPool({"m": dict}, 2) as own, MLPool({"m": dict}, 2, share_across_processes="bench-tiny") as shared:
        for pool in (own, shared):
            for i in range(200):
                pool.score("m", tiny, i)
        for _ in range(rounds):
            for name, pool in (("own", own), ("shared", shared)):
                for i in range(jobs):
                    started = time.perf_counter()
                    pool.score("m", tiny, i)
                    samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1e6 for name, values in samples.items()}


# ------------------------------------------------------------------ main


def table(rows: dict[str, dict[str, float] | str], seconds: float, tiny_p50: dict[str, float]) -> str:
    lines = [
        f"{CONNECTIONS} connections, {seconds:g} s per workload; 2 model workers of 20 ms per request "
        "(4 in the row that has a pool per API process); 2 cores shared by clients and servers.",
        "",
        "| setup | small JSON req/s | 8 MB array req/s | /healthz p99 (ms), small / array | PSS of all processes |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {name} | {row} | | | |")
            continue
        errors = f" ({row['errors']:.0f} errors)" if row["errors"] else ""
        lines.append(
            f"| {name}{errors} | {row['small_rps']:.1f} | {row['array_rps']:.1f} | {row['healthz_p99_small']:.2f} / "
            f"{row['healthz_p99_array']:.2f} | {row['pss_mib']:,.0f} MiB |"
        )
    lines += [
        "",
        f"A tiny job (`score`, p50): {tiny_p50['shared']:.0f} µs through the pool host, {tiny_p50['own']:.0f} µs in "
        f"a pool of the calling process ({tiny_p50['shared'] / tiny_p50['own']:.2f}x).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="short runs: check that the script runs")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else args.seconds
    rows: dict[str, dict[str, float] | str] = {}
    for name in SETUPS:
        print(f"{name}...", file=sys.stderr, flush=True)
        rows[name] = run_setup(name, seconds)
    tiny_p50 = tiny_jobs(2 if args.smoke else 5, 200 if args.smoke else 2000)
    text = table(rows, seconds, tiny_p50)
    print(text)
    if not args.smoke:
        (BENCH / "results" / "shared_serving.md").write_text("# Several API processes (bench/shared_serving.py)\n\n"
                                                           + text + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
