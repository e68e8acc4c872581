"""Worker stacks: what each thread of a worker is doing, read from outside.

::

    parent                                   worker (main thread, at StackPipe)
    pipe() ─► StackPipe(write end) ────────► install(): faulthandler.enable(fd)
      │                                        + faulthandler.register(SIGUSR2, fd, chain)
      │ ◄──────────────────────── ACK byte      + Python's own handler for SIGUSR2, whose
      │                                          C part writes the signal number to fd
    dump: SIGUSR2 ─────────────────────────► faulthandler writes every thread's stack,
      │ ◄── text ... END byte (12)              then the chained handler writes the END byte
    crash (SIGSEGV, SIGBUS, SIGABRT, ...) ──► faulthandler writes its fatal-error dump, dies;
      the parent reads what the pipe holds when it settles the crash

Each worker has its own pipe, apart from its socket (which carries framed
messages only). faulthandler writes from its C signal handler, so a worker
answers whatever its job does: a Python loop, a blocking read, C code that
holds the GIL. Nothing stops the job: the handler writes and returns. A
system call it interrupts fails with EINTR, which Python retries (PEP 475);
C code that does not retry sees it, as it would any signal.

The dump has no end of its own. Chained to faulthandler, Python's C-level
signal handler writes the signal number to its wakeup fd (this pipe) right
after the dump: the END byte. (To chain, faulthandler puts Python's handler
back for a moment and raises the signal again: a request that arrives in
that moment gets END alone, and is sent again.) faulthandler writes
printable ASCII and newlines only, so neither END nor the ACK byte can
occur in a dump. The worker writes ACK once its handlers are in place:
before that, the parent never signals it (SIGUSR2's default action would
end it).

Limits: a scoring function that sets its own handler for SIGUSR2, or its
own ``signal.set_wakeup_fd`` (an asyncio loop with signal handlers) in the
worker, takes that worker's dumps away (it answers nothing; the wait is
bounded). The worker's half (its handlers, the signal, the END and ACK
bytes) is ``mlpool._worker.stacks``; this is the parent's.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any, TypeVar

from mlpool._wire.protocol import stack_pipe_frame
from mlpool._wire.transport import send_frames
from mlpool._worker.stacks import ACK as _ACK
from mlpool._worker.stacks import DUMP_SIGNAL
from mlpool._worker.stacks import END as _END

__all__ = [
    "DUMP_SIGNAL", "STACKS_TIMEOUT", "StackReader", "collect_stacks", "with_crash_dump", "with_worker_stack",
]

STACKS_TIMEOUT = 1.0  # seconds a worker has to answer a dump request
# Before a timed-out job's worker is killed (on the manager thread, outside the engine's lock).
KILL_STACK_TIMEOUT = 0.5
_FATAL = b"Fatal Python error"
_MAX_DUMP = 256 * 1024  # bytes of a dump kept: a worker with thousands of threads
E = TypeVar("E", bound=BaseException)
_CONTROL = bytes(c for c in range(32) if c != ord("\n"))


# ------------------------------------------------------------------ parent side


class StackReader:
    """The parent's end of one worker's stack pipe.

    One dump at a time: :meth:`request` waits its turn (bounded) and takes
    the reader, :meth:`collect` gives it back. :meth:`close`, from the thread
    that reaps the worker, waits for nobody: a reader in use is closed by its
    holder when it is done.
    """

    __slots__ = ("_fd", "_guard", "_turn", "_busy", "_closing", "_ready", "_pid")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._guard = threading.Lock()  # over _busy, _closing and closing _fd; held for no wait
        self._turn = threading.Lock()  # held from request to collect
        self._busy = False
        self._closing = False
        self._ready = False  # the worker said its handlers are in place (ACK)
        self._pid = 0  # whom the request in progress asked

    @classmethod
    def open(cls, sock: socket.socket) -> StackReader:
        """A new pipe whose write end goes to the worker as a ``StackPipe``
        message on ``sock`` (before any job). Raises OSError (out of descriptors,
        a dead worker): nothing is left open then."""
        read_fd, write_fd = os.pipe()
        try:
            os.set_blocking(read_fd, False)
            send_frames(sock, [stack_pipe_frame(write_fd)])
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(read_fd)

    def request(self, pid: int, deadline: float) -> bool:
        """Ask process ``pid`` for a dump, once no other caller waits for one
        from it (until ``deadline``, ``time.monotonic()``). False if it cannot
        answer (its handlers are not in place yet, it is gone, the reader is
        closed, the turn did not come). True: call :meth:`collect` next."""
        if not self._turn.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        with self._guard:
            if self._closing:
                self._turn.release()
                return False
            self._busy = True
        try:
            self._drain()  # a late answer to an earlier request
            if not self._ready and not self._await_ack(deadline):
                return self._give_back(False)
            # The worker is not reaped (its reader is open), so its pid is its own.
            self._pid = pid
            os.kill(pid, DUMP_SIGNAL)
        except ProcessLookupError:  # gone already (its death is on its way to the manager)
            return self._give_back(False)
        except BaseException:
            self._give_back(False)
            raise
        return True

    def collect(self, deadline: float) -> str | None:
        """The dump asked by :meth:`request`, read until its end or ``deadline``
        (``time.monotonic()``); None if nothing came. Gives the reader back."""
        try:
            while True:
                data, complete = _read_until_end(self._fd, deadline)
                if not complete or _text(data) or time.monotonic() >= deadline:
                    break
                # END alone: the signal came while the worker was between the
                # end of its last dump and putting faulthandler back (see the
                # module docstring); Python's handler answered. Again, now.
                try:
                    os.kill(self._pid, DUMP_SIGNAL)
                except ProcessLookupError:
                    break
        finally:
            self._give_back(True)
        text = _text(data)
        if not text:
            return None
        return text if complete else text + "\n(incomplete: the worker stopped writing)"

    def dump(self, pid: int, timeout: float = STACKS_TIMEOUT) -> str:
        """Every thread's stack of worker ``pid``, or a sentence saying why not (bounded by ``timeout``)."""
        return collect_stacks([(pid, self)], timeout)[pid]

    def crash_dump(self) -> str | None:
        """What a dead worker's faulthandler wrote when a fatal signal hit it
        (SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL), or None. Waits only for a
        dump request in progress (bounded): the writer is gone."""
        if not self._turn.acquire(timeout=STACKS_TIMEOUT):
            return None
        with self._guard:
            if self._closing:
                self._turn.release()
                return None
            self._busy = True
        try:
            data = self._drain()
        finally:
            self._give_back(True)
        start = data.find(_FATAL)
        return None if start < 0 else _text(data[start:])

    def close(self) -> None:
        """Close the pipe now, or when its current reader is done (idempotent)."""
        with self._guard:
            self._closing = True
            if not self._busy and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _give_back(self, result: bool) -> bool:
        with self._guard:
            self._busy = False
            if self._closing and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self._turn.release()
        return result

    def _await_ack(self, deadline: float) -> bool:
        """Wait for the worker's ACK: a forked worker says Ready before it
        reads its StackPipe (then at once: it reads it before any job)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return False
            if self._drain() == b"" :  # end of file: the worker is gone
                return False
        return True

    def _drain(self) -> bytes:
        """Whatever the pipe holds now (the holder of the reader only)."""
        chunks = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        data = b"".join(chunks)
        if not self._ready and _ACK in data:
            self._ready = True
        return data


def _read_until_end(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Bytes from ``fd`` up to the END byte, or what came by ``deadline``."""
    poller = select.poll()  # not select(): the parent may hold more than FD_SETSIZE descriptors
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return b"".join(chunks), False
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not data:  # the worker died
            return b"".join(chunks), False
        end = data.find(_END)
        if end >= 0:
            chunks.append(data[:end])
            return b"".join(chunks), True
        if size < _MAX_DUMP:
            chunks.append(data)
            size += len(data)


