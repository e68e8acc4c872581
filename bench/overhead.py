"""Per-job overhead of mlpool next to the raw pipe and ProcessPoolExecutor, in one run.

    python bench/overhead.py [--quick]

Prints, side by side:
- the raw round trip of a small message between two Python processes (the floor);
- sequential tiny-job latency p50/p99: mlpool ``score`` and ``score_async``,
  ProcessPoolExecutor ``submit().result()`` and ``run_in_executor``;
- throughput with 64 concurrent async callers, and how late a 1 ms
  ``asyncio.sleep`` wakes meanwhile (event-loop lag);
- throughput of a hungry job (about 20 ms of pure-Python CPU) against the
  ideal nb_workers / single-call time.

Speed is measured here, never asserted in tests. Figures vary with the
machine's load: compare columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time
from functools import partial

from mlpool import MLPool

NB_WORKERS = 2
CONCURRENCY = 64

# ----------------------------------------------------------- the workloads
# Module-level so they pickle by reference in every system.

_MODEL = None


def load_model() -> dict:
    return {"bias": 1}


def tiny(model: dict, x: int) -> int:
    return x + model["bias"]


def hungry(model: dict, loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i
    return total + model["bias"]


def _ppe_init() -> None:
    global _MODEL
    _MODEL = load_model()


def ppe_tiny(x: int) -> int:
    return tiny(_MODEL, x)


def ppe_hungry(loops: int) -> int:
    return hungry(_MODEL, loops)


def _echo(conn) -> None:
    fd = conn.fileno()
    while data := os.read(fd, 65536):
        os.write(fd, data)


# ------------------------------------------------------------- measuring


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def time_calls(call, n: int) -> list[float]:
    for _ in range(min(200, n)):
        call()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


async def time_calls_async(call, n: int) -> list[float]:
    for _ in range(min(200, n)):
        await call()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        out.append(time.perf_counter() - start)
    return out


def raw_round_trip(n: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(theirs,))
    proc.start()
    theirs.close()
    fd = ours.fileno()
    message = b"x" * 64

    def once() -> None:
        os.write(fd, message)
        os.read(fd, 65536)

    try:
        return time_calls(once, n)
    finally:
        ours.close()
        proc.join(5)


async def load_test(call, duration: float) -> tuple[float, list[float], list[float]]:
    """jobs/s, per-job latencies and loop-lag samples with CONCURRENCY callers."""
    stop = time.perf_counter() + duration
    latencies: list[float] = []
    lags: list[float] = []
    done = 0

    async def caller(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - start)
            done += 1

    async def ticker() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    begin = time.perf_counter()
    await asyncio.gather(ticker(), *(caller(i) for i in range(CONCURRENCY)))
    return done / (time.perf_counter() - begin), latencies, lags


def hungry_loops(target: float) -> int:
    loops = 100_000
    while True:
        start = time.perf_counter()
        hungry(None or {"bias": 0}, loops)
        took = time.perf_counter() - start
        if took > 0.005:
            return int(loops * target / took)
        loops *= 2


def hungry_throughput(submit_many, loops: int, jobs: int) -> float:
    start = time.perf_counter()
    submit_many(loops, jobs)
    return jobs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    opts = parser.parse_args()
    n = 2000 if opts.quick else 10000
    duration = 2.0 if opts.quick else 5.0
    hungry_jobs = 20 if opts.quick else 60
    rows: list[tuple[str, str, str]] = []

    def row(name: str, mlpool_value: str, ppe_value: str) -> None:
        rows.append((name, mlpool_value, ppe_value))
        print(f"  {name:<44} {mlpool_value:>16} {ppe_value:>16}", flush=True)

    us = lambda s: f"{s * 1e6:,.0f} µs"  # noqa: E731
    ms = lambda s: f"{s * 1e3:,.2f} ms"  # noqa: E731

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {NB_WORKERS} workers, {CONCURRENCY} async callers")
    raw50, raw99 = percentiles(raw_round_trip(n))
    print(f"raw pipe round trip: p50 {us(raw50)}, p99 {us(raw99)}")
    print(f"  {'':<44} {'mlpool':>16} {'ProcessPool':>16}")

    loops = hungry_loops(0.020)
    single = min(time_calls(lambda: hungry({"bias": 0}, loops), 5))

    with MLPool({"m": load_model}, nb_workers=NB_WORKERS) as pool, concurrent.futures.ProcessPoolExecutor(
        NB_WORKERS, mp_context=multiprocessing.get_context("spawn"), initializer=_ppe_init
    ) as ppe:
        m_sync = percentiles(time_calls(lambda: pool.score("m", tiny, 1), n))
        p_sync = percentiles(time_calls(lambda: ppe.submit(ppe_tiny, 1).result(), n))
        row("sync tiny job p50", us(m_sync[0]), us(p_sync[0]))
        row("sync tiny job p99", us(m_sync[1]), us(p_sync[1]))
        row("sync p50 / raw round trip", f"{m_sync[0] / raw50:.2f}x", f"{p_sync[0] / raw50:.2f}x")

        async def sequential() -> tuple:
            loop = asyncio.get_running_loop()
            m = percentiles(await time_calls_async(lambda: pool.score_async("m", tiny, 1), n))
            p = percentiles(await time_calls_async(lambda: loop.run_in_executor(ppe, ppe_tiny, 1), n))
            return m, p

        m_async, p_async = asyncio.run(sequential())
        row("async tiny job p50", us(m_async[0]), us(p_async[0]))
        row("async tiny job p99", us(m_async[1]), us(p_async[1]))
        row("async p50 / raw round trip", f"{m_async[0] / raw50:.2f}x", f"{p_async[0] / raw50:.2f}x")

        async def concurrent_load() -> tuple:
            loop = asyncio.get_running_loop()
            m = await load_test(lambda i: pool.score_async("m", tiny, i), duration)
            p = await load_test(lambda i: loop.run_in_executor(ppe, ppe_tiny, i), duration)
            return m, p

        m_load, p_load = asyncio.run(concurrent_load())
        row(f"throughput, {CONCURRENCY} async callers", f"{m_load[0]:,.0f}/s", f"{p_load[0]:,.0f}/s")
        row("  ratio mlpool / ProcessPool", f"{m_load[0] / p_load[0]:.2f}x", "1.00x")
        m_lat, p_lat = percentiles(m_load[1]), percentiles(p_load[1])
        row("  job latency p50 under load", ms(m_lat[0]), ms(p_lat[0]))
        row("  job latency p99 under load", ms(m_lat[1]), ms(p_lat[1]))
        m_lag, p_lag = percentiles(m_load[2]), percentiles(p_load[2])
        row("  event-loop lag p50", ms(m_lag[0]), ms(p_lag[0]))
        row("  event-loop lag p99", ms(m_lag[1]), ms(p_lag[1]))

        def mlpool_hungry(loops: int, jobs: int) -> None:
            for f in [pool.submit("m", hungry, loops) for _ in range(jobs)]:
                f.result()

        def ppe_hungry_many(loops: int, jobs: int) -> None:
            for f in [ppe.submit(ppe_hungry, loops) for _ in range(jobs)]:
                f.result()

        ideal = NB_WORKERS / single
        m_h = hungry_throughput(mlpool_hungry, loops, hungry_jobs)
        p_h = hungry_throughput(ppe_hungry_many, loops, hungry_jobs)
        row(f"hungry job ({single * 1e3:.0f} ms) jobs/s", f"{m_h:.1f}/s", f"{p_h:.1f}/s")
        row("  fraction of ideal (workers / call time)", f"{m_h / ideal:.0%}", f"{p_h / ideal:.0%}")


if __name__ == "__main__":
    main()
