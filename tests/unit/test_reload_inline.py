"""reload_models with nb_workers=0: the loaders rerun in the caller's thread, the models swap between jobs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.versions import ModelFiles, model_after_release, version_of

from mlpool import MLPool, ModelLoadError, PoolClosedError


def test_an_inline_reload_swaps_the_models_and_counts_the_version(tmp_path):
    files = ModelFiles(tmp_path / "model")
    with MLPool({"m": files.loader()}, nb_workers=0) as pool:
        files.set(2)
        pool.reload_models()
        assert pool.score("m", version_of) == "m:2"
        asyncio.run(pool.reload_models_async({"m": lambda: "m:new"}))
        assert pool.score("m", version_of) == "m:new"
        assert pool.stats().models["m"].version == 3
        files.set(4, "raise")
        with pytest.raises(ModelLoadError, match="corrupt"):
            pool.reload_models({"m": files.loader()})
        assert pool.score("m", version_of) == "m:new"  # nothing changed
        assert pool.stats().models["m"].version == 3
    with pytest.raises(PoolClosedError):
        pool.reload_models()


def test_a_job_running_inline_keeps_the_model_it_started_with(tmp_path, fifo):
    files = ModelFiles(tmp_path / "model")
    gate = fifo()
    with MLPool({"m": files.loader()}, nb_workers=0) as pool, ThreadPoolExecutor(1) as executor:
        job = executor.submit(pool.score, "m", model_after_release, str(gate))
        gate.wait_running()
        files.set(2)
        pool.reload_models()  # while the job runs
        gate.release_opened()
        assert job.result(30) == "m:1" and pool.score("m", version_of) == "m:2"
