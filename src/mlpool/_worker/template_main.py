"""The code that runs *in* a model template process (share_models).

::

    spawned ─► load every model once (one thread) ─► Python threads left? ─► LoadFailed, exit
       │                                       (unless fork_with_threads)
       └► gc.freeze() ─► TemplateReady ─► loop: Fork ─► os.fork() ─► Forked + the child's pidfd
                                                SIGCHLD ─► waitpid ─► Reaped(pid, exit code)
                                                end of file (the pool is done) ─► exit

The template stays the parent of every worker it forks and reaps them
itself, so no other process has to adopt them. The parent watches
each worker through a pidfd the template opens right after the fork: unlike
a pipe end, no process the worker starts can hold it open.

Imports only the protocol, the worker's code and the worker half of shared
memory, never the parent's side (the parent's handle is ``_processes.template``).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mlpool._wire.protocol import LoadFailed, Ready, encode
from mlpool._wire.template_protocol import Fork, Forked, ForkFailed, Reaped, SpawnSentinel, TemplateReady
from mlpool._wire.transport import recv_packet, send_packet, write_all
from mlpool._worker.main import (
    MAX_TRACEBACK,
    WorkerSettings,
    cap_threads_after_loading,
    cap_threads_before_loading,
    load_models,
    prepare_process,
    serve,
    watch_parent,
)

# Native threads known to survive a fork: jemalloc (in PyArrow) restarts its
# background threads in the child.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def template_main(
    sock: socket.socket, loaders_pickle: bytes, settings: WorkerSettings, fork_with_threads: bool = False
) -> None:
    """Entry point of the template process (spawned clean by the pool's manager thread).

    ``fork_with_threads``: fork even though the loaders left Python threads
    running (the user says they are fork-safe); else refuse with LoadFailed.
    """
    # Loaders run single-threaded: an OpenMP runtime (GNU libgomp: XGBoost,
    # PyTorch, scikit-learn) whose thread team exists when the process forks
    # hangs in the child at its next parallel call. Each worker raises the
    # caps to threads_per_worker after the fork, with a fresh team.
    prepare_process(settings, 1)
    # Threads that run already came with the modules the spawn imported
    # (OpenBLAS starts its pool on import, and is fork-safe); the checks are
    # about those the loaders start.
    native_before = _native_thread_ids()
    python_before = set(threading.enumerate())
    if settings.threads == 1:
        # The hard limit even code that asks for more threads (XGBoost's
        # n_jobs) obeys; only settable before OpenMP starts, and inherited.
        os.environ["OMP_THREAD_LIMIT"] = "1"
    started = time.perf_counter()
    starts: dict[threading.Thread, ThreadStart] = {}
    with _recording_thread_starts(starts):
        models = load_models(loaders_pickle)
    if isinstance(models, LoadFailed):
        send_packet(sock, models)
        return
    if not fork_with_threads:
        refusal = refuse_python_threads(python_before, starts)
        if refusal is not None:
            send_packet(sock, refusal)
            return
    del starts
    cap_threads_after_loading(1)
    # Collect once, then move every object alive now out of the collector's
    # generations: a collection in a worker would otherwise write to (and
    # so un-share) every page holding a model's Python objects.
    gc.collect()
    gc.freeze()
    send_packet(sock, TemplateReady(os.getpid(), time.perf_counter() - started))
    _fork_on_request(sock, models, settings, native_before)


# ------------------------------------------------ threads the loaders started


@dataclass(frozen=True, slots=True)
class ThreadStart:
    """Where a thread was started: the model being loaded, the innermost
    caller outside the standard library, and the whole stack."""

    model: str
    where: str
    stack: str


@contextmanager
def _recording_thread_starts(starts: dict[threading.Thread, ThreadStart]) -> Iterator[None]:
    """Record where each Python thread started in the block was started from
    (wraps ``Thread.start`` for the duration: no tracing, no cost per line)."""
    original = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        caller = sys._getframe(1)
        frames = traceback.extract_stack(caller)
        starts[thread] = ThreadStart(_loading_model(caller), _user_caller(frames), "".join(frames.format()))
        original(thread)

    threading.Thread.start = start  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        threading.Thread.start = original  # type: ignore[method-assign]


def _user_caller(frames: traceback.StackSummary) -> str:
    """The innermost frame outside the standard library (the user's line that
    made the thread, e.g. an executor's ``submit``), as ``file:line in function``."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    for frame in reversed(frames):
        in_stdlib = frame.filename.startswith(stdlib) and "site-packages" not in frame.filename
        if not in_stdlib:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "an unknown place"


def _loading_model(frame: Any) -> str:
    """The model whose loader runs: the ``name`` that ``load_models`` is at."""
    while frame is not None:
        if frame.f_code is load_models.__code__:
            return str(frame.f_locals.get("name", "<all models>"))
        frame = frame.f_back
    return "<all models>"


def refuse_python_threads(
    before: set[threading.Thread], starts: dict[threading.Thread, ThreadStart]
) -> LoadFailed | None:
    """A LoadFailed naming every Python thread started since ``before`` that
    still runs (a fork copies only the calling thread: a worker would wait
    forever on what such a thread was to do), or None if there is none."""
    threads = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    if not threads:
        return None
    described = []
    stacks = []
    model = "<all models>"
    for thread in threads:
        start = starts.get(thread)
        where = f", started at {start.where}" if start is not None else ""
        described.append(f"{thread.name!r} (running {_target_name(thread)}{where})")
        if start is not None:
            model = start.model
            stacks.append(f"Thread {thread.name!r} was started here:\n{start.stack}")
    error = (
        f"the loaders left {len(threads)} Python thread(s) running: {', '.join(described)}. A fork copies only "
        "the calling thread, so forked workers would hang on what these threads were to do. Use spawned workers "
        "(share_models=False), start the threads lazily (in the first job, not in the loader), or, if these "
        "threads are fork-safe, pass fork_with_threads=True"
    )
    return LoadFailed(model, error[:MAX_TRACEBACK], "\n".join(stacks)[-MAX_TRACEBACK:])


def _target_name(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None)  # what Thread(target=...) runs
    if target is None:
        run = type(thread).run
        return f"{run.__module__}.{run.__qualname__}"
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or repr(target)
    return f"{module}.{name}" if module else name


def _native_thread_ids() -> set[int]:
    try:
        return {int(task) for task in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: Python's threads only
        return {t.native_id for t in threading.enumerate() if t.native_id is not None}


def _new_native_threads(old: set[int]) -> tuple[str, ...]:
    """Names of the threads started since ``old`` was taken, but for those
    known to be fork-safe."""
    names = []
    for tid in _native_thread_ids() - old:
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                name = comm.read().strip()
        except OSError:  # it ended meanwhile, or not Linux
            name = next((t.name for t in threading.enumerate() if t.native_id == tid), "")
            if not name:
                continue
        if name not in FORK_SAFE_THREADS:
            names.append(name)
    return tuple(sorted(names))


# ------------------------------------------------------------ forking, reaping


def _fork_on_request(
    sock: socket.socket, models: dict[str, Any], settings: WorkerSettings, old_threads: set[int]
) -> None:
    """Fork a worker per Fork message and report the children it reaps, until end of file."""
    inherited: tuple[int, ...] = ()  # fds the workers must not keep (see SpawnSentinel)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes select() through wake_w
    watched: list[socket.socket | int] = [sock, wake_r]
    try:
        while True:
            readable, _, _ = select.select(watched, [], [])
            if wake_r in readable:
                _drain(wake_r)
                _reap_children(sock)
            if sock not in readable:
                continue
            msg, fds = recv_packet(sock)
            if msg is None:
                return  # the pool is gone or done with us; workers stop on their own
            if type(msg) is SpawnSentinel:
                inherited = _pipe_ends(msg.inode)
            elif type(msg) is Fork and len(fds) == 1:
                threads = _new_native_threads(old_threads)
                worker_settings = settings if msg.env is None else dataclasses.replace(settings, env=msg.env)
                inherit = (wake_r, wake_w, *inherited)
                _fork_worker(sock, msg.worker_id, fds[0], threads, models, worker_settings, inherit)
            else:  # not ours to use
                for fd in fds:
                    os.close(fd)
    except OSError:  # the pool closed the channel as we wrote to it: it is done with us
        return


def _fork_worker(
    sock: socket.socket,
    worker_id: int,
    worker_fd: int,
    threads: tuple[str, ...],
    models: dict[str, Any],
    settings: WorkerSettings,
    close_in_child: tuple[int, ...],
) -> None:
    """Fork one worker serving on ``worker_fd`` (closed here) and tell the
    parent: Forked with the worker's death handle, or ForkFailed."""
    use_pidfd = hasattr(os, "pidfd_open")
    pipe_r = pipe_w = -1
    try:
        if not use_pidfd:  # a pipe only the worker holds: its end of file is the death
            pipe_r, pipe_w = os.pipe()
        pid = os.fork()
    except OSError as exc:  # out of processes or memory
        for fd in (worker_fd, pipe_r, pipe_w):
            if fd >= 0:
                os.close(fd)
        send_packet(sock, ForkFailed(worker_id, f"{type(exc).__name__}: {exc}"))
        return
    if pid == 0:
        sock.close()
        _become_worker(worker_fd, models, settings, close=tuple(fd for fd in (*close_in_child, pipe_r) if fd >= 0))
    os.close(worker_fd)  # siblings forked later must not hold it
    if use_pidfd:
        try:
            # Now, before the child can be reaped (only this thread reaps,
            # in the loop): the pid cannot have been reused yet.
            handle = os.pidfd_open(pid)
        except OSError as exc:  # out of descriptors: a worker nobody could watch
            os.kill(pid, signal.SIGKILL)  # reaped (and reported) with the others
            send_packet(sock, ForkFailed(worker_id, f"pidfd_open: {type(exc).__name__}: {exc}"))
            return
    else:
        os.close(pipe_w)
        handle = pipe_r
    try:
        send_packet(sock, Forked(worker_id, pid, threads), [handle])
    finally:
        os.close(handle)


def _become_worker(fd: int, models: dict[str, Any], settings: WorkerSettings, close: tuple[int, ...]) -> None:
    """The child side of a fork: serve jobs on ``fd`` until told to stop. Never returns."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for unused in close:
            os.close(unused)
        watch_parent(settings.parent_pid)
        if settings.env:
            os.environ.update(settings.env)
        _reseed()
        if settings.threads > 1:
            cap_threads_before_loading(settings.threads)
            cap_threads_after_loading(settings.threads)
        write_all(fd, encode(Ready(os.getpid(), 0.0)))
        serve(fd, models, settings)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # Leave without running the template's exit handlers (they belong to it).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _reseed() -> None:
    """Give each worker its own random stream, as a spawned worker has.
    Python's ``random`` reseeds itself after a fork; NumPy's and PyTorch's
    global generators would repeat the template's sequence in every worker."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()


def _reap_children(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send_packet(sock, Reaped(pid, os.waitstatus_to_exitcode(status)))


def _pipe_ends(inode: int) -> tuple[int, ...]:
    """This process's descriptors on the pipe with this inode."""
    found = []
    for name in os.listdir("/dev/fd"):
        try:
            info = os.fstat(int(name))
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if stat.S_ISFIFO(info.st_mode) and info.st_ino == inode:
            found.append(int(name))
    return tuple(found)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
