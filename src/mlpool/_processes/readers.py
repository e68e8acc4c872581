"""Who reads a worker's pipe: the manager thread, a caller thread, or an event loop.

A worker's pipe is read by the manager thread unless it is lent:
- to a caller thread, for one job, when the pool is idle (``ProcessEngine.run_direct``):
  the caller waits on the pipe itself, one thread hop fewer;
- to an event loop (``loop.add_reader``) while that loop's jobs keep the
  worker busy: results reach coroutines with no thread hop, and the
  manager thread, idle, does not compete with the loop for the GIL.

:class:`PipeReaders` owns everything a loan changes: a worker's pipe
(``worker.pipe``, see ``_processes.pipes``: who reads it, who watches it,
what was read), and the manager's
selector (the manager thread's one wait, on pipes, deaths and wake-ups).
Every loan ends here, on every path:

- a caller thread's loan ends with its job (``end``), or when the manager
  takes the pipe back (a death), and the caller's ``leave`` always runs;
- a loop keeps its loan while the worker idles, so its next job costs no
  system call; anyone else who needs the worker takes it back
  (``take_back``), and so does the manager from a loop that stopped running
  (``reclaim_stopped``) or a worker that died (``read_remaining``).

A reader reads under the pipe's ``read_lock`` after checking it still is
its ``read_by``. Pipes of idle workers are watched by nobody: a loan then costs no
system call, and a death is seen on the process sentinel. Reads never block
(``recv`` with ``MSG_DONTWAIT``): a reader woken for data another took just
finds nothing. A descriptor is closed only once nobody waits on it
(``dispose``, ``leave``): closing an fd another thread polls would let its
number be reused under that thread.
"""

from __future__ import annotations

import asyncio
import select
import selectors
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mlpool._processes.workers import WorkerHandle, WorkerState

# Seconds between the manager's checks that the event loops reading busy
# workers' pipes still run (a loop that stops sends no event; see _manager_thread).
LOAN_CHECK = 0.25


OUT_OF_PATIENCE: tuple[list, bool] = ([], False)  # wait_lent's answer when its patience ran out


@dataclass(frozen=True, slots=True)
class ProtocolBroken:
    """Not a message: what a reader hands the engine when a worker's bytes
    cannot be decoded. The worker is killed, its death blamed on it."""

    reason: str


# Called in an event loop with the messages it read from a worker lent to it.
LoopMessages = Callable[[WorkerHandle, asyncio.AbstractEventLoop, list], None]


