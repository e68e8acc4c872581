"""Worker processes as the parent sees them: spawn, state, the jobs each holds, death.

A :class:`WorkerHandle` is owned by the manager (see ``_engine.engine``): its
state and ``inflight`` jobs change only under the manager's lock. Who reads
its pipe (``read_by``) and the pipe's buffer change only under its own
``read_lock``.
"""

from __future__ import annotations

import enum
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from mlpool._processes.pipes import WorkerPipe
from mlpool._processes.stacks import StackReader
from mlpool._wire.protocol import setup_frame
from mlpool._wire.started import LastStarted
from mlpool._wire.transport import send_frames
from mlpool._worker.main import WorkerSettings, worker_main

if TYPE_CHECKING:
    from mlpool._engine.jobs import Job

logger = logging.getLogger(__name__)

_worker_ids = itertools.count(1)
# How long reap() waits, without a pidfd, for an exit its sentinel announced.
_REAP_PATIENCE = 1.0


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned; loading models, no Ready yet
    IDLE = "idle"  # ready; takes jobs (it may hold some: see WorkerHandle.inflight)
    RETIRING = "retiring"  # takes no more jobs; gets Stop once its jobs are done
    STOPPING = "stopping"  # sent Stop; waiting for it to exit
    KILLED = "killed"  # we sent SIGKILL (timeout, interrupt, shutdown); waiting for its sentinel
    EXITED = "exited"  # reaped

    def to(self, new: WorkerState) -> WorkerState:
        """``new``, if a worker may go there from this state; else a RuntimeError (a bug)."""
        if new not in _WORKER_MOVES[self]:
            raise RuntimeError(f"mlpool internal error: a worker cannot go from {self.value} to {new.value}")
        return new


