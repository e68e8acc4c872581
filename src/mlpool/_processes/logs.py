"""The pool's life in the logs: one structured line per worker start, worker
death, replacement, pool state change and reload step, on the logger ``mlpool``.

Each line is readable as text and carries its fields as ``extra`` attributes
of the record (a JSON formatter shows them): ``event`` (``worker_ready``,
``worker_replaced``, ``worker_exited``, ``pool_state``, ``reload_started``,
``worker_rolled``, ``reload_finished``, ``reload_failed``), and per event
``worker_id``, ``worker_pid``, ``seconds``, ``cause``, ``job_id``,
``function``, ``model``, ``state_from``, ``state_to``, ``models``,
``versions``. Nothing is logged per
job at INFO; the library adds no handler. Called under the engine's lock:
cheap, lazy ``%`` formatting.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlpool._engine.jobs import Job

logger = logging.getLogger("mlpool")

__all__ = ["pool_state_changed", "reload_ended", "reload_started", "worker_exited", "worker_ready", "worker_rolled"]


def worker_ready(worker: Any, load_seconds: float, *, replacement: bool) -> None:
    """``worker`` (a WorkerHandle) said Ready; ``replacement``: not one of
    the pool's first workers (its time to ready is what a crash cost)."""
    seconds = time.monotonic() - worker.started_at
    event = "worker_replaced" if replacement else "worker_ready"
    logger.info(
        "%s %d (pid %d) ready in %.3fs (models loaded in %.3fs)",
        "replacement worker" if replacement else "worker", worker.id, worker.pid, seconds, load_seconds,
        extra={"event": event, "worker_id": worker.id, "worker_pid": worker.pid, "seconds": seconds},
    )  # fmt: skip


def worker_exited(worker: Any, cause: str, running: list[Job], *, intended: bool) -> None:
    """``worker`` is gone (``cause``: "killed by SIGSEGV (-11) (segmentation
    fault)", ...); ``running``: the job (or batch) it was running, if any.
    A warning unless the pool ended it (a stop, a timeout, an interrupt)."""
    job = running[0] if running else None
    held = f" while running job {job.id} ({job.fn_name} on model {job.model!r})" if job is not None else ""
    logger.log(
        logging.INFO if intended else logging.WARNING,
        "worker %d (pid %d) %s%s", worker.id, worker.pid, cause, held,
        extra={
            "event": "worker_exited", "worker_id": worker.id, "worker_pid": worker.pid, "cause": cause,
            "job_id": None if job is None else (job.key or job.id),
            "function": None if job is None else job.fn_name,
            "model": None if job is None else job.model,
        },
    )  # fmt: skip


def pool_state_changed(old: Any, new: Any) -> None:
    """The pool moves from state ``old`` to ``new`` (PoolState values)."""
    logger.log(
        logging.ERROR if new.value == "broken" else logging.INFO,
        "pool %s -> %s", old.value, new.value,
        extra={"event": "pool_state", "state_from": old.value, "state_to": new.value},
    )  # fmt: skip


def reload_started(models: list[str], surge: int, timeout: float) -> None:
    logger.info(
        "reload of %s started (surge=%d, timeout=%gs)", ", ".join(map(repr, models)), surge, timeout,
        extra={"event": "reload_started", "models": models},
    )  # fmt: skip


def worker_rolled(worker: Any, versions: dict[str, int], rolled: int, size: int, group: str) -> None:
    """``worker`` (a WorkerHandle) of a reload is ready: the ``rolled``-th of the ``size`` of ``group``."""
    logger.info(
        "reload: worker %d (pid %d) serves %s (%d of %d of %s rolled)", worker.id, worker.pid,
        ", ".join(f"{m!r} v{v}" for m, v in versions.items()), rolled, size, group,
        extra={"event": "worker_rolled", "worker_id": worker.id, "worker_pid": worker.pid, "versions": versions},
    )  # fmt: skip


def reload_ended(models: list[str], seconds: float, versions: dict[str, int], error: BaseException | None) -> None:
    """A reload finished (``error`` None: every worker serves ``versions``) or failed."""
    if error is None:
        logger.info(
            "reload finished in %.2fs: %s", seconds, ", ".join(f"{m!r} at version {v}" for m, v in versions.items()),
            extra={"event": "reload_finished", "models": models, "seconds": seconds, "versions": versions},
        )  # fmt: skip
    else:
        logger.error(
            "reload of %s failed after %.2fs: %s", ", ".join(map(repr, models)), seconds, error,
            extra={"event": "reload_failed", "models": models, "seconds": seconds, "cause": str(error)},
        )  # fmt: skip
