"""Dynamic batching against unbatched scoring, on a real scikit-learn model.

    python bench/batching.py [--quick]

A RandomForestClassifier (n_jobs=1) scores single rows. Side by side in one
run: 64 concurrent async callers through batched mlpool, unbatched mlpool and
ProcessPoolExecutor (2 workers each): throughput and latency p50/p99; then
one caller at a time, batched against unbatched.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import pickle
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

import mlpool
from mlpool import MLPool

NB_WORKERS = 2
CONCURRENCY = 64
_MODEL = None


def train(path: Path) -> None:
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    x, y = make_classification(n_samples=2000, n_features=20, n_informative=10, random_state=0)
    model = RandomForestClassifier(n_estimators=100, max_depth=8, n_jobs=1, random_state=0).fit(x, y)
    path.write_bytes(pickle.dumps(model))


def load_forest(path: str):
    return pickle.loads(Path(path).read_bytes())


def predict_one(model, row: list[float]) -> int:
    return int(model.predict(np.asarray([row]))[0])


@mlpool.batched(max_batch_size=32, max_wait_ms=5.0)
def predict_many(model, rows: list[list[float]]) -> list[int]:
    return [int(v) for v in model.predict(np.asarray(rows))]


def _ppe_init(path: str) -> None:
    global _MODEL
    _MODEL = load_forest(path)


def ppe_predict(row: list[float]) -> int:
    return predict_one(_MODEL, row)


def pct(samples: list[float], q: float) -> float:
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(len(samples) * q))]


async def drive(call, rows: list[list[float]], concurrency: int, seconds: float) -> tuple[float, list[float]]:
    stop = time.perf_counter() + seconds
    latencies: list[float] = []

    async def caller(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await call(rows[k % len(rows)])
            latencies.append(time.perf_counter() - start)
            k += concurrency

    began = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    seconds = 2.0 if opts.quick else 5.0
    rounds = 1 if opts.quick else 3

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "forest.pkl"
        train(path)
        model = load_forest(str(path))
        rng = np.random.default_rng(0)
        rows = rng.normal(size=(256, 20)).round(3).tolist()
        start = time.perf_counter()
        for row in rows[:50]:
            predict_one(model, row)
        one_row = (time.perf_counter() - start) / 50
        start = time.perf_counter()
        model.predict(np.asarray(rows[:32]))
        thirty_two = time.perf_counter() - start
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {NB_WORKERS} workers; RandomForest(100 trees): "
            f"1 row {one_row * 1e3:.1f} ms, 32 rows {thirty_two * 1e3:.1f} ms in-process",
            flush=True,
        )
        results: dict[str, list] = {}
        with MLPool({"forest": partial(load_forest, str(path))}, nb_workers=NB_WORKERS) as pool, (
            concurrent.futures.ProcessPoolExecutor(
                NB_WORKERS,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ppe_init,
                initargs=(str(path),),
            )
        ) as ppe:

            async def run_round() -> dict:
                loop = asyncio.get_running_loop()
                systems = {
                    "mlpool, batched": lambda row: pool.score_async("forest", predict_many, row),
                    "mlpool, unbatched": lambda row: pool.score_async("forest", predict_one, row),
                    "ProcessPoolExecutor": lambda row: loop.run_in_executor(ppe, ppe_predict, row),
                }
                out = {}
                for name, call in systems.items():
                    await drive(call, rows, CONCURRENCY, 0.3)  # warm up
                    out[name] = await drive(call, rows, CONCURRENCY, seconds)
                for name in ("mlpool, batched", "mlpool, unbatched"):
                    out[name + " @1"] = await drive(systems[name], rows, 1, seconds / 2)
                return out

            for r in range(rounds):
                print(f"round {r + 1}/{rounds}", flush=True)
                for name, value in asyncio.run(run_round()).items():
                    results.setdefault(name, []).append(value)

    def rate(name: str) -> float:
        return statistics.median(r for r, _ in results[name])

    def lat(name: str, q: float) -> float:
        return statistics.median(pct(lats, q) for _, lats in results[name])

    print(f"\n| {CONCURRENCY} async callers | jobs/s | p50 | p99 |")
    print("|---|---:|---:|---:|")
    for name in ("mlpool, batched", "mlpool, unbatched", "ProcessPoolExecutor"):
        print(f"| {name} | {rate(name):,.0f} | {lat(name, 0.5) * 1e3:.1f} ms | {lat(name, 0.99) * 1e3:.1f} ms |")
    print(
        f"\nbatched / unbatched throughput: {rate('mlpool, batched') / rate('mlpool, unbatched'):.1f}x; "
        f"batched / ProcessPoolExecutor: {rate('mlpool, batched') / rate('ProcessPoolExecutor'):.1f}x"
    )
    b1, u1 = lat("mlpool, batched @1", 0.5), lat("mlpool, unbatched @1", 0.5)
    print(
        f"one caller at a time, p50: batched {b1 * 1e3:.2f} ms, unbatched {u1 * 1e3:.2f} ms "
        f"({(b1 / u1 - 1) * 100:+.1f}%)"
    )


if __name__ == "__main__":
    main()
