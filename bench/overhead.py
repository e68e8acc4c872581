"""Per-job overhead of mlpool next to the raw pipe and ProcessPoolExecutor, in one run.

    python bench/overhead.py [--quick] [--job-ids-only] [--tracing-only]

Prints, side by side:
- the raw round trip of a small message between two Python processes (the floor);
- sequential tiny-job latency p50/p99: mlpool ``score`` and ``score_async``,
  ProcessPoolExecutor ``submit().result()`` and ``run_in_executor``;
- throughput with 64 concurrent async callers, and how late a 1 ms
  ``asyncio.sleep`` wakes meanwhile (event-loop lag); for mlpool also through
  the job-id API (``create_job_async`` + ``get_result_async``);
- throughput of a hungry job (about 20 ms of pure-Python CPU) against the
  ideal nb_workers / single-call time;
- the cost of OpenTelemetry per job (#18): sync tiny-job p50 without the
  ``otel`` extra (its import made to fail, as when it is not installed), with
  the API and no span current (tracing off), and inside a span with the SDK
  and an in-memory exporter (tracing on: one span and four children per job).

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
    buf = bytearray(65536)  # reused: a fresh 64 KiB bytes per read costs a page-faulting malloc
    with memoryview(buf) as view:
        while n := os.readv(fd, [view]):
            os.write(fd, view[:n])


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
    buf = bytearray(65536)

    def once() -> None:
        os.write(fd, message)
        os.readv(fd, [buf])

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
    """Jobs per second for ``jobs`` hungry jobs submitted at once (ideal: workers / job time)."""
    start = time.perf_counter()
    submit_many(loops, jobs)
    return jobs / (time.perf_counter() - start)


def _echo_objects(conn) -> None:
    while True:
        try:
            conn.send(conn.recv())
        except EOFError:
            return


def raw_object_round_trip(n: int) -> list[float]:
    """multiprocessing.Connection send/recv of a small pickled tuple."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_echo_objects, args=(theirs,))
    proc.start()
    theirs.close()
    message = (1, "tiny", (1,), {})

    def once() -> None:
        ours.send(message)
        ours.recv()

    try:
        return time_calls(once, n)
    finally:
        ours.close()
        proc.join(5)


def timed_hungry(model: dict, loops: int) -> float:
    start = time.perf_counter()
    hungry(model, loops)
    return time.perf_counter() - start


async def by_job_id(pool: MLPool, i: int) -> int:
    """One tiny job through the job-id API, as a coroutine handler would."""
    job_id = await pool.create_job_async(tiny, "m", args=(i,))
    return await pool.get_result_async(job_id)


def compare_job_ids(pool: MLPool, rounds: int, duration: float, job_id_load) -> None:
    """The job-id API against score_async, interleaved, same pool and callers."""

    async def score_load() -> tuple:
        return await load_test(lambda i: pool.score_async("m", tiny, i), duration)

    rates: dict[str, list[float]] = {"score_async": [], "job ids": []}
    lags: dict[str, list[float]] = {"score_async": [], "job ids": []}
    for r in range(rounds):
        for name, run in (("score_async", score_load), ("job ids", job_id_load)):
            rate, _, lag = asyncio.run(run())
            rates[name].append(rate)
            lags[name].append(percentiles(lag)[1])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}/s" for n in rates), flush=True)
    med = statistics.median
    for name in rates:
        print(f"{name:<12} {med(rates[name]):>10,.0f} jobs/s   loop lag p99 {med(lags[name]) * 1e3:.2f} ms")
    ratio = med(j / s for j, s in zip(rates["job ids"], rates["score_async"], strict=True))
    print(f"job ids / score_async (median of rounds): {ratio:.2f}")


