"""Large inputs and outputs: mlpool's shared memory against the pipe.

    python bench/payload.py [--quick]

For NumPy arrays of 1, 8, 64 and 200 MB, side by side in one run, p50 of:
- "in": the array goes to a worker, which sums it and returns a scalar;
- "out": a small request, the worker returns an array of that size
  (made once per worker and kept: the figure is the transfer, not the fill);
for mlpool (shared memory), ProcessPoolExecutor (pickled through a pipe), and
in-process: one copy of the array plus the same work (the floor a transfer
cannot beat by much).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

from mlpool import MLPool

SIZES_MB = (1, 8, 64, 200)
_CACHE: dict[int, np.ndarray] = {}


def load_model() -> dict:
    return {}


def total(model: dict, array: np.ndarray) -> float:
    return float(array.sum())


def made(model: dict, nbytes: int) -> np.ndarray:
    if nbytes not in _CACHE:
        _CACHE[nbytes] = np.ones(nbytes // 8)
    return _CACHE[nbytes]


def ppe_total(array: np.ndarray) -> float:
    return total({}, array)


def ppe_made(nbytes: int) -> np.ndarray:
    return made({}, nbytes)


def p50(call, repeats: int) -> float:
    call()  # warm up (first touch of pages, caches)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    sizes = SIZES_MB[:2] if opts.quick else SIZES_MB
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, numpy {np.__version__}", flush=True)
    rows = []
    with MLPool({"m": load_model}, nb_workers=1) as pool, concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    ) as ppe:
        for mb in sizes:
            nbytes = mb * 2**20
            array = np.ones(nbytes // 8)  # float64
            repeats = max(3, min(30, 400 // mb))
            ppe_repeats = max(3, repeats // 3)
            row = {
                "size": f"{mb} MB",
                "in: mlpool": p50(lambda array=array: pool.score("m", total, array), repeats),
                "in: ProcessPool": p50(lambda array=array: ppe.submit(ppe_total, array).result(), ppe_repeats),
                "in: in-process copy + sum": p50(lambda array=array: total({}, array.copy()), repeats),
                "out: mlpool": p50(lambda nbytes=nbytes: pool.score("m", made, nbytes), repeats),
                "out: ProcessPool": p50(lambda nbytes=nbytes: ppe.submit(ppe_made, nbytes).result(), ppe_repeats),
                "out: in-process copy": p50(lambda nbytes=nbytes: made({}, nbytes).copy(), repeats),
            }
            rows.append(row)
            print(f"  {mb} MB done", flush=True)
    columns = list(rows[0])[1:]
    print("\n| size | " + " | ".join(columns) + " | in: ProcessPool / mlpool | in: mlpool / in-process "
          "| out: ProcessPool / mlpool | out: mlpool / in-process |")  # fmt: skip
    print("|---|" + "---:|" * (len(columns) + 4))
    for row in rows:
        cells = " | ".join(f"{row[c] * 1e3:.2f} ms" for c in columns)
        ratios = (
            row["in: ProcessPool"] / row["in: mlpool"],
            row["in: mlpool"] / row["in: in-process copy + sum"],
            row["out: ProcessPool"] / row["out: mlpool"],
            row["out: mlpool"] / row["out: in-process copy"],
        )
        print(f"| {row['size']} | {cells} | " + " | ".join(f"{r:.1f}x" for r in ratios) + " |")


if __name__ == "__main__":
    main()
