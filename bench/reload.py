"""A new model version under load: reload_models against restarting the pool.

    python bench/reload.py [--workers 4] [--model-mb 128] [--load 0.8] [--before 5] [--after 5]

A model of NumPy weights loaded from a .npy file, with a preparation step
that makes its load take about a second (as parsing a real model does), 4
workers, jobs of a few milliseconds of BLAS work. The pool's capacity is
measured first (jobs/s with 64 callers); then an open-loop client submits at
``--load`` of it (a job every 1/rate seconds, whatever the answers) from an
event loop, and after ``--before`` seconds a new weights file replaces the
old one and one of:

- ``reload_models()`` (surge=1): each new worker loads beside an old one;
- ``reload_models(surge=0)``: each old worker goes first;
- a restart, what users do today: ``shutdown_async()``, then a new
  ``MLPool`` (jobs submitted meanwhile fail, as requests to a restarting
  API process do);

then ``--after`` seconds more. Side by side in one run, for each: the jobs
that failed, p50/p99 latency before and during the change, how long the
change took, and the proportional set size (Pss: a shared page counts 1/n
in each of its n processes) of the API process and its workers, steady and
at its peak during the change. It writes a chart of every job's latency over
time to ``bench/results/reload_latency.png`` (with the ``demo`` extra's
matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import psutil

from mlpool import MLPool, MLPoolError

RESULTS = Path(__file__).resolve().parent / "results"
PREPARE_ROUNDS = 8  # matrix products in the load's preparation step: about a second here


def load_model(path: str) -> dict:
    weights = np.load(path)
    block = weights[:512]
    for _ in range(PREPARE_ROUNDS):  # what a real load spends parsing and preparing
        block = np.tanh(block @ weights[:, :512]) @ weights[:512]
    return {"weights": weights, "check": float(block[0, 0])}


def score(model: dict, row: int) -> float:
    """A few milliseconds of BLAS on a slice of the weights."""
    weights = model["weights"]
    start = (row * 64) % (weights.shape[0] - 1024)
    return float((weights[start : start + 1024] @ weights[:4].T).sum())


def write_weights(path: str, megabytes: int, seed: int) -> str:
    """A weights file beside ``path``, to publish with os.replace (atomic: a load never reads half a file)."""
    rows = megabytes * 2**20 // (4096 * 8)
    new = f"{path}.{seed}.npy"
    np.save(new, np.random.default_rng(seed).standard_normal((rows, 4096)))
    return new


def pss_mib() -> float:
    """The Pss of this process and every descendant, in MiB."""
    total = 0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


class MemorySampler(threading.Thread):
    """Pss every 100 ms: (seconds since start, MiB)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.samples.append((time.monotonic() - self.start_time, pss_mib()))


@dataclass
class Run:
    name: str
    jobs: list[tuple[float, float, bool]] = field(default_factory=list)  # (submitted at, latency, ok)
    change: tuple[float, float] = (0.0, 0.0)  # when the change started and ended (seconds)
    memory: list[tuple[float, float]] = field(default_factory=list)

    def latencies(self, start: float, end: float) -> list[float]:
        return [latency for at, latency, ok in self.jobs if ok and start <= at < end]

    def row(self) -> list[str]:
        begin, end = self.change
        before, during = self.latencies(0, begin), self.latencies(begin, end)
        failed = sum(1 for _, _, ok in self.jobs if not ok)
        steady = statistics.median([mib for at, mib in self.memory if at < begin] or [0.0])
        peak = max([mib for at, mib in self.memory if begin <= at <= end] or [0.0])
        return [
            self.name, f"{len(self.jobs)}", f"{failed}", ms(before, 50), ms(before, 99), ms(during, 50),
            ms(during, 99), f"{end - begin:.1f} s", f"{steady:.0f} MiB", f"{peak:.0f} MiB ({peak / steady:.2f}x)",
        ]  # fmt: skip


def ms(values: list[float], percentile: int) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, len(ordered) * percentile // 100)] * 1000:.1f} ms"


async def capacity(pool: MLPool, seconds: float = 3.0) -> float:
    """Jobs per second with 64 callers."""
    done, stop = 0, time.monotonic() + seconds

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await pool.score_async("m", score, done)
            done += 1

    await asyncio.gather(*(caller() for _ in range(64)))
    return done / seconds


