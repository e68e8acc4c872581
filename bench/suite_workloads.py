"""The workloads of ``bench/suite.py``, the same for every system.

Each scoring function takes ``(model, arg)``. The systems without a model
concept (ProcessPoolExecutor, loky, mpire, Ray actors) load every model once
per worker into :data:`MODELS` with :func:`init_worker` and call
:func:`call`, which looks the model up by workload.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import mlpool

WORKLOADS = (
    "tiny", "hungry", "forest", "array_8mb", "array_64mb", "array_8mb_out", "array_64mb_out", "forest_batched",
)  # fmt: skip
MODEL_OF = {
    "tiny": "none", "hungry": "none", "forest": "forest", "array_8mb": "none", "array_64mb": "none",
    "array_8mb_out": "none", "array_64mb_out": "none", "forest_batched": "forest",
}  # fmt: skip
# Large arrays both ways: "array_*" sends one to the worker, which sums it;
# "array_*_out" sends its size and gets an array of that size back.
ARRAY_BYTES = {"array_8mb": 8 * 2**20, "array_64mb": 64 * 2**20}
_MADE: dict[int, Any] = {}  # per worker: the arrays returned, made once (the figure is the transfer)
FOREST_FEATURES = 20

MODELS: dict[str, Any] = {}  # per worker process, for the systems that call ``call``


def load_none() -> dict:
    return {"pid": os.getpid()}


def load_forest(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def loaders(forest_path: str) -> dict:
    """``{model name: loader}`` as MLPool takes it."""
    from functools import partial

    return {"none": load_none, "forest": partial(load_forest, forest_path)}


def init_worker(forest_path: str) -> None:
    """Initializer of ProcessPoolExecutor, loky, mpire workers and Ray actors."""
    for name, loader in loaders(forest_path).items():
        MODELS[name] = loader()


def tiny(model: Any, x: int) -> int:
    return x + 1


def hungry(model: Any, rounds: int) -> int:
    """Pure-Python CPU work holding the GIL (the suite calibrates ``rounds`` to ~20 ms)."""
    total = 0
    for i in range(rounds):
        total = (total + i * i) % 1_000_003
    return total


def forest(model: Any, row: list[float]) -> int:
    return int(model.predict([row])[0])


def array_sum(model: Any, array: Any) -> float:
    return float(array.sum())


def array_made(model: Any, nbytes: int) -> Any:
    if nbytes not in _MADE:
        import numpy as np

        _MADE[nbytes] = np.ones(nbytes // 8)
    return _MADE[nbytes]


@mlpool.batched(max_batch_size=32, max_wait_ms=2.0)
def forest_batched(model: Any, rows: list[list[float]]) -> list[int]:
    return [int(c) for c in model.predict(rows)]


FUNCTIONS = {
    "tiny": tiny, "hungry": hungry, "forest": forest, "array_8mb": array_sum, "array_64mb": array_sum,
    "array_8mb_out": array_made, "array_64mb_out": array_made,
}  # fmt: skip


def call(workload: str, arg: Any) -> Any:
    """Run ``workload`` on this worker's model (see :func:`init_worker`)."""
    return FUNCTIONS[workload](MODELS[MODEL_OF[workload]], arg)


def call_with_state(worker_state: dict, workload: str, arg: Any) -> Any:
    """mpire's form of :func:`call`: the models live in its worker state."""
    return FUNCTIONS[workload](worker_state[MODEL_OF[workload]], arg)


def init_worker_state(forest_path: str) -> Any:
    def init(worker_state: dict) -> None:
        for name, loader in loaders(forest_path).items():
            worker_state[name] = loader()

    return init
