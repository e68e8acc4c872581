"""One side of ``bench/arrays_ab.py``: large-array round trips, timed in this process.

    PYTHONPATH=<a revision's src> python bench/_arrays_driver.py REPEATS

Prints one JSON line: the median seconds of each case over REPEATS round
trips through one worker (after a warm-up), and of the in-process floor.
Uses only the public API, so it runs against any commit since 0.2.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from mlpool import MLPool

SIZES = {"8 MB": 8 * 2**20, "64 MB": 64 * 2**20}
_MADE: dict[int, np.ndarray] = {}


def load_model() -> dict:
    return {}


def total(model: dict, array: np.ndarray) -> float:
    return float(array.sum())


def made(model: dict, nbytes: int) -> np.ndarray:
    """An array of ``nbytes`` made once per worker: the figure is the transfer, not the fill."""
    if nbytes not in _MADE:
        _MADE[nbytes] = np.ones(nbytes // 8)
    return _MADE[nbytes]


def median_seconds(call, repeats: int) -> float:
    call()
    call()  # warm: regions made, mappings kept, pages touched
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    repeats = int(sys.argv[1])
    figures = {}
    with MLPool({"m": load_model}, nb_workers=1) as pool:
        for label, nbytes in SIZES.items():
            array = np.ones(nbytes // 8)  # float64
            figures[f"in {label}"] = median_seconds(lambda a=array: pool.score("m", total, a), repeats)
            figures[f"out {label}"] = median_seconds(
                lambda n=nbytes: float(pool.score("m", made, n)[-1]), repeats
            )
            figures[f"in-process copy + sum {label}"] = median_seconds(lambda a=array: total({}, a.copy()), repeats)
            figures[f"in-process copy {label}"] = median_seconds(lambda a=array: float(a.copy()[-1]), repeats)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