def tracing_costs(pool: MLPool, rounds: int, n: int) -> None:
    """Sync tiny-job p50 without the otel extra, with tracing off, with tracing on;
    interleaved in each round, medians of rounds; the differences are the cost."""
    from mlpool._engine import tracing as _tracing

    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        print("\ntracing: n/a (the dev extra installs opentelemetry-api and opentelemetry-sdk)")
        return
    api = _tracing.otel_trace
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    samples: dict[str, list[float]] = {"no extra": [], "tracing off": [], "tracing on": []}
    job = lambda: pool.score("m", tiny, 1)  # noqa: E731
    for r in range(rounds):
        _tracing.otel_trace = None  # what mlpool sees when opentelemetry is not installed
        try:
            samples["no extra"].append(percentiles(time_calls(job, n))[0])
        finally:
            _tracing.otel_trace = api
        samples["tracing off"].append(percentiles(time_calls(job, n))[0])
        trace.set_tracer_provider(provider)  # once per process; later calls only warn
        with tracer.start_as_current_span("request"):
            samples["tracing on"].append(percentiles(time_calls(job, n))[0])
        exporter.clear()
        print(f"tracing round {r + 1}/{rounds}", flush=True)
    base = statistics.median(samples["no extra"])
    print(f"\n| {'sync tiny job p50, ' + str(rounds) + ' rounds':<42} | {'p50':>10} | {'cost per job':>12} |")
    print(f"|{'-' * 44}|{'-' * 11}:|{'-' * 13}:|")
    for name, values in samples.items():
        p50 = statistics.median(values)
        print(f"| {name:<42} | {p50 * 1e6:>7,.1f} µs | {(p50 - base) * 1e6:>+9,.1f} µs |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument(
        "--job-ids-only", action="store_true",
        help="only the 64-caller load through score_async and through create_job_async + get_result_async",
    )  # fmt: skip
    parser.add_argument("--tracing-only", action="store_true", help="only the cost of OpenTelemetry per job")
    opts = parser.parse_args()
    rounds = opts.rounds or (2 if opts.quick else 5)
    n = 1000 if opts.quick else 2000
    duration = 1.5 if opts.quick else 3.0
    hungry_jobs = 20 if opts.quick else 40

    us = lambda s: f"{s * 1e6:,.0f} µs"  # noqa: E731
    ms = lambda s: f"{s * 1e3:,.2f} ms"  # noqa: E731
    med = statistics.median

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {NB_WORKERS} workers, "
        f"{CONCURRENCY} async callers, {rounds} interleaved rounds (medians of per-round figures)",
        flush=True,
    )
    loops = hungry_loops(0.020)
    samples: dict[str, list] = {}

    def keep(name: str, value) -> None:
        samples.setdefault(name, []).append(value)

    with MLPool({"m": load_model}, nb_workers=NB_WORKERS) as pool, concurrent.futures.ProcessPoolExecutor(
        NB_WORKERS, mp_context=multiprocessing.get_context("spawn"), initializer=_ppe_init
    ) as ppe:

        async def sequential() -> tuple:
            loop = asyncio.get_running_loop()
            m = percentiles(await time_calls_async(lambda: pool.score_async("m", tiny, 1), n))
            p = percentiles(await time_calls_async(lambda: loop.run_in_executor(ppe, ppe_tiny, 1), n))
            return m, p

        async def concurrent_load() -> tuple:
            loop = asyncio.get_running_loop()
            m = await load_test(lambda i: pool.score_async("m", tiny, i), duration)
            p = await load_test(lambda i: loop.run_in_executor(ppe, ppe_tiny, i), duration)
            return m, p

        async def job_id_load() -> tuple:
            return await load_test(lambda i: by_job_id(pool, i), duration)

        if opts.job_ids_only:
            compare_job_ids(pool, rounds, duration, job_id_load)
            return
        if opts.tracing_only:
            tracing_costs(pool, rounds, n)
            return

        def mlpool_hungry(loops: int, jobs: int) -> None:
            for f in [pool.submit("m", hungry, loops) for _ in range(jobs)]:
                f.result()

        def ppe_hungry_many(loops: int, jobs: int) -> None:
            for f in [ppe.submit(ppe_hungry, loops) for _ in range(jobs)]:
                f.result()

        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            keep("raw", percentiles(raw_round_trip(n)))
            keep("raw_obj", percentiles(raw_object_round_trip(n)))
            keep("m_sync", percentiles(time_calls(lambda: pool.score("m", tiny, 1), n)))
            keep("p_sync", percentiles(time_calls(lambda: ppe.submit(ppe_tiny, 1).result(), n)))
            m_async, p_async = asyncio.run(sequential())
            keep("m_async", m_async)
            keep("p_async", p_async)
            m_load, p_load = asyncio.run(concurrent_load())
            j_load = asyncio.run(job_id_load())
            for key, (rate, lat, lags) in (("m_load", m_load), ("p_load", p_load), ("j_load", j_load)):
                keep(key + "_rate", rate)
                keep(key + "_lat", percentiles(lat))
                keep(key + "_lag", percentiles(lags))
            # The ideal is measured in the same round: one job's time in an idle worker.
            single = med(pool.score("m", timed_hungry, loops) for _ in range(5))
            keep("single", single)
            keep("m_hungry", hungry_throughput(mlpool_hungry, loops, hungry_jobs) * single / NB_WORKERS)
            keep("p_hungry", hungry_throughput(ppe_hungry_many, loops, hungry_jobs) * single / NB_WORKERS)
        tracing_costs(pool, rounds, n)

    def p50(name: str) -> float:
        return med(x[0] for x in samples[name])

    def p99(name: str) -> float:
        return med(x[1] for x in samples[name])

    raw = p50("raw")
    raw_obj = p50("raw_obj")
    print(f"\nraw pipe round trip, bytes (os.write/os.read):         p50 {us(raw)}, p99 {us(p99('raw'))}")
    print(f"raw pipe round trip, objects (Connection.send/recv): p50 {us(raw_obj)}, p99 {us(p99('raw_obj'))}")
    rows = [
        ("sync tiny job p50", us(p50("m_sync")), us(p50("p_sync"))),
        ("sync tiny job p99", us(p99("m_sync")), us(p99("p_sync"))),
        ("  sync p50 / raw bytes round trip", f"{p50('m_sync') / raw:.2f}x", f"{p50('p_sync') / raw:.2f}x"),
        ("  sync p50 / raw objects round trip", f"{p50('m_sync') / raw_obj:.2f}x", f"{p50('p_sync') / raw_obj:.2f}x"),
        ("async tiny job p50", us(p50("m_async")), us(p50("p_async"))),
        ("async tiny job p99", us(p99("m_async")), us(p99("p_async"))),
        ("  async p50 / raw bytes round trip", f"{p50('m_async') / raw:.2f}x", f"{p50('p_async') / raw:.2f}x"),
        (
            "  async p50 / raw objects round trip",
            f"{p50('m_async') / raw_obj:.2f}x",
            f"{p50('p_async') / raw_obj:.2f}x",
        ),
        (
            f"throughput, {CONCURRENCY} async callers",
            f"{med(samples['m_load_rate']):,.0f}/s",
            f"{med(samples['p_load_rate']):,.0f}/s",
        ),
        (
            "  ratio to ProcessPool (median of rounds)",
            f"{med(m / p for m, p in zip(samples['m_load_rate'], samples['p_load_rate'], strict=True)):.2f}x",
            "1.00x",
        ),
        ("  job latency p50 under load", ms(p50("m_load_lat")), ms(p50("p_load_lat"))),
        ("  job latency p99 under load", ms(p99("m_load_lat")), ms(p99("p_load_lat"))),
        ("  event-loop lag p50 (1 ms timer)", ms(p50("m_load_lag")), ms(p50("p_load_lag"))),
        ("  event-loop lag p99 (1 ms timer)", ms(p99("m_load_lag")), ms(p99("p_load_lag"))),
        (f"job ids from coroutines, {CONCURRENCY} callers", f"{med(samples['j_load_rate']):,.0f}/s", "-"),
        ("  event-loop lag p99 (1 ms timer)", ms(p99("j_load_lag")), "-"),
        (
            f"hungry job ({med(samples['single']) * 1e3:.0f} ms): share of ideal",
            f"{med(samples['m_hungry']):.0%}",
            f"{med(samples['p_hungry']):.0%}",
        ),
    ]
    print(f"\n| {'':<42} | {'mlpool':>14} | {'ProcessPool':>14} |")
    print(f"|{'-' * 44}|{'-' * 16}:|{'-' * 16}:|".replace("-:|", ":|"))
    for name, a, b in rows:
        print(f"| {name:<42} | {a:>14} | {b:>14} |")


if __name__ == "__main__":
    main()
