"""Copy-on-write workers: models loaded once in a template process that forks them.

With ``share_models=True`` the parent spawns one clean *template* process
(the same start-up as a worker: signals, niceness, thread caps), which runs
every loader once, freezes the loaded objects out of the garbage collector's
reach, and then only forks. Each worker is a fork of the template: its
models are the template's pages, shared until written, so N workers cost
about one copy of the models, and a replacement is serving in milliseconds.

::

    parent ──spawn──► template: load models, gc.freeze() ─► TemplateReady
       │  Fork(worker id) + the worker's socket ──►  os.fork() ─► worker: Ready, serve
       │  ◄── Forked(pid) + the worker's sentinel (a pipe only the worker holds)
       │  ◄── Reaped(pid, exit code)   (the template is the workers' parent)

The control channel is a ``SOCK_SEQPACKET`` socket: one pickled message per
packet, descriptors attached with ``SCM_RIGHTS``. Only the manager thread
uses the parent's end.

Workers outlive their template: if it dies they keep serving, and a new
template (models loaded once more) forks their replacements. A worker does
not get its parent's death signal from the pool (the template is its
parent), so it watches the pool's process itself (see ``watch_parent``).
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from array import array
from dataclasses import dataclass
from typing import Any

from mlpool._protocol import LoadFailed, Ready, encode, write_all
from mlpool._worker_main import (
    WorkerSettings,
    cap_threads_after_loading,
    cap_threads_before_loading,
    load_models,
    prepare_process,
    serve,
    watch_parent,
)

logger = logging.getLogger(__name__)

_template_ids = itertools.count(1)
MAX_PACKET = 64 * 1024
_FDS = array("i")
FORK_TIMEOUT = 30.0  # seconds the manager waits for the template to fork a worker


@dataclass(frozen=True, slots=True)
class TemplateReady:
    """The template loaded every model and forks from now on."""

    pid: int
    load_seconds: float


@dataclass(frozen=True, slots=True)
class SpawnSentinel:
    """The inode of the pipe whose write end the template holds so that the
    parent sees it exit (multiprocessing's sentinel): forked workers must not
    keep it open, or the template's death would go unseen."""

    inode: int


@dataclass(frozen=True, slots=True)
class Fork:
    """Fork a worker; its end of the worker's socket comes along."""

    worker_id: int


@dataclass(frozen=True, slots=True)
class Forked:
    """The worker's pid; its sentinel (read end of a pipe) comes along."""

    worker_id: int
    pid: int
    threads: tuple[str, ...]  # other threads the template ran at the fork (see _other_threads)


@dataclass(frozen=True, slots=True)
class Reaped:
    """A worker exited; ``exitcode`` as multiprocessing gives it (negative: a signal)."""

    pid: int
    exitcode: int


class TemplateGone(Exception):
    """The template died or stopped answering."""


# ------------------------------------------------------------ in the template


def template_main(sock: socket.socket, loaders_pickle: bytes, settings: WorkerSettings) -> None:
    """Entry point of the template process (spawned clean by the manager thread)."""
    # Loaders run single-threaded: an OpenMP runtime (GNU libgomp: XGBoost,
    # PyTorch, scikit-learn) whose thread team exists when the process forks
    # hangs in the child at its next parallel call. Each worker raises the
    # caps to threads_per_worker after the fork, with a fresh team.
    prepare_process(settings, 1)
    # Threads that run already came with the modules the spawn imported
    # (OpenBLAS starts its pool on import, and is fork-safe); the warning is
    # about those the loaders start.
    before = _thread_ids()
    if settings.threads == 1:
        # The hard limit even code that asks for more threads (XGBoost's
        # n_jobs) obeys; only settable before OpenMP starts, and inherited.
        os.environ["OMP_THREAD_LIMIT"] = "1"
    started = time.perf_counter()
    models = load_models(loaders_pickle)
    if isinstance(models, LoadFailed):
        _send(sock, models)
        return
    cap_threads_after_loading(1)
    # Collect once, then move every object alive now out of the collector's
    # generations: a collection in a worker would otherwise write to (and
    # so un-share) every page holding a model's Python objects.
    gc.collect()
    gc.freeze()
    _send(sock, TemplateReady(os.getpid(), time.perf_counter() - started))
    _fork_on_request(sock, models, settings, before)


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
    try:
        while True:
            readable, _, _ = select.select([sock, wake_r], [], [])
            if wake_r in readable:
                _drain(wake_r)
                _reap_children(sock)
            if sock not in readable:
                continue
            msg, fds = _recv(sock)
            if msg is None:
                return  # the pool is gone or done with us; workers stop on their own
            if type(msg) is SpawnSentinel:
                inherited = _pipe_ends(msg.inode)
                continue
            assert isinstance(msg, Fork)
            worker_sock_fd = fds[0]
            threads = _new_threads(old_threads)
            sentinel_r, sentinel_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                sock.close()
                _become_worker(worker_sock_fd, models, settings, close=(wake_r, wake_w, sentinel_r, *inherited))
            os.close(worker_sock_fd)  # siblings forked later must not hold it
            os.close(sentinel_w)
            try:
                _send(sock, Forked(msg.worker_id, pid, threads), [sentinel_r])
            finally:
                os.close(sentinel_r)
    except OSError:  # the pool closed the channel as we wrote to it: it is done with us
        return


def _become_worker(fd: int, models: dict[str, Any], settings: WorkerSettings, close: tuple[int, ...]) -> None:
    """The child side of a fork: serve jobs on ``fd`` until told to stop. Never returns."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for unused in close:
            os.close(unused)
        watch_parent(settings.parent_pid)
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
        _send(sock, Reaped(pid, os.waitstatus_to_exitcode(status)))


# Threads known to survive a fork: jemalloc (in PyArrow) restarts its
# background threads in the child.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def _thread_ids() -> set[int]:
    try:
        return {int(task) for task in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: Python's threads only
        return {t.native_id for t in threading.enumerate() if t.native_id is not None}


def _new_threads(old: set[int]) -> tuple[str, ...]:
    """Names of the threads started since ``old`` was taken, but for those
    known to be fork-safe."""
    names = []
    for tid in _thread_ids() - old:
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


def _send(sock: socket.socket, msg: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [pickle.dumps(msg)], list(fds))


def _recv(sock: socket.socket, flags: int = 0) -> tuple[Any, list[int]]:
    """One message and its descriptors; (None, []) at end of file."""
    # Not socket.recv_fds: before Python 3.12 it ignores ``flags``.
    data, ancillary, _, _ = sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(4 * _FDS.itemsize), flags)
    fds = _FDS[:0]
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return pickle.loads(data), list(fds)


# ------------------------------------------------------------- in the parent


class Template:
    """The parent's handle on a template process. Manager thread only."""

    def __init__(
        self, context: multiprocessing.context.BaseContext, loaders_pickle: bytes, settings: WorkerSettings
    ) -> None:
        self.id = next(_template_ids)
        self.sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = context.Process(
            target=template_main,
            args=(child_sock, loaders_pickle, settings),
            name=f"mlpool-template-{self.id}",
            daemon=False,
        )
        try:
            self.process.start()
        except BaseException:
            self.sock.close()
            raise
        finally:
            child_sock.close()
        self.started_at = time.monotonic()
        self.start_timed_out = False  # killed for not loading within start_timeout
        self.fd = self.sock.fileno()
        self.sentinel: int = self.process.sentinel
        _send(self.sock, SpawnSentinel(os.fstat(self.sentinel).st_ino))
        self.pid: int = self.process.pid
        self.ready: TemplateReady | None = None
        self.threads_at_fork: tuple[str, ...] = ()  # unsafe threads it had at its last fork
        self.warned = False
        self.load_failure: LoadFailed | None = None
        self.gone = False  # it stopped answering (end of file); see also _stopped
        self._stopped = False  # stop() reaped it
        self._exits: dict[int, int] = {}  # pid -> exit code, reaped by the template
        self._forked: list[tuple[Forked, list[int]]] = []

    def __repr__(self) -> str:
        return f"<template {self.id} pid={self.pid} {'ready' if self.ready else 'loading'}>"

    def receive(self) -> None:
        """Take every message waiting, without blocking: they update ``ready``,
        ``load_failure`` and ``gone``, and exit reports wait for :meth:`wait_exit`."""
        while not self.gone:
            try:
                msg, fds = _recv(self.sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = None, []
            if msg is None:
                self.gone = True
                return
            self._keep(msg, fds)

    def fork_worker(self, worker_id: int, worker_sock: socket.socket) -> ForkedProcess:
        """Ask for a worker on ``worker_sock`` (the child's end; the caller closes it).
        Raises TemplateGone if the template died or does not answer."""
        if self.gone or self.ready is None:
            raise TemplateGone(f"template {self.id} is not ready")
        try:
            _send(self.sock, Fork(worker_id), [worker_sock.fileno()])
        except OSError as exc:
            self.gone = True
            raise TemplateGone(f"template {self.id} is gone: {exc}") from None
        deadline = time.monotonic() + FORK_TIMEOUT
        while True:
            for i, (forked, fds) in enumerate(self._forked):
                if forked.worker_id == worker_id:
                    del self._forked[i]
                    self.threads_at_fork = forked.threads
                    return ForkedProcess(self, worker_id, forked.pid, fds[0])
            self._wait_message(deadline)

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        """The exit code of a worker it forked, once reaped (None: unknown).
        Call once the worker's sentinel fired."""
        deadline = time.monotonic() + timeout
        while pid not in self._exits:
            if not self.gone:
                try:
                    self._wait_message(deadline)
                    continue
                except TemplateGone:
                    pass
            # The template died: its children went to the nearest subreaper,
            # this process (see adopt_orphans) once the template is reaped.
            if not self._stopped:
                self.process.join(max(0.0, deadline - time.monotonic()))
            return _reap_orphan(pid)
        return self._exits.pop(pid)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the channel (the template exits at end of file) and reap it."""
        self.gone = True
        if self._stopped:
            return
        self._stopped = True
        try:
            self.sock.close()
        finally:
            self.process.join(timeout)
            if self.process.exitcode is None:
                self.process.kill()
                self.process.join(timeout)
            try:
                self.process.close()
            except ValueError:  # someone else reaped it (a waitpid(-1) in the app)
                logger.warning("the model template (pid %d) could not be reaped", self.pid)
        for _, fds in self._forked:
            for fd in fds:
                os.close(fd)
        self._forked.clear()

    def _wait_message(self, deadline: float) -> None:
        """Block until one message arrives and keep it (or raise TemplateGone)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TemplateGone(f"template {self.id} did not answer within {FORK_TIMEOUT}s")
            readable, _, _ = select.select([self.sock, self.sentinel], [], [], remaining)
            if self.sock in readable:
                break
            if readable:  # died: what it sent before dying is still readable
                if not self._readable_now():
                    self.gone = True
                    raise TemplateGone(f"template {self.id} died")
                break
        try:
            msg, fds = _recv(self.sock)
        except OSError as exc:
            msg, fds = None, []
            logger.debug("template %d: %s", self.id, exc)
        if msg is None:
            self.gone = True
            raise TemplateGone(f"template {self.id} is gone")
        self._keep(msg, fds)

    def _readable_now(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _keep(self, msg: Any, fds: list[int]) -> None:
        if type(msg) is Forked:
            self._forked.append((msg, fds))
            return
        for fd in fds:
            os.close(fd)
        if type(msg) is Reaped:
            self._exits[msg.pid] = msg.exitcode
        elif type(msg) is TemplateReady:
            self.ready = msg
        elif type(msg) is LoadFailed:
            self.load_failure = msg


def _reap_orphan(pid: int) -> int | None:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # not ours: we could not be a subreaper
        return None
    return os.waitstatus_to_exitcode(status)


_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
_adopters = 0
_adopters_lock = threading.Lock()
_was_subreaper = False


def adopt_orphans() -> None:
    """Make this process the reaper of its orphaned descendants (Linux), while
    any pool shares models: the workers of a template that dies are handed
    to us, not to PID 1, which in a container is often an application that
    never reaps them (each would stay a zombie). The manager reaps exactly
    the workers it knows; undone by the last :func:`release_orphans`."""
    global _adopters, _was_subreaper
    if not sys.platform.startswith("linux"):
        return
    with _adopters_lock:
        if _adopters == 0:
            flag = ctypes.c_int(0)
            _libc().prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
            _was_subreaper = bool(flag.value)
            if not _was_subreaper:
                _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _adopters += 1


def release_orphans() -> None:
    global _adopters
    if not sys.platform.startswith("linux"):
        return
    with _adopters_lock:
        _adopters -= 1
        if _adopters == 0 and not _was_subreaper:
            _libc().prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


class ForkedProcess:
    """A worker forked by a template, with the parts of ``multiprocessing.Process``
    that :class:`~mlpool._workers.WorkerHandle` uses."""

    def __init__(self, template: Template, worker_id: int, pid: int, sentinel: int) -> None:
        self.name = f"mlpool-worker-{worker_id}"
        self.pid = pid
        self.sentinel = sentinel  # end of file when the worker exits: only it held the other end
        self.exitcode: int | None = None
        self._template = template
        self._reaped = False

    def join(self, timeout: float | None = None) -> None:
        if not self._reaped:
            self.exitcode = self._template.wait_exit(self.pid, 5.0 if timeout is None else timeout)
            self._reaped = True

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self._reaped:
            return
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1
