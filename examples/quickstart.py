"""mlpool in one minute: the demo's two XGBoost models scored through a pool.

    python examples/quickstart.py

1. trains the iris and diabetes classifiers on first run (saved as JSON);
2. starts a pool whose workers each load both models once;
3. scores through every API family: job ids, futures, sync and async calls;
4. runs the same concurrent load twice, scoring in the event loop's own
   process and then on the pool, and prints a table: throughput, latency,
   and how late a 1 ms timer fires in the event loop (loop lag).
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from app import models as demo_models
from app.models import IRIS_EXAMPLE, load_diabetes, load_iris, score_diabetes, score_iris

from mlpool import MLPool

CLIENTS = 32
SECONDS = 4.0


async def drive(score_one, seconds: float) -> dict:
    """CLIENTS concurrent coroutines scoring for ``seconds``; a ticker measures loop lag."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    lags: list[float] = []

    async def client(i: int) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await score_one(i)
            latencies.append(time.perf_counter() - start)

    async def ticker() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    began = time.perf_counter()
    await asyncio.gather(ticker(), *(client(i) for i in range(CLIENTS)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    lags.sort()
    return {
        "requests/s": len(latencies) / elapsed,
        "p50 ms": 1e3 * latencies[len(latencies) // 2],
        "p99 ms": 1e3 * latencies[int(len(latencies) * 0.99)],
        "loop lag p99 ms": 1e3 * lags[int(len(lags) * 0.99)] if lags else float("nan"),
    }


def main() -> None:
    started = time.perf_counter()
    demo_models.train_if_missing()
    diabetes_features = demo_models.diabetes_example()
    iris_model, diabetes_model = load_iris(), load_diabetes()

    t = time.perf_counter()
    with MLPool(
        models_to_load={"iris": partial(load_iris), "diabetes": partial(load_diabetes)},
        nb_workers=2,
    ) as pool:
        print(f"pool ready: {pool.nb_workers} workers loaded both models in {time.perf_counter() - t:.2f}s")

        # 1. job ids: the original mlpool's API, unchanged
        job_id = pool.create_job(score_iris, "iris", args=(IRIS_EXAMPLE,))
        print(f"create_job / get_result   iris {IRIS_EXAMPLE} -> class {pool.get_result(job_id)}")

        # 2. futures and one-call scoring
        futures = [pool.submit("diabetes", score_diabetes, diabetes_features) for _ in range(4)]
        print(f"submit x4 (futures)       diabetes -> {[f.result() for f in futures]}")
        print(f"score                     iris -> class {pool.score('iris', score_iris, IRIS_EXAMPLE)}")

        async def from_coroutines() -> None:
            job_id = await pool.create_job_async(score_iris, "iris", kwargs={"features": IRIS_EXAMPLE})
            print(f"create_job_async          iris -> class {await pool.get_result_async(job_id)}")
            result = await pool.score_async("diabetes", score_diabetes, diabetes_features)
            print(f"score_async               diabetes -> class {result}")

        asyncio.run(from_coroutines())

        # 3. the same load, in-process and on the pool
        async def in_process(i: int) -> int:
            await asyncio.sleep(0)  # as a server would between requests: let others in
            return score_iris(iris_model, IRIS_EXAMPLE) if i % 2 else score_diabetes(diabetes_model, diabetes_features)

        async def on_pool(i: int) -> int:
            if i % 2:
                return await pool.score_async("iris", score_iris, IRIS_EXAMPLE)
            return await pool.score_async("diabetes", score_diabetes, diabetes_features)

        print(f"\n{CLIENTS} concurrent async clients for {SECONDS:.0f}s each, alternating iris and diabetes:")
        rows = {
            "in the API process": asyncio.run(drive(in_process, SECONDS)),
            f"mlpool, {pool.nb_workers} workers": asyncio.run(drive(on_pool, SECONDS)),
        }
    columns = list(next(iter(rows.values())))
    print(f"| {'scoring':<20} | " + " | ".join(f"{c:>15}" for c in columns) + " |")
    print(f"|{'-' * 22}|" + "|".join("-" * 17 for _ in columns) + "|")
    for name, figures in rows.items():
        print(f"| {name:<20} | " + " | ".join(f"{figures[c]:>15.1f}" for c in columns) + " |")
    base, pooled = rows.values()
    print(
        f"\nmlpool: {pooled['requests/s'] / base['requests/s']:.2f}x the throughput; the event loop's 1 ms timer "
        f"fired {base['loop lag p99 ms']:.1f} ms late (p99) in-process "
        f"and {pooled['loop lag p99 ms']:.2f} ms on the pool."
    )
    print(f"done in {time.perf_counter() - started:.1f}s; the pool is shut down and no worker is left running.")


if __name__ == "__main__":
    main()