class PipeReaders:
    """The borrowers of worker pipes, and the manager's selector."""

    def __init__(self, on_loop_messages: LoopMessages) -> None:
        self._selector = selectors.DefaultSelector()
        self._selector_lock = threading.Lock()  # loans (un)register pipes from callers' threads
        self._on_loop_messages = on_loop_messages

    # ------------------------------------------------- the manager's selector

    def register(self, fd: int, data: tuple[str, Any]) -> None:
        """Have the manager's wait watch ``fd`` (a death handle, a template's pipe...)."""
        with self._selector_lock:
            self._selector.register(fd, selectors.EVENT_READ, data)

    def unregister(self, *fds: int) -> None:
        with self._selector_lock:
            for fd in fds:
                self._selector.unregister(fd)

    def select(self, timeout: float | None) -> list[tuple[str, Any]]:
        """The manager thread's wait: the data of each ready descriptor."""
        return [key.data for key, _ in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()

    # -------------------------------------------------- a caller thread's loan

    def lend_to_thread(self, worker: WorkerHandle, token: object) -> None:
        """Let the calling thread (``token``) read ``worker``'s pipe (under the engine's lock)."""
        if worker.pipe.read_by is not None:
            self.take_back(worker, None)
        with worker.pipe.read_lock:
            worker.pipe.read_by = token
            worker.pipe.watchers.add(token)  # until it stops polling: no one closes the fds
            self.watch(worker)

    def wait_lent(
        self, worker: WorkerHandle, token: object, patience: float | None = None
    ) -> tuple[list, bool] | None:
        """Wait for ``worker``'s pipe or its death, then read: (messages,
        died), or None if the manager took the pipe back meanwhile.

        No timeout (a job's deadline kills the worker, which wakes this),
        unless ``patience``: then, with nothing to read by then, ``OUT_OF_PATIENCE``."""
        poller = select.poll()
        poller.register(worker.pipe.fd, select.POLLIN)
        poller.register(worker.sentinel, select.POLLIN)
        if patience is None:
            events = poller.poll()
        elif not (events := poller.poll(max(1, int(patience * 1000)))):
            return OUT_OF_PATIENCE
        with worker.pipe.read_lock:
            if worker.pipe.read_by is not token:
                return None
            messages = self._read_locked(worker)
        return messages, worker.pipe.eof or worker.sentinel in dict(events)

    def end(self, worker: WorkerHandle, token: object) -> bool:
        """End ``token``'s loan, if it is still open (under the engine's lock): the manager reads the pipe again."""
        with worker.pipe.read_lock:
            if worker.pipe.read_by is not token:
                return False
            worker.pipe.read_by = None
            self.watch(worker)
        return True

    def leave(self, worker: WorkerHandle, token: object) -> None:
        """The thread ``token`` no longer waits on the pipe (outside the engine's
        lock, after ``end``): it closes a worker reaped while it polled."""
        with worker.pipe.read_lock:
            worker.pipe.watchers.discard(token)
            if not worker.pipe.watchers and worker.state is WorkerState.EXITED:
                worker.close()

    # -------------------------------------------------- an event loop's loan

    def lend_to_loop(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``loop`` (running in this thread) read the worker's pipe (under the engine's lock)."""
        with worker.pipe.read_lock:
            worker.pipe.read_by = loop
            self.watch(worker)
            if loop not in worker.pipe.watchers:
                loop.add_reader(worker.pipe.fd, self._on_loop_readable, worker, loop)
                worker.pipe.watchers.add(loop)

    def _on_loop_readable(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in ``loop``: read, and hand the messages to the engine."""
        with worker.pipe.read_lock:
            if worker.pipe.read_by is not loop:
                self._remove_loop_reader(worker, loop)
                return
            messages = self._read_locked(worker)
            if worker.pipe.eof:  # it died: the manager settles its jobs (sentinel)
                self._remove_loop_reader(worker, loop)
        self._on_loop_messages(worker, loop, messages)

    def take_back(self, worker: WorkerHandle, here: asyncio.AbstractEventLoop | None) -> bool:
        """End an idle loan (under the engine's lock); False if there was none.

        A loop's reader is removed now if that loop runs in this thread, else
        by the loop itself on its next wake-up (it sees it no longer borrows)."""
        with worker.pipe.read_lock:
            loop = worker.pipe.read_by
            if loop is None:
                return False
            worker.pipe.read_by = None
            if here is not None and loop is here:
                self._remove_loop_reader(worker, here)
            self.watch(worker)
        return True

    def reclaim_stopped(self, workers: Iterable[WorkerHandle], here: asyncio.AbstractEventLoop | None) -> bool:
        """Take pipes back from event loops that stopped running (under the
        engine's lock); ``here``: the loop running in this thread, if any. A
        stopped loop still has its reader; when it runs again, the reader
        sees it no longer borrows and removes itself."""
        reclaimed = False
        for worker in workers:
            loop = worker.pipe.read_by
            if loop is None or loop is here:  # the manager's, or a loop that runs: it is ours
                continue
            if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_running():
                with worker.pipe.read_lock:
                    if worker.pipe.read_by is loop:
                        worker.pipe.read_by = None
                        self.watch(worker)
                        reclaimed = True
        return reclaimed

    def _remove_loop_reader(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop) -> None:
        """In ``loop``, holding worker.pipe.read_lock."""
        if loop in worker.pipe.watchers:
            loop.remove_reader(worker.pipe.fd)
            worker.pipe.watchers.discard(loop)
            if not worker.pipe.watchers and worker.state is WorkerState.EXITED:
                worker.close()

    def _drop_loop_reader(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop) -> None:
        """Scheduled in ``loop`` by ``dispose``."""
        with worker.pipe.read_lock:
            self._remove_loop_reader(worker, loop)

    # ------------------------------------------------------------ reading

    def read(self, worker: WorkerHandle) -> list:
        """The manager's read of a pipe its select() reported readable."""
        with worker.pipe.read_lock:
            if worker.pipe.read_by is not None:  # lent since select() returned
                self.watch(worker)
                return []
            return self._read_locked(worker)

    def read_remaining(self, worker: WorkerHandle) -> list:
        """Take the pipe of a dead worker back and read what it wrote before dying."""
        with worker.pipe.read_lock:
            worker.pipe.read_by = None
            while self._recv(worker):  # stops at end of file, or when a grandchild holds it open
                pass
            worker.pipe.eof = True
            self.watch(worker)
            return self._messages(worker)

    def _read_locked(self, worker: WorkerHandle) -> list:
        """Read what the pipe holds, without blocking (hold worker.pipe.read_lock)."""
        self._recv(worker)
        return self._messages(worker)

    def _messages(self, worker: WorkerHandle) -> list:
        """The messages read so far (hold worker.pipe.read_lock). Bytes that are no
        message (code in the worker wrote to its pipe) end the reading: the
        worker is killed for it (see ProtocolBroken)."""
        try:
            return worker.pipe.frames.messages()
        except Exception as exc:
            worker.pipe.eof = True
            self.watch(worker)
            return [ProtocolBroken(f"its pipe carried bytes that are no message: {exc!r}")]

    def _recv(self, worker: WorkerHandle) -> bool:
        """One non-blocking read into the worker's buffer; False if it got nothing."""
        if worker.pipe.eof:
            return False
        try:
            if worker.pipe.frames.recv_from(worker.pipe.sock):
                return True
        except BlockingIOError:  # another reader took it, or a spurious wake-up
            return False
        except OSError:
            pass
        worker.pipe.eof = True
        self.watch(worker)
        return False

    def watch(self, worker: WorkerHandle) -> None:
        """Have the manager's select() watch the pipe exactly when it expects a
        message there and nobody else reads it (hold worker.pipe.read_lock).

        An idle worker's pipe is not watched: lending it costs no system call,
        and its death is seen on the process sentinel.
        """
        wanted = (
            not worker.pipe.eof
            and worker.pipe.read_by is None
            and (worker.state is WorkerState.STARTING or bool(worker.inflight))
        )
        if worker.pipe.registered is wanted:
            return
        with self._selector_lock:
            try:
                if wanted:
                    self._selector.register(worker.pipe.fd, selectors.EVENT_READ, ("read", worker))
                else:
                    self._selector.unregister(worker.pipe.fd)
            except KeyError:  # already so: a change interrupted (Ctrl-C) before the flag below
                pass
            except FileExistsError:  # the kernel's set has it and the map not: an unregister cut half-way
                poller = getattr(self._selector, "_selector", None)  # the epoll object (Linux)
                if poller is None:
                    raise
                poller.unregister(worker.pipe.fd)
                self._selector.register(worker.pipe.fd, selectors.EVENT_READ, ("read", worker))
        worker.pipe.registered = wanted

    def watch_now(self, worker: WorkerHandle) -> None:
        """``watch``, taking the worker's read lock (under the engine's lock)."""
        with worker.pipe.read_lock:
            self.watch(worker)

    # ------------------------------------------------------------ the end

    def dispose(self, worker: WorkerHandle) -> None:
        """Close a reaped worker's pipe and death handle, once nobody waits on them."""
        with worker.pipe.read_lock:
            loops = [w for w in worker.pipe.watchers if isinstance(w, asyncio.AbstractEventLoop)]
        for loop in loops:
            if loop.is_closed():  # its selector is gone, and our reader with it
                with worker.pipe.read_lock:
                    worker.pipe.watchers.discard(loop)
            elif loop.is_running():
                try:
                    loop.call_soon_threadsafe(self._drop_loop_reader, worker, loop)
                except RuntimeError:  # closed meanwhile
                    with worker.pipe.read_lock:
                        worker.pipe.watchers.discard(loop)
            else:
                # Stopped (maybe for good: an abandoned loop): nothing runs in
                # it to remove the reader, so it is removed from here.
                with worker.pipe.read_lock:
                    self._remove_loop_reader(worker, loop)
        with worker.pipe.read_lock:
            if not worker.pipe.watchers:  # else the last watcher to leave closes it
                worker.close()