def _text(data: bytes) -> str:
    # faulthandler writes printable ASCII and newlines: other bytes are END,
    # ACK, or the wakeup bytes of signals the job's own code handles.
    return data.translate(None, _CONTROL).decode("ascii", "replace").strip()


# ------------------------------------------------------- the errors that carry them


def with_worker_stack(error: E, worker: Any, job: Any, text: str | None) -> E:
    """``error``, for ``job`` that ``worker`` (a WorkerHandle) ran when it
    timed out, with ``text``, the worker's stacks taken then (see
    :func:`collect_stacks`), as a note: a printed traceback shows the line
    the job is on."""
    if text is not None:
        _add_note(error, f"Worker {worker.id} (pid {worker.pid}) was running job {job.id} when it timed out:\n{text}")
    return error


def with_crash_dump(error: E, worker: Any) -> E:
    """``error`` with the fatal-error dump of ``worker``, a dead WorkerHandle,
    as a note, if its faulthandler wrote one."""
    reader: StackReader | None = worker.stacks
    text = None if reader is None else reader.crash_dump()
    if text:
        _add_note(error, f"Worker {worker.id} (pid {worker.pid}) crashed here:\n{text}")
    return error


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(note)
    elif error.args:  # Python 3.10: no notes; the message carries it
        error.args = (f"{error.args[0]}\n{note}", *error.args[1:])


def collect_stacks(targets: list[tuple[int, StackReader]], timeout: float) -> dict[int, str]:
    """Every thread's stack of each worker, by pid: a dump, or a sentence saying
    why not. All are asked first, then read: one deadline for all of them."""
    deadline = time.monotonic() + timeout
    asked = [(pid, reader, reader.request(pid, deadline)) for pid, reader in targets]
    stacks = {}
    for pid, reader, requested in asked:
        text = reader.collect(deadline) if requested else None
        if text is None:
            why = f"did not answer within {timeout:g}s" if requested else "cannot take a dump request now"
            text = f"(no stack: the worker {why})"
        stacks[pid] = text
    return stacks