async def under_load(name: str, make_pool, change, rate: float, before: float, after: float) -> Run:
    """Submit ``rate`` jobs/s; ``change(pool)`` after ``before`` s returns the pool to use next."""
    run, holder = Run(name), {}
    holder["pool"] = await make_pool()
    sampler = MemorySampler()
    sampler.start()
    origin = sampler.start_time
    tasks: set[asyncio.Task] = set()

    async def one(row: int) -> None:
        submitted = time.monotonic()
        pool = holder.get("pool")
        try:
            if pool is None:
                raise MLPoolError("no pool: it is restarting")
            await pool.score_async("m", score, row)
            ok = True
        except MLPoolError:
            ok = False
        run.jobs.append((submitted - origin, time.monotonic() - submitted, ok))

    async def client(until: asyncio.Event) -> None:
        row, next_at = 0, time.monotonic()
        while not until.is_set():
            task = asyncio.create_task(one(row))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            row += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # pacing, not synchronisation

    finished = asyncio.Event()
    load = asyncio.create_task(client(finished))
    await asyncio.sleep(before)
    begin = time.monotonic() - origin
    await change(holder)
    run.change = (begin, time.monotonic() - origin)
    await asyncio.sleep(after)
    finished.set()
    await load
    await asyncio.gather(*tasks)
    sampler.stop.set()
    sampler.join()
    run.memory = sampler.samples
    await holder["pool"].shutdown_async()
    return run


def chart(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), sharex=True, sharey=True)
    for ax, run in zip(axes, runs, strict=True):
        ok = [(at, latency * 1000) for at, latency, good in run.jobs if good]
        failed = [at for at, _, good in run.jobs if not good]
        ax.scatter([a for a, _ in ok], [lat for _, lat in ok], s=2, label="job latency")
        if failed:
            ax.scatter(failed, [0.5] * len(failed), s=4, color="red", marker="x", label=f"{len(failed)} failed")
        ax.axvspan(*run.change, color="orange", alpha=0.2, label="change")
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(run.name, fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds")
    figure.tight_layout()
    path.parent.mkdir(exist_ok=True)
    figure.savefig(path, dpi=90)
    return True


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model-mb", type=int, default=128)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=5.0)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="mlpool-reload-")
    path = os.path.join(directory, "weights.npy")
    os.replace(write_weights(path, args.model_mb, seed=1), path)
    loaders = {"m": partial(load_model, path)}

    async def new_pool() -> MLPool:
        pool = MLPool(loaders, nb_workers=args.workers, threads_per_worker=1)
        await pool.wait_ready()
        return pool

    started = time.perf_counter()
    load_model(path)
    load_seconds = time.perf_counter() - started
    pool = await new_pool()
    rate = await capacity(pool) * args.load
    await pool.shutdown_async()
    print(f"{args.workers} workers on {os.cpu_count()} cores, a model of {args.model_mb} MiB loading in "
          f"{load_seconds:.2f}s here; load {rate:.0f} jobs/s ({args.load:.0%} of the capacity)", flush=True)

    # Each change publishes a new weights file, written beforehand (a deployment copies it in first).
    versions = iter([write_weights(path, args.model_mb, seed) for seed in (2, 3, 4)])

    def reload(surge: int):
        async def change(holder: dict) -> None:
            os.replace(next(versions), path)
            await holder["pool"].reload_models_async(surge=surge)

        return change

    async def restart(holder: dict) -> None:
        os.replace(next(versions), path)
        old, holder["pool"] = holder["pool"], None
        await old.shutdown_async()
        holder["pool"] = await new_pool()

    runs = []
    for name, change in (("reload_models (surge=1)", reload(1)), ("reload_models(surge=0)", reload(0)),
                         ("restart the pool", restart)):  # fmt: skip
        runs.append(await under_load(name, new_pool, change, rate, args.before, args.after))
        print(f"  {name}: done", flush=True)
    header = ["", "jobs", "failed", "p50 before", "p99 before", "p50 during", "p99 during", "change took",
              "Pss steady", "Pss peak during"]  # fmt: skip
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in runs:
        print("| " + " | ".join(run.row()) + " |")
    if chart(runs, RESULTS / "reload_latency.png"):
        print(f"\nchart: {RESULTS / 'reload_latency.png'}")


if __name__ == "__main__":
    if sys.platform != "linux":
        sys.exit("Pss comes from /proc: Linux only")
    asyncio.run(main())