_WORKER_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.IDLE, WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.IDLE: frozenset({WorkerState.RETIRING, WorkerState.STOPPING, WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.RETIRING: frozenset({WorkerState.STOPPING, WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.STOPPING: frozenset({WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.KILLED: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
}


class WorkerHandle:
    """One worker process and the jobs it holds in the order it runs them;
    its pipe is ``pipe`` (the readers', see ``_processes.pipes``).

    The process's fields (state, pid, sentinel, why it was killed) are the
    Supervisor's, changed under the engine's lock; so are the jobs'.
    """

    __slots__ = (
        "id", "process", "pipe", "sentinel", "state", "inflight", "backlog", "known_functions", "jobs_done",
        "started_at", "pid", "kill_reason", "start_timed_out", "load_failure", "closed", "pidfd", "forked",
        "started", "fault", "group", "index", "stacks", "generation", "start_limit", "limit_name",
    )  # fmt: skip

    def __init__(
        self,
        process: Any,
        conn: Any,
        pidfd: int = -1,
        *,
        forked: bool = False,
        started: LastStarted | None = None,
        stacks: bool = False,
    ) -> None:
        """``stacks``: give the worker a pipe for its stack dumps (see ``_processes.stacks``:
        a spawned or forked worker, not a Ray actor). Raises OSError (out of
        descriptors, a dead worker)."""
        self.id = int(process.name.rsplit("-", 1)[1])
        self.process = process
        # A pidfd when we have one: readable once the process has exited,
        # whoever else holds its pipes (a child it forked inherits those).
        self.pidfd = pidfd
        self.sentinel: int = pidfd if pidfd >= 0 else process.sentinel
        # Forked from a template (see _forking): its sentinel is a pidfd, and
        # its exit code comes from the template, maybe after the sentinel fired.
        self.forked = forked
        # The id of the job it last began, which it writes itself: after its
        # death, tells a job it was running from one it never took (see _started).
        self.started = started or LastStarted()
        self.group = ""  # the worker group it belongs to ("": the shared workers)
        self.index = 0  # its place in the group (worker_env); a replacement takes the same
        self.generation = 1  # the version of its group's models it loads (see groups.Generation)
        self.start_limit = float("inf")  # seconds it has to load its models (its recipe's start_timeout)
        self.limit_name = "start_timeout"  # the setting start_limit comes from
        self.state = WorkerState.STARTING
        # The jobs sent to it, in the order it runs them; each has ``worker``
        # set to it. ``backlog`` is the sum of their ``estimate``; ``jobs_done``
        # counts those it answered. All three change only through assign(),
        # answered(), unsend() and release_all(), under the engine's lock.
        self.inflight: deque[Job] = deque()
        self.backlog = 0.0
        self.jobs_done = 0
        self.known_functions: set[int] = set()
        self.started_at = time.monotonic()
        self.pid: int = process.pid
        self.kill_reason: str | None = None
        self.start_timed_out = False  # killed for not loading its models within start_timeout
        self.fault: str | None = None  # killed for something it did (its bytes broke the protocol): how
        self.load_failure: Any = None  # the LoadFailed message, if it sent one
        self.closed = False
        self.pipe = WorkerPipe(conn)
        self.stacks: StackReader | None = None  # where its stack dumps come (see _stacks)
        if stacks:
            try:
                self.stacks = StackReader.open(self.pipe.sock)
            except BaseException:
                self.pipe.sock.close()
                raise

    def __repr__(self) -> str:
        return f"<worker {self.id} pid={self.pid} {self.state.value} holding {len(self.inflight)}>"

    def assign(self, job: Job, estimate: float) -> None:
        """``job`` is sent to it (the caller moved it to RUNNING): it runs after those it holds."""
        job.worker = self
        job.estimate = estimate
        self.inflight.append(job)
        self.backlog += estimate

    def answered(self) -> Job:
        """It answered its oldest job, which it no longer holds."""
        job = self.inflight.popleft()
        self.backlog -= job.estimate
        self.jobs_done += 1
        return job

    def unsend(self) -> Job:
        """Its newest job never reached it (the pipe failed): no longer its."""
        job = self.inflight.pop()
        self.backlog -= job.estimate
        return job

    def release_all(self) -> list[Job]:
        """It died: the jobs it held, oldest first, no longer its."""
        jobs = list(self.inflight)
        self.inflight.clear()
        self.backlog = 0.0
        for job in jobs:
            job.worker = None
        return jobs

    def load_limit(self) -> str:
        """The time it had to load its models, as the user set it."""
        return f"{self.limit_name}={self.start_limit:g}s"

    def kill(self, reason: str) -> None:
        """SIGKILL the worker (it may be running user code that never returns)."""
        if self.state in (WorkerState.KILLED, WorkerState.EXITED):
            return
        logger.info("killing worker %d (pid %d): %s", self.id, self.pid, reason)
        self.kill_reason = reason
        self.state = self.state.to(WorkerState.KILLED)
        self.process.kill()

    def terminate(self) -> None:
        self.process.terminate()

    def reap(self) -> int | None:
        """The exit code, once the sentinel has fired. Negative: killed by that signal.

        Never blocks: a pidfd fires once the process is a zombie, so its exit
        code is there (``exitcode`` is a ``waitpid(WNOHANG)``); a forked
        worker's code may still be on its way from the template (None: ask
        again then). Without a pidfd (other platforms, Ray actors) the sentinel
        fires when its descriptors close, at most a moment before the exit:
        then this waits for that moment, briefly."""
        code = self.process.exitcode
        if code is None and self.pidfd < 0 and not self.forked:
            self.process.join(timeout=_REAP_PATIENCE)
            code = self.process.exitcode
        return code

    def close(self) -> None:
        """Close the pipe and release the process (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.stacks is not None:
            self.stacks.close()
        self.pipe.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.started.close()
        try:
            self.process.close()
        except ValueError:  # still running (join timed out): leave it to the OS
            logger.warning("worker %d (pid %d) could not be reaped", self.id, self.pid)


def spawn_worker(
    context: multiprocessing.context.BaseContext, loaders_pickle: bytes, settings: WorkerSettings
) -> WorkerHandle:
    """Start one worker process. Call from the manager thread (see ``_die_with_parent``)."""
    worker_id = new_worker_id()
    parent_conn, child_conn = context.Pipe(duplex=True)
    try:
        started = send_started_word(socket.socket(fileno=os.dup(parent_conn.fileno())))
    except BaseException:
        parent_conn.close()
        child_conn.close()
        raise
    process = context.Process(  # type: ignore[attr-defined]  # typeshed: only concrete contexts have it
        target=worker_main,
        args=(child_conn, worker_id, loaders_pickle, settings),
        name=f"mlpool-worker-{worker_id}",
        daemon=False,
    )
    try:
        process.start()
        untrack(process)
    except BaseException:
        parent_conn.close()
        started.close()
        raise
    finally:
        child_conn.close()
    try:
        return WorkerHandle(process, parent_conn, open_pidfd(process.pid), started=started, stacks=True)
    except BaseException:  # out of descriptors for its handle: leave no process behind
        process.kill()
        process.join(_REAP_PATIENCE)
        parent_conn.close()
        started.close()
        raise


def untrack(process: multiprocessing.process.BaseProcess) -> None:
    """Take a started process of the pool out of ``multiprocessing``'s table
    of children, right after ``start()``: the pool reaps its processes itself.

    Left there, a process forked from this one later (``os.fork`` in a server
    or a helper, even one made in C, which runs no at-fork hook) inherits the
    entry, and ``multiprocessing``'s exit hook in that child joins the
    parent's worker: "AssertionError: can only join a child process". In this
    process, the same hook would join, at exit, a process the pool may be
    closing meanwhile ("process object is closed"). The table is private to
    CPython's ``multiprocessing.process``; without it there is nothing to do."""
    children = getattr(multiprocessing.process, "_children", None)
    if isinstance(children, set):
        children.discard(process)


def send_started_word(sock: socket.socket, *, close: bool = True) -> LastStarted:
    """Create a worker's started word and send it as the first message on
    its socket (it waits there until the worker reads it). ``close``: close
    ``sock`` afterwards (a duplicate made for this)."""
    fd, word = LastStarted.create()
    try:
        if fd >= 0:
            send_frames(sock, [setup_frame(fd)])
    except BaseException:
        word.close()
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        if close:
            sock.close()
    return word


def open_pidfd(pid: int) -> int:
    """A pidfd of our child ``pid`` (Linux 5.3+), or -1 where there is none.

    Opened right after the child started: it is not reaped (so its pid not
    reused) before we wait for it."""
    if not hasattr(os, "pidfd_open"):
        return -1
    try:
        return os.pidfd_open(pid)
    except OSError:  # an old kernel or seccomp (ENOSYS), or a pid already reaped
        return -1


def new_worker_id() -> int:
    """A worker id unique in this process (its processes are named for it)."""
    return next(_worker_ids)


def describe_exit(exitcode: int | None) -> str:
    """'killed by SIGKILL (-9)', 'exited with code 3'..."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {
            "SIGKILL": " (killed, possibly by the out-of-memory killer)",
            "SIGSEGV": " (segmentation fault)",
            "SIGBUS": " (bus error)",
            "SIGABRT": " (aborted)",
        }.get(name, "")
        return f"killed by {name} ({exitcode}){hint}"
    return f"exited with code {exitcode}"
