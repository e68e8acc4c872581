"""Runs N tiny jobs one way (see bench/instructions.py), or one timed round;
public API only, so that any revision of mlpool can run it.

    python bench/_instructions_driver.py sync|async|ids N
    python bench/_instructions_driver.py timed SECONDS   (prints one JSON line)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import sys
import time

from mlpool import MLPool

CALLERS = 64
_MODEL = None


def load_model() -> dict:
    return {"bias": 1}


def tiny(model: dict, x: int) -> int:
    return x + model["bias"]


async def by_score_async(pool: MLPool, jobs: int) -> None:
    async def caller(i: int) -> None:
        for _ in range(jobs // CALLERS):
            await pool.score_async("m", tiny, i)

    await asyncio.gather(*(caller(i) for i in range(CALLERS)))


async def by_job_ids(pool: MLPool, jobs: int) -> None:
    async def caller(i: int) -> None:
        for _ in range(jobs // CALLERS):
            job_id = await pool.create_job_async(tiny, "m", args=(i,))
            await pool.get_result_async(job_id)

    await asyncio.gather(*(caller(i) for i in range(CALLERS)))


def _ppe_init() -> None:
    global _MODEL
    _MODEL = load_model()


def ppe_tiny(x: int) -> int:
    return tiny(_MODEL, x)  # type: ignore[arg-type]


async def rate(call, seconds: float) -> tuple[float, float]:
    """Jobs/s of CALLERS coroutines calling ``call(i)`` for ``seconds``, and the
    p99 of how late a 1 ms sleep of the same loop wakes meanwhile (seconds)."""
    stop = time.perf_counter() + seconds
    done = 0
    lags: list[float] = []

    async def caller(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call(i)
            done += 1

    async def ticker() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    began = time.perf_counter()
    await asyncio.gather(ticker(), *(caller(i) for i in range(CALLERS)))
    lags.sort()
    return done / (time.perf_counter() - began), lags[int(len(lags) * 0.99)]


def timed(seconds: float) -> dict:
    """One round: sync score p50, then score_async and ProcessPoolExecutor throughput."""
    context = multiprocessing.get_context("spawn")
    with MLPool({"m": load_model}, nb_workers=2) as pool, concurrent.futures.ProcessPoolExecutor(
        2, mp_context=context, initializer=_ppe_init
    ) as ppe:
        for _ in range(300):
            pool.score("m", tiny, 1)
        samples = []
        for _ in range(3000):
            start = time.perf_counter()
            pool.score("m", tiny, 1)
            samples.append(time.perf_counter() - start)
        samples.sort()

        async def both() -> tuple:
            loop = asyncio.get_running_loop()
            await rate(lambda i: pool.score_async("m", tiny, i), 0.5)  # warm-up
            ours = await rate(lambda i: pool.score_async("m", tiny, i), seconds)
            theirs = await rate(lambda i: loop.run_in_executor(ppe, ppe_tiny, i), seconds)
            return ours, theirs

        (ours, lag), (theirs, _) = asyncio.run(both())
    return {"sync_p50_us": samples[len(samples) // 2] * 1e6, "async_jobs_s": ours, "ppe_jobs_s": theirs,
            "ratio_to_ppe": ours / theirs, "loop_lag_p99_ms": lag * 1e3}  # fmt: skip


def main() -> None:
    mode = sys.argv[1]
    if mode == "timed":
        print(json.dumps(timed(float(sys.argv[2]))))
        return
    jobs = int(sys.argv[2])
    with MLPool({"m": load_model}, nb_workers=2) as pool:
        if mode == "sync":
            for _ in range(jobs):
                pool.score("m", tiny, 1)
        elif mode == "async":
            asyncio.run(by_score_async(pool, jobs))
        elif mode == "ids":
            asyncio.run(by_job_ids(pool, jobs))
        else:
            raise SystemExit(f"unknown mode {mode!r}: sync, async or ids")


if __name__ == "__main__":
    main()
