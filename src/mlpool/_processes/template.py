"""Copy-on-write workers: the parent's handle on a model template process.

With ``share_models=True`` the parent spawns one clean *template* process
(the same start-up as a worker: signals, niceness, thread caps), which runs
every loader once, freezes the loaded objects out of the garbage collector's
reach, and then only forks (its code is ``_worker.template_main``). Each worker is
a fork of the template: its models are the template's pages, shared until
written, so N workers cost about one copy of the models, and a replacement
is serving in milliseconds.

::

    parent ──spawn──► template: load models, gc.freeze() ─► TemplateReady
       │  request_fork(): Fork(worker id) + the worker's socket ──► os.fork()
       │  receive() ◄── Forked(pid) + the worker's pidfd   ─► WorkerForked event
       │  receive() ◄── Reaped(pid, exit code)              ─► Reaped event
       │  (the template is the workers' parent and reaps them)

Nothing here waits for the template: :meth:`Template.request_fork`
sends and returns; answers come as events from :meth:`Template.receive`,
which the manager calls when :attr:`Template.fd` is readable; a stopped or
hung template shows as a request left unanswered (:meth:`Template.pending_since`).

Workers outlive their template: if it dies they keep serving (their death
is still seen, through their pidfd; their exit code is then unknown), and a
new template (models loaded once more) forks their replacements. A worker
watches the pool's process itself (see ``watch_parent``): the template is
its parent. The pool's process never adopts orphans.
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
from dataclasses import dataclass

from mlpool._processes.workers import untrack
from mlpool._wire.protocol import LoadFailed
from mlpool._wire.template_protocol import Fork, Forked, ForkFailed, Reaped, SpawnSentinel, TemplateReady
from mlpool._wire.transport import recv_packet, send_packet
from mlpool._worker.main import WorkerSettings
from mlpool._worker.template_main import template_main

__all__ = ["ForkFailed", "ForkedProcess", "LoadFailed", "Reaped", "Template", "TemplateClosed", "TemplateEvent",
           "TemplateGone", "TemplateReady", "WorkerForked"]  # fmt: skip

logger = logging.getLogger(__name__)

_template_ids = itertools.count(1)
_REAP_WAIT = 5.0  # seconds reap() waits for an exit that its sentinel (or a SIGKILL) announced


class TemplateGone(Exception):
    """The template died, closed its channel or stopped answering."""


@dataclass(frozen=True, slots=True)
class WorkerForked:
    """A fork request was answered: the worker runs (it says Ready on its socket)."""

    worker_id: int
    process: ForkedProcess
    threads: tuple[str, ...]  # native threads the template ran at the fork (for a warning)


@dataclass(frozen=True, slots=True)
class TemplateClosed:
    """The template's channel reached end of file: it exited or is exiting.
    No answer comes for requests still pending."""


TemplateEvent = TemplateReady | LoadFailed | WorkerForked | ForkFailed | Reaped | TemplateClosed


class TemplateState(enum.Enum):
    LOADING = "loading"  # spawned; loading the models, no TemplateReady yet
    READY = "ready"  # takes fork requests
    GONE = "gone"  # its channel is closed (end of file, or close()); its sentinel tells when it exited

    def to(self, new: TemplateState) -> TemplateState:
        """``new``, if a template may go there from this state; else a RuntimeError (a bug)."""
        if new not in _TEMPLATE_MOVES[self]:
            raise RuntimeError(f"mlpool internal error: a template cannot go from {self.value} to {new.value}")
        return new


_TEMPLATE_MOVES: dict[TemplateState, frozenset[TemplateState]] = {
    TemplateState.LOADING: frozenset({TemplateState.READY, TemplateState.GONE}),
    TemplateState.READY: frozenset({TemplateState.GONE}),
    TemplateState.GONE: frozenset({TemplateState.GONE}),  # close() is idempotent
}


class Template:
    """The parent's handle on a template process. One thread only (the manager's).

    Every call returns at once: :meth:`request_fork`, :meth:`receive`,
    :meth:`pending_since`, :meth:`close`, :meth:`kill`, and :meth:`reap` once
    :attr:`sentinel` is readable.
    """

    def __init__(
        self,
        context: multiprocessing.context.BaseContext,
        loaders_pickle: bytes,
        settings: WorkerSettings,
        *,
        fork_with_threads: bool = False,
    ) -> None:
        """Spawn the template (it loads the models; TemplateReady or LoadFailed follows).
        ``fork_with_threads``: fork even if the loaders left Python threads running."""
        self.id = next(_template_ids)
        self.sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = context.Process(  # type: ignore[attr-defined]  # typeshed: only concrete contexts have it
            target=template_main,
            args=(child_sock, loaders_pickle, settings, fork_with_threads),
            name=f"mlpool-template-{self.id}",
            daemon=False,
        )
        try:
            self.process.start()
            untrack(self.process)
        except BaseException:
            self.sock.close()
            raise
        finally:
            child_sock.close()
        self.started_at = time.monotonic()
        self.start_timed_out = False  # killed for not loading within start_timeout
        self.fd = self.sock.fileno()  # readable: call receive()
        self.sentinel: int = self.process.sentinel  # readable: it exited; call reap()
        self.pid: int = self.process.pid
        send_packet(self.sock, SpawnSentinel(os.fstat(self.sentinel).st_ino))
        self.state = TemplateState.LOADING
        self.load_seconds: float | None = None  # once it said it is ready (it stays set once it is gone)
        self.threads_at_fork: tuple[str, ...] = ()  # unsafe threads it had at its last fork
        self.warned = False
        self.load_failure: LoadFailed | None = None
        self.exitcode: int | None = None
        self._reaped = False
        self._pending: dict[int, float] = {}  # worker id -> when its fork was requested
        self._children: dict[int, ForkedProcess] = {}  # pid -> forked, exit not reported yet

    def __repr__(self) -> str:
        return f"<template {self.id} pid={self.pid} {self.state.value}>"

    @property
    def gone(self) -> bool:
        return self.state is TemplateState.GONE

    def _close_channel(self) -> None:
        self.state = self.state.to(TemplateState.GONE)
        self._pending.clear()

    # ------------------------------------------------------------ non-blocking

    def request_fork(self, worker_id: int, worker_sock: socket.socket, env: dict[str, str] | None = None) -> None:
        """Ask for a worker serving on ``worker_sock`` (the child's end: the
        caller closes its own copy after this returns). Returns at once; the
        answer is a WorkerForked or ForkFailed event from :meth:`receive`.
        ``env``: set in the worker's environment before it serves (worker_env).
        Raises TemplateGone if the template is not ready, gone, or so far
        behind that its channel is full."""
        if self.state is not TemplateState.READY:
            raise TemplateGone(f"template {self.id} is not ready ({self.state.value})")
        try:
            send_packet(self.sock, Fork(worker_id, env), [worker_sock.fileno()], socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise TemplateGone(f"template {self.id} does not read its requests") from None
        except OSError as exc:
            self._close_channel()
            raise TemplateGone(f"template {self.id} is gone: {exc}") from None
        self._pending[worker_id] = time.monotonic()

    def receive(self) -> list[TemplateEvent]:
        """Every event waiting, without blocking: TemplateReady, LoadFailed,
        WorkerForked, ForkFailed, Reaped (the exit code is also set on the
        worker's ForkedProcess), and last TemplateClosed at end of file.
        Also updates ``state``, ``load_failure`` and ``threads_at_fork``."""
        return self._read_events()

    def _read_events(self) -> list[TemplateEvent]:
        events: list[TemplateEvent] = []
        reset = False
        while not self.gone:
            try:
                msg, fds = recv_packet(self.sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except ConnectionResetError:
                # The template exited with packets of ours unread (the SpawnSentinel,
                # while it was loading): the kernel says so once, before the packets
                # it sent last (a LoadFailed), which are read next.
                if reset:
                    msg, fds = None, []
                else:
                    reset = True
                    continue
            except OSError as exc:
                logger.debug("template %d: %s", self.id, exc)
                msg, fds = None, []
            if msg is None:
                self._close_channel()
                events.append(TemplateClosed())
                break
            event = self._event(msg, fds)
            if event is not None:
                events.append(event)
        return events

    def pending_since(self) -> float | None:
        """When the oldest unanswered fork request was made (monotonic), or None."""
        return min(self._pending.values(), default=None)

    def close(self) -> None:
        """Close the channel: the template exits at end of file (its workers
        serve on). Returns at once; the sentinel fires once it exited. Idempotent."""
        self._close_channel()
        if self.sock.fileno() >= 0:
            self.sock.close()

    def kill(self) -> None:
        """SIGKILL the template (hung, stopped, or too slow); its workers serve on."""
        if not self._reaped:
            self.process.kill()

    def reap(self) -> int | None:
        """Once :attr:`sentinel` is readable (it exited): reap it without
        waiting, close the channel; its exit code (None: unknown). Idempotent."""
        if not self._reaped:
            self._reaped = True
            self.close()
            # The sentinel fired: the process has exited (no descendant holds
            # its pipe, see SpawnSentinel), so this returns at once; right
            # after kill(), as soon as the signal is delivered.
            self.process.join(_REAP_WAIT)
            self.exitcode = self.process.exitcode
            try:
                self.process.close()
            except ValueError:  # someone else reaped it (a waitpid(-1) in the app)
                logger.warning("the model template (pid %d) could not be reaped", self.pid)
        return self.exitcode

    def _event(self, msg: object, fds: list[int]) -> TemplateEvent | None:
        if type(msg) is Forked and len(fds) == 1:
            self._pending.pop(msg.worker_id, None)
            process = ForkedProcess(self, msg.worker_id, msg.pid, fds[0], is_pidfd=hasattr(os, "pidfd_open"))
            self._children[msg.pid] = process
            self.threads_at_fork = msg.threads
            return WorkerForked(msg.worker_id, process, msg.threads)
        for fd in fds:
            os.close(fd)
        if type(msg) is Reaped:
            child = self._children.pop(msg.pid, None)
            if child is not None:
                child.exitcode = msg.exitcode
            return msg
        if type(msg) is ForkFailed:
            self._pending.pop(msg.worker_id, None)
            return msg
        if type(msg) is TemplateReady:
            if self.state is TemplateState.LOADING:
                self.state = self.state.to(TemplateState.READY)
                self.load_seconds = msg.load_seconds
                logger.debug("model template (pid %d) ready in %.3fs", self.pid, msg.load_seconds)
            return msg
        if type(msg) is LoadFailed:
            self.load_failure = msg
            return msg
        logger.warning("template %d sent an unexpected message: %r", self.id, msg)
        return None


class ForkedProcess:
    """A worker forked by a template, with the parts of ``multiprocessing.Process``
    that :class:`~mlpool._processes.workers.WorkerHandle` uses.

    ``sentinel`` is readable once the worker exited: a pidfd (Linux), so no
    process the worker started keeps it from firing. ``exitcode`` is set
    when its template reports it (a Reaped event); if the template died
    first, it stays None (unknown) unless this process is the worker's
    parent by then (the pool runs as PID 1 of a container): :meth:`poll`.
    """

    def __init__(self, template: Template, worker_id: int, pid: int, sentinel: int, *, is_pidfd: bool) -> None:
        self.name = f"mlpool-worker-{worker_id}"
        self.pid = pid
        self.sentinel = sentinel
        self._exitcode: int | None = None
        self._is_pidfd = is_pidfd
        self._template = template

    @property
    def exitcode(self) -> int | None:
        """The exit code if known, without blocking (see :meth:`poll`)."""
        return self.poll()

    @exitcode.setter
    def exitcode(self, code: int | None) -> None:
        self._exitcode = code

    def poll(self) -> int | None:
        """The exit code if known, without blocking."""
        if self._exitcode is None and self._is_pidfd and self.sentinel >= 0:
            try:
                result = os.waitid(os.P_PIDFD, self.sentinel, os.WEXITED | os.WNOHANG)
            except (ChildProcessError, OSError):  # not our child: its template reports it
                return None
            if result is not None:
                self._exitcode = -result.si_status if result.si_code != os.CLD_EXITED else result.si_status
        return self._exitcode

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self._exitcode is not None:
            return
        try:
            if self._is_pidfd and self.sentinel >= 0:
                signal.pidfd_send_signal(self.sentinel, signum)  # never a reused pid
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Close the sentinel (idempotent)."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1
