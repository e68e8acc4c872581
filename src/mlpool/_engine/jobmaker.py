"""Building a :class:`~mlpool._engine.jobs.Job` from a caller's arguments, for every engine.

Runs in the caller's thread, without any lock: the scoring function is looked
up (pickled once per function, see ``FunctionTable``) and the arguments are
pickled here, so bad input fails in the caller's stack and costs the pool
nothing. The process engine and the inline engine build jobs the same way,
with the same errors.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from mlpool._api.config import PoolConfig
from mlpool._engine.batching import batch_policy
from mlpool._engine.jobs import Job, JobOwner
from mlpool._engine.regions import RegionPool, pickle_call
from mlpool._engine.tracing import begin as begin_trace
from mlpool._wire.serialization import FunctionTable
from mlpool.errors import PoolClosedError, UnknownModelError


def forked_error(pid: int) -> PoolClosedError:
    """The error for using the pool of process ``pid`` from a process forked from it."""
    return PoolClosedError(
        f"this pool belongs to process {pid}, and this process ({os.getpid()}) was forked "
        "from it; create a pool in this process (for gunicorn --preload: in a post_fork hook "
        "or the app's lifespan, not at import)"
    )


class JobMaker:
    """Validates a job's options and pickles it; thread-safe."""

    def __init__(
        self,
        config: PoolConfig,
        models: Iterable[str],
        owner: JobOwner | None = None,
        pid: int = 0,
        regions: RegionPool | None = None,
    ) -> None:
        """``owner``: the engine a job's future tells when it is cancelled (see
        JobFuture). ``pid``: jobs are refused (PoolClosedError) in any other
        process (0: in none), such as one forked from the pool's own.
        ``regions``: where large arguments are copied when a job is made
        (None: into private memory, for the inline engine)."""
        self._regions = regions
        self.config = config
        self._owner = owner
        self._pid = pid
        self.models = frozenset(models)
        # Each model's defaults of timeout and max_retries (a Model's own, else the pool's).
        self._defaults = {
            name: (settings.job_timeout, settings.max_retries) for name, settings in config.model_settings.items()
        }
        self._functions = FunctionTable()
        self._ids = itertools.count(1)  # next() on a count is atomic under the GIL

    def make(
        self,
        model: str,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        *,
        timeout: float | None,
        retries: int | None,
        loop: asyncio.AbstractEventLoop | None = None,
        priority: int = 0,
        lane: object | None = None,
    ) -> Job:
        """A new job (state NEW). ``loop``, ``priority``, ``lane``: see :class:`Job`
        (the caller checked ``priority``). ``timeout`` and ``retries`` None: the
        model's defaults.

        Raises TypeError (not callable, bad batched call), UnknownModelError,
        ValueError (bad timeout or max_retries), SerializationError,
        PoolClosedError (in a process forked from the pool's own).
        """
        # A system call per job (~0.2 µs), not a pid kept by os.register_at_fork:
        # a fork made in C (uWSGI's workers) runs no Python hook.
        if self._pid and os.getpid() != self._pid:
            raise forked_error(self._pid)
        config = self.config
        if not callable(fn):
            raise _not_callable(model, fn)
        if model not in self.models:
            known = ", ".join(repr(m) for m in sorted(self.models))
            raise UnknownModelError(f"unknown model {model!r}; this pool serves {known}", model_name=model)
        default_timeout, default_retries = self._defaults.get(model) or (config.job_timeout, config.max_retries)
        if timeout is None:
            timeout = default_timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if retries is None:
            retries = default_retries
        elif isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {retries!r}")
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        policy = batch_policy(fn)
        if policy is not None and (len(args) != 1 or kwargs):
            raise TypeError(
                f"{name} is batched: each job takes exactly one item (one positional argument, no keyword "
                f"arguments), got {len(args)} positional and {len(kwargs)} keyword arguments"
            )
        fn_id, fn_pickle = self._functions.lookup(fn)
        payload = pickle_call(
            args, kwargs, name, config.shared_memory_threshold, config.shared_memory_limit, self._regions
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        job = Job(
            next(self._ids), model, fn_id, fn_pickle, payload, name,
            deadline=deadline, retries=retries, loop=loop, batch_policy=policy, owner=self._owner,
            priority=priority, lane=lane,
        )  # fmt: skip
        job.trace = begin_trace(retries)
        return job


def _not_callable(model: Any, fn: Any) -> TypeError:
    """The error for a scoring function that is not callable; for the two
    arguments swapped, it shows both calls the right way round."""
    if isinstance(fn, str) and callable(model):
        name = getattr(model, "__qualname__", None) or type(model).__name__
        return TypeError(
            f"the scoring function and the model name are swapped (got the model name {fn!r} where the function "
            f"goes): create_job takes the function first, create_job({name}, {fn!r}, args=(...)); score, submit, "
            f"stream and their async twins take the model name first, score({fn!r}, {name}, ...)"
        )
    return TypeError(f"the scoring function must be callable, got {type(fn).__name__}")
