"""Memory and restart time: share_models=True against spawned workers.

    python bench/memory.py [--model-mb 300] [--workers 4] [--jobs 5000]

A model holding about 300 MB of NumPy weights, loaded from a .npy file (as
a real model is loaded from disk), 4 workers, once with spawned workers
(each loads its own copy) and once with share_models (one template loads,
the workers are forked from it). For each, side by side in one run:

- proportional set size (``Pss`` in ``/proc/PID/smaps_rollup``: a page
  shared by n processes counts 1/n in each) of the worker processes (and
  the template) and of the parent, after start and after the jobs;
- time from ``MLPool(...)`` to ready;
- time from SIGKILL of a worker to its replacement answering a job: every
  worker holds a blocking job, a quick job waits in the queue, one worker is
  killed; only its replacement can run the quick job;
- each worker's private memory (pages it shares with nobody) after the jobs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import psutil

from mlpool import MLPool, WorkerCrashedError


def load_weights(path: str) -> dict:
    return {"weights": np.load(path), "pid": os.getpid()}


def score(model: dict, i: int) -> float:
    """Touch a slice of the weights and the model's Python objects."""
    weights = model["weights"]
    start = (i * 4096) % (len(weights) - 4096)
    return float(weights[start : start + 4096].sum())


def block_on(model: dict, fifo: str) -> int:
    """Hold this worker until the benchmark writes to ``fifo``; the pid goes to fifo.pid."""
    Path(fifo + ".pid").write_text(str(os.getpid()))
    with open(fifo) as f:
        f.read()
    return os.getpid()


def pid_of(model: dict) -> int:
    return os.getpid()


def pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for pid {pid}")


def private_mib(pid: int) -> float:
    return psutil.Process(pid).memory_full_info().uss / 2**20


def pool_processes() -> list[int]:
    """Every descendant of this process that belongs to the pool (workers and template)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def time_replacement(pool: MLPool, workers: int, tmp: Path, round_: int) -> float:
    """Seconds from SIGKILL of a busy worker to its replacement answering a job."""
    fifos = []
    holds = []
    for i in range(workers):
        fifo = tmp / f"gate-{round_}-{i}"
        os.mkfifo(fifo)
        fifos.append(fifo)
        holds.append(pool.submit("m", block_on, str(fifo)))
    writers = []
    for fifo in fifos:  # opening for writing returns once a worker holds the gate
        writers.append(open(fifo, "w"))
    queued = pool.submit("m", pid_of)  # no worker is free: it waits in the queue
    victim = int(Path(str(fifos[0]) + ".pid").read_text())
    killed_at = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    new_pid = queued.result(timeout=600)
    elapsed = time.perf_counter() - killed_at
    assert new_pid != victim
    for writer in writers:
        writer.close()
    try:
        holds[0].result(timeout=60)
    except WorkerCrashedError:
        pass
    for hold in holds[1:]:
        hold.result(timeout=60)
    return elapsed


def measure(mode: str, path: str, workers: int, jobs: int, tmp: Path, rounds: int) -> dict:
    share = mode == "share_models"
    tmp = tmp / mode
    tmp.mkdir()
    started = time.perf_counter()
    pool = MLPool({"m": partial(load_weights, path)}, nb_workers=workers, share_models=share, threads_per_worker=1)
    try:
        ready = time.perf_counter() - started
        children = pool_processes()
        pss_start = sum(pss_mib(pid) for pid in children)
        for batch in range(0, jobs, 500):
            futures = [pool.submit("m", score, i) for i in range(batch, min(jobs, batch + 500))]
            for future in futures:
                future.result(timeout=60)
        children = pool_processes()
        pss_after = sum(pss_mib(pid) for pid in children)
        private = [private_mib(pid) for pid in children]
        parent = pss_mib(os.getpid())
        replacements = [time_replacement(pool, workers, tmp, r) for r in range(rounds)]
    finally:
        pool.shutdown()
    return {
        "mode": mode,
        "ready_s": ready,
        "processes": len(children),
        "pss_start_mib": pss_start,
        "pss_after_mib": pss_after,
        "private_max_mib": max(private),
        "parent_pss_mib": parent,
        "replacement_s": statistics.median(replacements),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-mb", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="replacement timings per mode (median)")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("bench/memory.py reads /proc: Linux only")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        path = str(tmp / "weights.npy")
        np.save(path, np.random.default_rng(0).random(args.model_mb * 2**20 // 8))
        model_mib = os.path.getsize(path) / 2**20
        results = [
            measure(mode, path, args.workers, args.jobs, tmp, args.rounds) for mode in ("spawned", "share_models")
        ]

    cores = len(os.sched_getaffinity(0))
    print(f"\nmodel: {model_mib:.0f} MiB of float64 weights (np.load); {args.workers} workers; "
          f"{args.jobs} jobs; {cores} cores; Python {sys.version.split()[0]}\n")
    print("| workers | ready in | Pss of pool processes, start | after jobs | ÷ model | "
          "max private per process | parent Pss | SIGKILL to replacement serving |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['mode']} ({r['processes']} processes) | {r['ready_s']:.2f} s | {r['pss_start_mib']:.0f} MiB "
            f"| {r['pss_after_mib']:.0f} MiB | {r['pss_after_mib'] / model_mib:.2f}x "
            f"| {r['private_max_mib']:.0f} MiB | {r['parent_pss_mib']:.0f} MiB "
            f"| {r['replacement_s'] * 1000:.1f} ms |"
        )
    spawned, shared = results
    print(
        f"\nshare_models: {shared['pss_after_mib'] / spawned['pss_after_mib']:.2f}x the memory of spawned workers, "
        f"replacement {spawned['replacement_s'] / shared['replacement_s']:.0f}x faster"
    )


if __name__ == "__main__":
    main()
