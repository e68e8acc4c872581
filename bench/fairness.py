"""Two tenants, one flooding: fair queues (mlpool sessions) against a FIFO (ProcessPoolExecutor).

    python bench/fairness.py [--workers 2] [--flood 1000] [--job-ms 2] [--quiet-every-ms 20] [--no-memory]

The flooding tenant submits ``--flood`` jobs at once; the quiet tenant, in
another thread, submits one job every ``--quiet-every-ms`` until the flood is
served. Every job burns ``--job-ms`` of CPU. Side by side, in one run:

- mlpool, each tenant in its own ``pool.session()`` (a lane each: the lanes
  take turns), and ProcessPoolExecutor (one FIFO queue): the quiet tenant's
  latency p50 / p99, and Jain's fairness index over the two tenants'
  normalised throughput while the flood lasts: x_i = served_i / fair_i, where
  fair_i is tenant i's max-min fair share of the jobs served in that window
  (the quiet tenant asks for less than half, so its fair share is its
  demand). J = (sum x)^2 / (n sum x^2): 1 is fair, 1/n is one tenant served.
- Memory of 3 models x 4 workers: one shared group where every worker loads
  the 3 models (4 workers, 12 copies), against a group per model (2 + 1 + 1
  workers, 4 copies), each model ``--model-mb`` of weights; the proportional
  set size of the worker processes (``--no-memory`` skips it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor

import psutil
from memory import pss_mib  # bench/memory.py (this script's directory is on sys.path)

from mlpool import MLPool, Model


def load_nothing() -> dict:
    return {}


def burn(model: dict | None, seconds: float) -> float:
    """Hold the CPU for ``seconds``; returns when it ended (CLOCK_MONOTONIC is one clock for every process)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return time.monotonic()


def burn_plain(seconds: float) -> float:
    return burn(None, seconds)


Submit = Callable[[str, float], Future]  # (tenant, seconds) -> a future of when the job ended


def run_tenants(submit: Submit, flood: int, job_s: float, quiet_every: float) -> dict[str, float]:
    """Flood from this thread, the quiet tenant from another; the figures."""
    quiet: list[tuple[float, Future]] = []
    flood_done = threading.Event()

    def quiet_tenant() -> None:
        next_at = time.monotonic()
        while not flood_done.is_set():
            quiet.append((time.monotonic(), submit("quiet", job_s)))
            next_at += quiet_every
            flood_done.wait(max(0.0, next_at - time.monotonic()))  # pacing the load, not synchronising

    start = time.monotonic()
    thread = threading.Thread(target=quiet_tenant)
    thread.start()
    flooded = [submit("flood", job_s) for _ in range(flood)]
    ends = [f.result(timeout=600) for f in flooded]
    window_end = max(ends)
    flood_done.set()
    thread.join()
    quiet_ends = [(sent, f.result(timeout=600)) for sent, f in quiet]
    latencies = sorted(end - sent for sent, end in quiet_ends)
    asked = sum(1 for sent, _ in quiet_ends if sent <= window_end)
    served_quiet = sum(1 for _, end in quiet_ends if end <= window_end)
    served = len(ends) + served_quiet
    fair_quiet = min(asked, served / 2)
    shares = [served_quiet / fair_quiet if fair_quiet else 1.0, len(ends) / (served - fair_quiet)]
    jain = sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares))
    return {
        "quiet_p50_ms": statistics.median(latencies) * 1000,
        "quiet_p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "quiet_jobs": len(latencies),
        "jain": jain,
        "flood_s": window_end - start,
    }


def fairness(workers: int, flood: int, job_s: float, quiet_every: float) -> dict[str, dict[str, float]]:
    out = {}
    with MLPool({"m": load_nothing}, nb_workers=workers) as pool:
        pool.score("m", burn, 0.0)
        sessions = {"flood": pool.session(), "quiet": pool.session()}
        out["mlpool (a session per tenant)"] = run_tenants(
            lambda tenant, s: sessions[tenant].submit("m", burn, s), flood, job_s, quiet_every
        )
    with ProcessPoolExecutor(workers) as executor:
        executor.submit(burn_plain, 0.0).result()
        out["ProcessPoolExecutor (FIFO)"] = run_tenants(
            lambda tenant, s: executor.submit(burn_plain, s), flood, job_s, quiet_every
        )
    return out


def load_weights(megabytes: int) -> Callable[[], bytes]:
    def load() -> bytes:
        return os.urandom(megabytes * 2**20)  # private pages, as loaded weights are

    return load


def workers_pss() -> tuple[int, float]:
    children = [p for p in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    return len(children), sum(pss_mib(p.pid) for p in children)


def memory(model_mb: int, start_timeout: float) -> dict[str, tuple[int, float]]:
    names = ("a", "b", "c")
    out = {}
    shared = {name: load_weights(model_mb) for name in names}
    with MLPool(shared, nb_workers=4, start_timeout=start_timeout) as pool:
        for name in names:
            pool.submit(name, burn, 0.0).result(timeout=start_timeout)
        out["one shared group: 4 workers x 3 models"] = workers_pss()
    grouped = {name: Model(load_weights(model_mb), workers=n) for name, n in zip(names, (2, 1, 1), strict=True)}
    with MLPool(grouped, start_timeout=start_timeout) as pool:
        for name in names:
            pool.submit(name, burn, 0.0).result(timeout=start_timeout)
        out["a group per model: 2 + 1 + 1 workers"] = workers_pss()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--flood", type=int, default=1000)
    parser.add_argument("--job-ms", type=float, default=2.0)
    parser.add_argument("--quiet-every-ms", type=float, default=20.0)
    parser.add_argument("--model-mb", type=int, default=50)
    parser.add_argument("--start-timeout", type=float, default=60.0)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    print(f"{args.workers} workers, flood {args.flood} jobs of {args.job_ms} ms, a quiet job every "
          f"{args.quiet_every_ms} ms")  # fmt: skip
    print(f"{'':34} {'quiet p50 ms':>12} {'quiet p99 ms':>12} {'quiet jobs':>10} {'Jain':>6} {'flood s':>8}")
    figures = fairness(args.workers, args.flood, args.job_ms / 1000, args.quiet_every_ms / 1000)
    for name, f in figures.items():
        print(f"{name:34} {f['quiet_p50_ms']:12.1f} {f['quiet_p99_ms']:12.1f} {f['quiet_jobs']:10d} "
              f"{f['jain']:6.3f} {f['flood_s']:8.2f}")  # fmt: skip
    if args.no_memory:
        return
    print(f"\n3 models of {args.model_mb} MB each; proportional set size of the worker processes")
    try:
        for name, (count, mib) in memory(args.model_mb, args.start_timeout).items():
            print(f"{name:40} {count:3d} processes {mib:9.0f} MiB")
    except Exception as exc:  # say which part failed, and why
        print(f"memory part failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
