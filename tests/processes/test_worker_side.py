"""The worker side, through real pools: what a scoring function raises or
returns never takes a worker (or the caller) down, large batches of shared
memory cross, signals to the process group leave workers alone, and a worker
loads no parent-side module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import worker_children
from helpers import worker_probe
from helpers.pools import make_pool

import mlpool
from mlpool import MLPoolError, RemoteError, SerializationError

pytestmark = pytest.mark.usefixtures("worker_mode", "no_leaked_workers")

SRC = str(Path(mlpool.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool({"m": worker_probe.load_empty}, nb_workers=1) as p:
        yield p


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "custom"])
def test_a_base_exception_in_a_scoring_function_is_an_mlpool_error_and_the_worker_serves_on(pool, kind):
    before = pool.score("m", worker_probe.pid)
    crashed = pool.stats().jobs_crashed
    with pytest.raises(MLPoolError) as info:
        pool.score("m", worker_probe.raise_base_exception, kind)
    assert {"custom": "CustomBaseException"}.get(kind, kind) in str(info.value)
    assert pool.score("m", worker_probe.pid) == before
    assert pool.stats().jobs_crashed == crashed


def test_a_base_exception_never_reaches_the_callers_event_loop(pool):
    import asyncio

    async def main() -> str:
        try:
            await pool.score_async("m", worker_probe.raise_base_exception, "SystemExit")
        except Exception as exc:  # an ordinary error: `except Exception` handles it
            return type(exc).__name__
        return "no error"

    assert asyncio.run(main()) == "RemoteError"


@pytest.mark.parametrize("kind", ["lone surrogate", "unpicklable, __str__ raises", "traceback formatting raises"])
def test_awkward_exceptions_reach_the_caller_and_the_worker_is_not_restarted(pool, kind):
    before = pool.score("m", worker_probe.pid)
    restarts = pool.stats().worker_restarts
    with pytest.raises(Exception) as info:
        pool.score("m", worker_probe.raise_awkward, kind)
    if kind == "lone surrogate":
        assert type(info.value) is ValueError and "\udcff" in str(info.value)
    elif kind == "unpicklable, __str__ raises":
        assert type(info.value) is RemoteError and "UnprintableUnpicklable" in str(info.value)
    else:
        assert type(info.value) is worker_probe.NotesRaise
    assert pool.score("m", worker_probe.pid) == before
    assert pool.stats().worker_restarts == restarts


def test_a_result_that_raises_system_exit_as_it_unpickles_fails_only_its_job(pool):
    with pytest.raises(SerializationError, match="SystemExit"):
        pool.score("m", worker_probe.exit_on_unpickle)
    futures = [pool.submit("m", worker_probe.pid) for _ in range(3)]
    futures.insert(1, pool.submit("m", worker_probe.exit_on_unpickle))
    outcomes = [f.exception(timeout=30) for f in futures]
    assert isinstance(outcomes[1], SerializationError)
    assert [o for i, o in enumerate(outcomes) if i != 1] == [None, None, None]
    assert pool.healthy


def test_a_function_raising_a_locally_defined_exception_is_caught_by_its_class(pool):
    class LocalError(Exception):
        pass

    def raise_local(model):
        raise LocalError("local")

    with pytest.raises(LocalError, match="local"):
        pool.score("m", raise_local)


MAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    from mlpool import MLPool

    class InvalidInput(Exception):
        pass

    def load_model():
        return {"offset": 10}

    def score(model, x):
        if x < 0:
            raise InvalidInput(f"negative: {x}")
        return model["offset"] + x

    with MLPool({"m": load_model}, nb_workers=1, share_models=SHARE) as pool:
        assert pool.score("m", score, 1) == 11
        try:
            pool.score("m", score, -1)
        except InvalidInput as exc:
            print("caught", exc)
    """
)


def test_loaders_and_exceptions_defined_in_main_travel_by_value(worker_mode):
    # `python -c`: a __main__ no worker can import (the same in a notebook or a REPL).
    script = MAIN_SCRIPT.replace("SHARE", str(worker_mode == "forked"))
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "caught negative: -1"


def _items(count: int, size: int) -> list[bytes]:
    return [bytes([i % 251]) * size + i.to_bytes(4, "little") for i in range(count)]


@mlpool.batched(max_batch_size=300, max_wait_ms=1000)
def checksum_items(model: dict, items: list) -> list:
    """Each item's (first byte, last 4 bytes as int, length) and the batch size."""
    return [(item[0], int.from_bytes(item[-4:], "little"), len(item), len(items)) for item in items]


def test_a_batch_of_300_shared_memory_items_scores_correctly(worker_mode, fifo):
    # More than one sendmsg can carry (253 descriptors) and than the old
    # receive buffer held (64): each item must still get its own buffer.
    gate = fifo()
    size = 70_000  # over shared_memory_threshold: each item crosses in its own shared-memory file
    with make_pool({"m": worker_probe.load_empty}, nb_workers=1, shared_memory_threshold=65_536) as pool:
        blocker = pool.submit("m", worker_probe.block_on, str(gate))
        gate.wait_running()
        items = _items(300, size)
        futures = [pool.submit("m", checksum_items, item) for item in items]  # queued: one batch forms
        gate.release_opened()
        blocker.result(timeout=60)
        results = [f.result(timeout=120) for f in futures]
        assert [(first, index, length) for first, index, length, _ in results] == [
            (i % 251, i, size + 4) for i in range(300)
        ]
        assert max(batch for *_, batch in results) == 300
        assert pool.stats().jobs_crashed == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_leaves_the_workers_to_the_pool(worker_mode, fifo, sig):
    gate = fifo()
    with make_pool({"m": worker_probe.load_empty}, nb_workers=2) as pool:
        running = pool.submit("m", worker_probe.block_on, str(gate))
        gate.wait_running()
        processes = worker_children()  # every worker (and the template): what a group signal reaches
        assert len(processes) >= 2
        for process in processes:
            os.kill(process.pid, sig)
        gate.release_opened()
        assert running.result(timeout=30) == gate.pid
        assert all(process.is_running() for process in processes)
        assert [pool.score("m", worker_probe.pid) for _ in range(4)]
        stats = pool.stats()
        assert (stats.jobs_crashed, stats.worker_restarts, stats.workers_alive) == (0, 0, 2)


# What a worker may load of mlpool: its own package, the wire, the errors (and
# the package's lazy __init__); nothing of the API process's side.
WORKER_SIDE = ("mlpool._worker", "mlpool._wire")
ALLOWED = {"mlpool", "mlpool.errors", *WORKER_SIDE}
# Nor these, which only the API process needs.
NOT_IN_A_WORKER = ("asyncio", "fastapi", "prometheus_client", "ray")


def test_a_worker_loads_no_parent_side_module(worker_mode, request):
    with make_pool({"m": worker_probe.load_empty}, nb_workers=1) as pool:
        loaded = set(pool.score("m", worker_probe.loaded_modules))
    assert "mlpool._worker.main" in loaded
    ours = {name for name in loaded if name == "mlpool" or name.startswith("mlpool.")}
    assert sorted(name for name in ours - ALLOWED if not name.startswith(tuple(p + "." for p in WORKER_SIDE))) == []
    assert sorted(loaded.intersection(NOT_IN_A_WORKER)) == []
