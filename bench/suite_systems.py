"""The systems ``bench/suite.py`` compares, behind one small interface.

Each is set up the way its documentation recommends for "load a model once
per worker, then score many requests": an initializer (ProcessPoolExecutor,
loky), worker state (mpire), actors (Ray), the pool's own loaders (mlpool
0.1.0 and mlpool). Each runs with the same number of workers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import suite_workloads as w


class NotInstalled(Exception):
    """The peer's package is missing; the message says how to install it."""


class System:
    name = ""
    batching = False  # runs forest_batched as a batched function

    def __init__(self, workers: int, forest_path: str) -> None:
        self.workers = workers
        self.forest_path = forest_path

    def start(self) -> None:
        """Start the workers (loading the models); return when they serve."""

    def call(self, workload: str, arg: Any) -> Any:
        raise NotImplementedError

    async def acall(self, workload: str, arg: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def skip_reason(self, workload: str) -> str | None:
        if workload == "forest_batched" and not self.batching:
            return "no batching"
        return None


class InProcess(System):
    """The direct call in the caller's process: the floor for latency; in an
    event loop it blocks the loop, so 64 callers run one after another."""

    name = "in-process"

    def start(self) -> None:
        w.init_worker(self.forest_path)

    def call(self, workload: str, arg: Any) -> Any:
        return w.call(workload, arg)

    async def acall(self, workload: str, arg: Any) -> Any:
        return w.call(workload, arg)


class _Executor(System):
    executor: Any

    def _warm_up(self) -> None:
        """Every worker started and loaded (they start lazily)."""
        for f in [self.executor.submit(w.call, "tiny", 0) for _ in range(self.workers * 4)]:
            f.result()

    def call(self, workload: str, arg: Any) -> Any:
        return self.executor.submit(w.call, workload, arg).result()

    async def acall(self, workload: str, arg: Any) -> Any:
        return await asyncio.wrap_future(self.executor.submit(w.call, workload, arg))

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class ProcessPool(_Executor):
    name = "ProcessPoolExecutor"

    def start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.executor = ProcessPoolExecutor(self.workers, initializer=w.init_worker, initargs=(self.forest_path,))
        self._warm_up()


class Loky(_Executor):
    name = "loky"

    def start(self) -> None:
        try:
            from loky import get_reusable_executor
        except ImportError:
            raise NotInstalled("pip install loky") from None
        self.executor = get_reusable_executor(
            max_workers=self.workers, initializer=w.init_worker, initargs=(self.forest_path,), reuse=False
        )
        self._warm_up()

    def close(self) -> None:
        self.executor.shutdown(wait=True, kill_workers=True)


class Mpire(System):
    name = "mpire"

    def start(self) -> None:
        try:
            from mpire import WorkerPool
        except ImportError:
            raise NotInstalled("pip install mpire") from None
        self.pool = WorkerPool(n_jobs=self.workers, use_worker_state=True, keep_alive=True)
        self.init = w.init_worker_state(self.forest_path)
        for _ in range(self.workers * 4):
            self.call("tiny", 0)

    def call(self, workload: str, arg: Any) -> Any:
        return self.pool.apply_async(w.call_with_state, args=(workload, arg), worker_init=self.init).get()

    async def acall(self, workload: str, arg: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(future.set_result, result)

        def failed(error: BaseException) -> None:
            loop.call_soon_threadsafe(future.set_exception, error)

        self.pool.apply_async(
            w.call_with_state, args=(workload, arg), worker_init=self.init, callback=done, error_callback=failed
        )
        return await future

    def close(self) -> None:
        self.pool.stop_and_join()
        self.pool.terminate()


class RayActors(System):
    """One actor per worker holding the models; calls go round-robin."""

    name = "Ray actors"

    def start(self) -> None:
        try:
            import ray
        except ImportError:
            raise NotInstalled("pip install ray") from None
        self.ray = ray
        ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)

        @ray.remote(num_cpus=1)
        class Scorer:
            def __init__(self, forest_path: str) -> None:
                w.init_worker(forest_path)

            def call(self, workload: str, arg: Any) -> Any:
                return w.call(workload, arg)

        self.actors = [Scorer.remote(self.forest_path) for _ in range(self.workers)]
        self.next = 0
        ray.get([actor.call.remote("tiny", 0) for actor in self.actors])

    def _actor(self) -> Any:
        self.next = (self.next + 1) % len(self.actors)
        return self.actors[self.next]

    def call(self, workload: str, arg: Any) -> Any:
        return self.ray.get(self._actor().call.remote(workload, arg))

    async def acall(self, workload: str, arg: Any) -> Any:
        return await self._actor().call.remote(workload, arg)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.ray.shutdown()


class MLPool010(System):
    """The original mlpool, 0.1.0 from PyPI (import ``ml_pool``): jobs in a
    multiprocessing queue, results polled in a Manager dict."""

    name = "mlpool 0.1.0"

    def start(self) -> None:
        try:
            from ml_pool import MLPool as OldPool
        except ImportError:
            raise NotInstalled("pip install --target bench/.peers/mlpool-0.1.0 --no-deps mlpool==0.1.0") from None
        logging.getLogger("ml_pool").setLevel(logging.WARNING)  # it logs every job at INFO
        self.pool = OldPool(w.loaders(self.forest_path), nb_workers=self.workers)

    def call(self, workload: str, arg: Any) -> Any:
        job_id = self.pool.create_job(w.FUNCTIONS[workload], w.MODEL_OF[workload], args=(arg,))
        return self.pool.get_result(job_id)

    async def acall(self, workload: str, arg: Any) -> Any:
        job_id = await self.pool.create_job_async(w.FUNCTIONS[workload], w.MODEL_OF[workload], args=(arg,))
        return await self.pool.get_result_async(job_id)

    def close(self) -> None:
        self.pool.shutdown()


class MLPoolSystem(System):
    name = "mlpool"
    batching = True
    options: dict[str, Any] = {}

    def start(self) -> None:
        from mlpool import MLPool

        self.pool = MLPool(w.loaders(self.forest_path), nb_workers=self.workers, **self.options)

    def _fn(self, workload: str) -> Any:
        return w.forest_batched if workload == "forest_batched" else w.FUNCTIONS[workload]

    def call(self, workload: str, arg: Any) -> Any:
        return self.pool.score(w.MODEL_OF[workload], self._fn(workload), arg)

    async def acall(self, workload: str, arg: Any) -> Any:
        return await self.pool.score_async(w.MODEL_OF[workload], self._fn(workload), arg)

    def close(self) -> None:
        self.pool.shutdown()


class MLPoolShared(MLPoolSystem):
    name = "mlpool share_models"
    options = {"share_models": True}


class MLPoolRay(MLPoolSystem):
    """mlpool's scheduler with Ray actors as workers, on a local Ray (next to
    the hand-written Ray actors above)."""

    name = "mlpool backend=ray"
    options = {"backend": "ray", "threads_per_worker": 1}

    def start(self) -> None:
        try:
            import ray
        except ImportError:
            raise NotInstalled("pip install ray") from None
        ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        super().start()

    def close(self) -> None:
        super().close()
        import ray

        ray.shutdown()


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (InProcess, ProcessPool, Loky, Mpire, RayActors, MLPool010, MLPoolSystem, MLPoolShared, MLPoolRay)
}
