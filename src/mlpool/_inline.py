"""``nb_workers=0``: the pool's API with no processes, for users' own tests.

Models load once, in the calling process, when the pool is created. Each job
runs in the thread that submits it, at submission, one at a time, and goes
through the same checks as with workers: arguments and results are pickled
(so what would fail to cross a pipe fails here too), user exceptions come
back as themselves with their traceback as ``__cause__``, and job ids,
``get_result``, ``cancel_job``, result expiry and shutdown behave the same.
What cannot be had without a process: a job's ``timeout`` cannot interrupt
it (it is not enforced), and ``score_async`` blocks the event loop while the
job runs.
"""

from __future__ import annotations

import pickle
import threading
import traceback
from typing import Any, Callable

from mlpool._config import PoolConfig
from mlpool._errors import MLPoolError, ModelLoadError, RemoteTraceback
from mlpool._jobs import Job, JobState
from mlpool._manager import Manager
from mlpool._state import PoolState
from mlpool._serialization import dumps


class InlineManager(Manager):
    """A Manager whose only "worker" is the calling thread."""

    def __init__(self, config: PoolConfig, loaders: dict[str, Callable[[], Any]]) -> None:
        super().__init__(config, loaders)
        self._loaders = loaders
        self._models: dict[str, Any] = {}
        self._loaded_functions: dict[int, Callable] = {}
        self._run_lock = threading.Lock()  # one job at a time, as in one worker

    def start(self) -> None:
        name = ""
        try:
            for name, loader in self._loaders.items():
                model = loader()
                if model is None:
                    raise ValueError(f"the loader of model {name!r} returned None; it must return the model")
                self._models[name] = model
        except Exception as exc:
            tb = traceback.format_exc()
            error = ModelLoadError(f"failed to load model {name!r}: {type(exc).__name__}: {exc}\n{tb}",
                                   model_name=name, remote_traceback=tb)  # fmt: skip
            with self._lock:
                self._state = PoolState.BROKEN
                self._broken_reason = str(error)
            self._set_started(error)
            self._close_resources()
            return
        with self._lock:
            self._state = PoolState.RUNNING
        self._set_started(None)

    def enqueue(self, job: Job, *, wait: bool, register: bool = False) -> None:
        self._lock.acquire()
        try:
            if job.state is not JobState.NEW:  # cancelled before it was admitted
                return None
            self._check_accepting()
            if register:
                self._registry.add(job)
            job.mark_running()
            job.state = JobState.RUNNING
        finally:
            self._release()
        ok, value = self._execute(job)
        self._lock.acquire()
        try:
            if job.state is JobState.RUNNING:  # not cancelled meanwhile
                self._finish(job, ok, value)
        finally:
            self._release()
        return None

    def _execute(self, job: Job) -> tuple[bool, Any]:
        with self._run_lock:
            try:
                fn = self._loaded_functions.get(job.fn_id)
                if fn is None:
                    fn = self._loaded_functions[job.fn_id] = pickle.loads(job.fn_pickle)
                model = self._models[job.model]
                args, kwargs = job.payload.loads("the job's arguments")
                if job.batch_policy is not None:
                    results = list(fn(model, [args[0]]))
                    if len(results) != 1:
                        raise MLPoolError(
                            f"batched function {job.fn_name} returned {len(results)} results for 1 item; "
                            "it must return exactly one result per item, in order"
                        )
                    result = results[0]
                else:
                    result = fn(model, *args, **kwargs)
                return True, pickle.loads(dumps(result, f"the result of {job.fn_name}"))
            except Exception as exc:
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
                return False, exc

    def run_lent(self, job: Job) -> bool:
        return False

    def shutdown(self, *, cancel_pending: bool, timeout: float) -> None:
        with self._lock:
            if self._state in (PoolState.CLOSED, PoolState.BROKEN):
                return
            self._state = PoolState.CLOSED
        self._close_resources()

    def join(self, timeout: float | None) -> bool:
        return True
