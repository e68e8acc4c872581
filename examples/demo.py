"""The main job: the same FastAPI app, served three ways under the same mixed load.

    python examples/demo.py [--rate 25] [--clients 16] [--image-clients 2] [--seconds 15]

1. trains the demo's models on first run (XGBoost iris and diabetes, a CNN);
2. starts the app under uvicorn on loopback, scoring in the API process;
   drives it from a separate load-generator process (``loadtest.py``: cheap
   /iris and /diabetes requests at a steady rate, two clients uploading
   images to /image back to back, a /healthz probe every 20 ms); stops it.
   The load generator runs at a lower CPU priority (nice 5): it stands in
   for clients on other machines, and on a small machine it would otherwise
   take CPU from the server it measures;
3. does the same with scoring on one shared mlpool of 2 workers, each
   loading every model (cheap and image jobs wait for the same workers);
4. and on mlpool's worker groups, 2 workers too: the image CNN on a worker
   of its own, the XGBoost models on the other;
5. prints, side by side, the cheap requests' rate and latency, the images'
   rate, errors, /healthz p99 and the server's memory, and writes a PNG
   chart of the latency distributions.

Nothing is left running: each server is stopped (SIGINT, then SIGKILL after
a deadline) and its process tree checked.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SHARED = int(os.environ.get("MLPOOL_DEMO_WORKERS", "1"))  # as app.main reads them
IMAGE = int(os.environ.get("MLPOOL_DEMO_IMAGE_WORKERS", "1"))
MODES = {
    "in the API process": "inprocess",
    f"mlpool, one shared pool of {SHARED + IMAGE}": "shared",
    f"mlpool, groups: {IMAGE} image + {SHARED} shared": "groups",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """uvicorn serving app.main in one mode, in its own process."""

    def __init__(self, mode: str) -> None:
        self.port = free_port()
        env = dict(os.environ, MLPOOL_DEMO_MODE=mode, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--app-dir", str(HERE), "--port", str(self.port),
             "--host", "127.0.0.1", "--log-level", "info", "--no-access-log"],
            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.ready = threading.Event()
        self.log: list[str] = []
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if "Uvicorn running on" in line:  # after the lifespan started, once the socket listens
                self.ready.set()
        self.ready.set()  # the server exited: wait_ready() will say so

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self.ready.wait(timeout) or self.process.poll() is not None:
            raise RuntimeError(f"the server did not start:\n{''.join(self.log[-30:])}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (uvicorn shuts the app and its pool down), then SIGKILL; check no process is left."""
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            print("  the server ignored SIGINT; killing it", file=sys.stderr)
            self.process.kill()
            self.process.wait(timeout)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            proc.kill()
        if alive:
            raise RuntimeError(f"processes outlived the server: {alive}")

    def memory(self) -> float:
        """The server's processes' memory (PSS: shared pages split between them), in MiB."""
        total = 0
        for proc in [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def ms(value: float) -> str:
        return f"{value:.3g} ms" if value < 1000 else f"{value:.0f} ms"  # not 1.07e+03

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2))
    for index, (name, figures) in enumerate(results.items()):
        color = f"C{index}"
        for axis, key in ((left, "latencies"), (right, "healthz")):
            ordered = sorted(v * 1e3 for v in figures[key])
            if not ordered:
                continue
            p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
            # the figures go in the legend, where no two runs' labels can overlap
            axis.plot(ordered, [i / len(ordered) for i in range(len(ordered))], color=color,
                      label=f"{name}: p50 {ms(p50)}, p99 {ms(p99)}")  # fmt: skip
            axis.plot([p50], [0.5], marker="o", color=color)
            axis.plot([p99], [0.99], marker="^", color=color)
    left.set(title="Cheap requests (/iris, /diabetes) beside the image uploads", xlabel="latency (ms, log scale)",
             ylabel="share of requests at or under (o p50, ^ p99)", xscale="log")  # fmt: skip
    right.set(title="/healthz during the load", xlabel="latency (ms, log scale)", xscale="log")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        # 1, 2, 5, 10, 20, 50...: enough labelled ticks to read a value off a log axis
        axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)  # under the axis
    fig.suptitle("Same FastAPI app, same mixed load: in the API process, one shared pool, worker groups")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=25.0, help="cheap requests per second")
    parser.add_argument("--clients", type=int, default=16, help="connections sending the cheap requests")
    parser.add_argument("--image-clients", type=int, default=2, help="connections uploading images back to back")
    parser.add_argument("--seconds", type=float, default=15.0, help="of load for each of the three servers")
    opts = parser.parse_args()
    started = time.perf_counter()

    sys.path.insert(0, str(HERE))
    from app import models

    print("training the models on first run (XGBoost iris and diabetes, a CNN)...", flush=True)
    models.train_if_missing(with_cnn=True)

    results: dict[str, dict] = {}
    for name, mode in MODES.items():
        print(f"{name}: starting uvicorn...", flush=True)
        server = Server(mode)
        try:
            server.wait_ready()
            load = subprocess.run(
                ["nice", "-n", "5", sys.executable, str(HERE / "loadtest.py"), "--port", str(server.port),
                 "--rate", str(opts.rate), "--clients", str(opts.clients), "--image-clients", str(opts.image_clients),
                 "--seconds", str(opts.seconds), "--label", name],
                stdout=subprocess.PIPE, text=True, check=True, timeout=opts.seconds + 120,
            )  # fmt: skip
            results[name] = json.loads(load.stdout)
            results[name]["memory"] = server.memory()
        finally:
            server.stop()

    print(f"\n{opts.rate:g} cheap requests/s (/iris, /diabetes: 15 ms of CPU each) from {opts.clients} clients, "
          f"{opts.image_clients} clients uploading images (/image: about 100 ms each) back to back, "
          f"{opts.seconds:.0f} s each; /healthz probed every 20 ms meanwhile\n")  # fmt: skip
    print("| scoring | cheap req/s | cheap p50 | cheap p99 | images/s | errors | /healthz p99 | memory (PSS) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, figures in results.items():
        lat = figures["latencies"]
        print(
            f"| {name} | {figures['requests'] / figures['seconds']:.1f} | {percentile(lat, 0.5) * 1e3:.0f} ms | "
            f"{percentile(lat, 0.99) * 1e3:.0f} ms | {figures['images'] / figures['seconds']:.1f} | "
            f"{figures['errors']} | {percentile(figures['healthz'], 0.99) * 1e3:.1f} ms | {figures['memory']:.0f} MiB |"
        )
    base, shared, groups = (results[name] for name in MODES)

    def p99(figures: dict, key: str = "latencies") -> float:
        return percentile(figures[key], 0.99) * 1e3

    print(
        f"\nWith groups, the cheap requests' p99 was {p99(groups):.0f} ms, against {p99(shared):.0f} ms on one "
        f"shared pool of the same {SHARED + IMAGE} workers (where they wait behind images) and {p99(base):.0f} ms "
        f"in the API process; /healthz p99 went from {p99(base, 'healthz'):.0f} ms in the API process to "
        f"{p99(groups, 'healthz'):.1f} ms with groups."
    )
    OUT.mkdir(exist_ok=True)
    path = OUT / "demo_latency.png"
    chart(results, path)
    print(f"chart of the latency distributions: {path}")
    print(f"done in {time.perf_counter() - started:.0f} s; every server stopped, no process left behind.")


if __name__ == "__main__":
    main()
