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

from overhead import CONCURRENCY as CALLERS
from overhead import _ppe_init, load_model, load_test, percentiles, ppe_tiny, tiny

from mlpool import MLPool


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
            await load_test(lambda i: pool.score_async("m", tiny, i), 0.5)  # warm-up
            ours = await load_test(lambda i: pool.score_async("m", tiny, i), seconds)
            theirs = await load_test(lambda i: loop.run_in_executor(ppe, ppe_tiny, i), seconds)
            return ours, theirs

        (ours, _, lags), (theirs, _, _) = asyncio.run(both())
        lag = percentiles(lags)[1]
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
