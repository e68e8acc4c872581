"""One side of ``bench/arrays_ab.py``: large-array round trips, timed in this process.

    PYTHONPATH=<a revision's src> python bench/_arrays_driver.py REPEATS

Prints one JSON line: the median seconds of each case over REPEATS round
trips through one worker (after a warm-up), and of the in-process floor.
Uses only the public API, so it runs against any commit since 0.2.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from payload import load_model, made, p50, total

from mlpool import MLPool

SIZES = {"8 MB": 8 * 2**20, "64 MB": 64 * 2**20}


def main() -> None:
    repeats = int(sys.argv[1])
    figures = {}
    with MLPool({"m": load_model}, nb_workers=1) as pool:
        for label, nbytes in SIZES.items():
            array = np.ones(nbytes // 8)  # float64
            figures[f"in {label}"] = p50(lambda a=array: pool.score("m", total, a), repeats)
            figures[f"out {label}"] = p50(lambda n=nbytes: float(pool.score("m", made, n)[-1]), repeats)
            figures[f"in-process copy + sum {label}"] = p50(lambda a=array: total({}, a.copy()), repeats)
            figures[f"in-process copy {label}"] = p50(lambda a=array: float(a.copy()[-1]), repeats)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
