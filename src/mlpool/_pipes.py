"""Who reads a worker's pipe, and how (part of the Manager).

A worker's pipe is read by the manager thread unless it is lent:
- to a caller thread, for one job, when the pool is idle (run_lent):
  the caller waits on the pipe itself, one thread hop fewer;
- to an event loop (loop.add_reader) while that loop's jobs keep the
  worker busy: results reach coroutines with no thread hop, and the
  manager thread, idle, does not compete with the loop for the GIL.
A borrower reads under worker.read_lock after checking it still is the
borrower. A caller thread's loan ends with its job. A loop keeps its loan
while the worker idles, so its next job costs no system call; anyone else
who needs the worker takes the pipe back, and so does the manager from a
dead worker or a loop that stopped running.

Pipes of idle workers are watched by nobody: a loan then costs no system
call, and a death is seen on the process sentinel. Reads never block
(``recv`` with ``MSG_DONTWAIT``): a reader woken for data another took just
finds nothing.
"""

from __future__ import annotations

import asyncio
import select
import selectors
from dataclasses import dataclass

from mlpool._jobs import Job, JobState
from mlpool._manager_parts import ManagerParts
from mlpool._state import PoolState
from mlpool._workers import WorkerHandle, WorkerState


@dataclass(frozen=True, slots=True)
class ProtocolBroken:
    """Not a message: what the reader hands the engine when a worker's bytes
    cannot be decoded. The worker is killed, its death blamed on it."""

    reason: str


class PipeReaders(ManagerParts):
    """The Manager's methods about reading worker pipes; they use its state
    (``_lock``, ``_workers``, ``_selector``...) and run under the rules
    written in ``_manager``."""

    def run_lent(self, job: Job) -> bool:
        """Run ``job`` on an idle worker, reading its pipe in this thread.

        False, with nothing done, when no worker is free or jobs are queued
        (then enqueue it). True when the job's future is settled, or the
        manager took the pipe back (a crash, a timeout) and will settle it.
        Every loan ends: from the moment this thread holds the pipe, whatever
        exception arrives (Ctrl-C) hands it back to the manager.
        """
        if job.batch_policy is not None:
            return False
        self.before_blocking()
        token = object()
        lent: list[WorkerHandle] = []  # the worker whose pipe this thread reads, once it does
        try:
            self._lock.acquire()
            try:
                sent = self._send_lent(job, token, lent)
            finally:
                self._release()
            if sent is not None:
                return sent
            self._poll_lent(lent[0], job, token)
            return True
        finally:
            if lent:
                self._close_loan(lent[0], token)

    def _send_lent(self, job: Job, token: object, lent: list[WorkerHandle]) -> bool | None:
        """Under the lock: lend an idle worker's pipe to this thread (noted in
        ``lent`` at once) and send it ``job``. None: wait for the result; False:
        not here (enqueue it); True: settled already (refused, or requeued)."""
        self._check_accepting()
        if self._scheduler or job.state is not JobState.NEW:
            return False
        group = self._scheduler.group_of(job.model)
        for worker in self._workers.values():
            if worker.state is WorkerState.IDLE and not worker.inflight and worker.group == group:
                break
        else:
            return False
        # The message first: if it cannot be built, nothing was recorded.
        try:
            frame, fds = self._run_frame(worker, [job])
        except Exception as exc:
            job.mark_running()
            self._refuse([job], exc)
            return True
        if worker.borrower is not None:
            self._take_back(worker, None)
        with worker.read_lock:
            worker.borrower = token
            lent.append(worker)
            worker.watchers.add(token)  # until it stops polling: no one closes the fds
            self._watch(worker)
        self._watch_deadline(job)
        job.mark_running()
        job.state = JobState.RUNNING
        job.worker = worker
        job.estimate = self._scheduler.estimate(job.fn_id)
        worker.inflight.append(job)
        worker.backlog += job.estimate
        self._send(worker, [(frame, fds, 1)])
        if job.state is not JobState.RUNNING:  # the pipe failed: requeued or refused
            self._end_loan(worker, token)
            return True
        return None

    def _close_loan(self, worker: WorkerHandle, token: object) -> None:
        """This thread stops reading ``worker``'s pipe: the manager reads it
        from now on, if the loan is still open (an interrupted wait)."""
        # Once the borrower is not this token it never is again: no lock to see it.
        if worker.borrower is token:
            self._lock.acquire()
            try:
                self._end_loan(worker, token)
            finally:
                self._release()
        with worker.read_lock:
            worker.watchers.discard(token)
            if not worker.watchers and worker.state is WorkerState.EXITED:
                worker.close()  # the manager reaped it while we polled

    def _poll_lent(self, worker: WorkerHandle, job: Job, token: object) -> None:
        poller = select.poll()
        poller.register(worker.fd, select.POLLIN)
        poller.register(worker.sentinel, select.POLLIN)
        while True:
            # No timeout: a job deadline kills the worker, which wakes this.
            events = poller.poll()
            with worker.read_lock:
                if worker.borrower is not token:
                    return  # the manager took the pipe back
                messages = self._read_locked(worker)
            died = worker.eof or any(fd == worker.sentinel for fd, _ in events)
            self._lock.acquire()
            try:
                for msg in messages:
                    self._on_message(worker, msg)
                if died or job not in worker.inflight:
                    self._end_loan(worker, token)
                    return
            finally:
                self._release()

    def _end_loan(self, worker: WorkerHandle, token: object) -> None:
        """Give the pipe back to the manager (under the lock)."""
        with worker.read_lock:
            if worker.borrower is token:
                worker.borrower = None
                self._watch(worker)
        if self._state is not PoolState.RUNNING:
            self._need_wake = True  # shutdown may wait for this worker
        self._dispatch()

    def _lend_to_loop(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``loop`` (running in this thread) read the worker's pipe (under the lock)."""
        with worker.read_lock:
            worker.borrower = loop
            self._watch(worker)
            if loop not in worker.watchers:
                loop.add_reader(worker.fd, self._on_loop_readable, worker, loop)
                worker.watchers.add(loop)

    def _on_loop_readable(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in ``loop``: read results, settle them here, keep the worker busy."""
        with worker.read_lock:
            if worker.borrower is not loop:
                self._remove_loop_reader(worker, loop)
                return
            messages = self._read_locked(worker)
            if worker.eof:  # it died: the manager settles its jobs (sentinel)
                self._remove_loop_reader(worker, loop)
        self._lock.acquire()
        try:
            for msg in messages:
                self._on_message(worker, msg)
            self._dispatch()
            if not worker.inflight and self._state is not PoolState.RUNNING:
                self._take_back(worker, loop)  # shutdown waits for this worker
        finally:
            self._release()

    def _take_back(self, worker: WorkerHandle, here: asyncio.AbstractEventLoop | None) -> None:
        """End an idle loan: the manager reads the pipe again (under the lock).

        A loop keeps its loan while idle, so its next job needs no system
        call; anyone else who needs the worker takes it back first. A loop's
        reader is removed now if that loop runs in this thread, else by the
        loop itself on its next wake-up (it sees it is no longer the borrower).
        """
        with worker.read_lock:
            loop = worker.borrower
            if loop is None:
                return
            worker.borrower = None
            if here is not None and loop is here:
                self._remove_loop_reader(worker, here)
            self._watch(worker)
        if self._state is not PoolState.RUNNING:
            self._need_wake = True

    def _remove_loop_reader(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop) -> None:
        """In ``loop``, holding worker.read_lock."""
        if loop in worker.watchers:
            loop.remove_reader(worker.fd)
            worker.watchers.discard(loop)
            if not worker.watchers and worker.state is WorkerState.EXITED:
                worker.close()

    def _drop_loop_reader(self, worker: WorkerHandle, loop: asyncio.AbstractEventLoop) -> None:
        """Scheduled in ``loop`` by _dispose."""
        with worker.read_lock:
            self._remove_loop_reader(worker, loop)

    def _reclaim_stopped_loans(self) -> bool:
        """Take pipes back from event loops that stopped running (under the lock).

        A stopped loop still has its reader registered; when it runs again,
        the reader sees it is no longer the borrower and removes itself.
        """
        reclaimed = False
        for worker in self._workers.values():
            loop = worker.borrower
            if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_running():
                with worker.read_lock:
                    if worker.borrower is loop:
                        worker.borrower = None
                        self._watch(worker)
                        reclaimed = True
        return reclaimed

    def _read(self, worker: WorkerHandle) -> list:
        """The manager's read of a worker pipe select() reported readable."""
        with worker.read_lock:
            if worker.borrower is not None:  # lent since select() returned
                self._watch(worker)
                return []
            return self._read_locked(worker)

    def _read_locked(self, worker: WorkerHandle) -> list:
        """Read what the pipe holds, without blocking (hold worker.read_lock)."""
        self._recv(worker)
        return self._messages(worker)

    def _messages(self, worker: WorkerHandle) -> list:
        """The messages read so far (hold worker.read_lock). Bytes that are no
        message (code in the worker wrote to its pipe) end the reading: the
        worker is killed for it (see ProtocolBroken)."""
        try:
            return worker.reader.messages()
        except Exception as exc:
            worker.eof = True
            self._watch(worker)
            return [ProtocolBroken(f"its pipe carried bytes that are no message: {exc!r}")]

    def _recv(self, worker: WorkerHandle) -> bool:
        """One non-blocking read into the worker's buffer; False if it got nothing."""
        if worker.eof:
            return False
        try:
            if worker.reader.recv_from(worker.sock):
                return True
        except BlockingIOError:  # another reader took it, or a spurious wake-up
            return False
        except OSError:
            pass
        worker.eof = True
        self._watch(worker)
        return False

    def _read_remaining(self, worker: WorkerHandle) -> list:
        """Take the pipe of a dead worker back and read what it wrote before dying."""
        with worker.read_lock:
            worker.borrower = None
            while self._recv(worker):  # stops at end of file, or when a grandchild holds it open
                pass
            worker.eof = True
            self._watch(worker)
            return self._messages(worker)

    def _watch(self, worker: WorkerHandle) -> None:
        """Have the manager's select() watch the pipe exactly when it expects a
        message there and nobody else reads it (hold worker.read_lock).

        An idle worker's pipe is not watched: lending it costs no system call,
        and its death is seen on the process sentinel.
        """
        wanted = (
            not worker.eof
            and worker.borrower is None
            and (worker.state is WorkerState.STARTING or bool(worker.inflight))
        )
        if worker.registered is wanted:
            return
        with self._selector_lock:
            if wanted:
                self._selector.register(worker.fd, selectors.EVENT_READ, ("read", worker))
            else:
                self._selector.unregister(worker.fd)
        worker.registered = wanted

    def _dispose(self, worker: WorkerHandle) -> None:
        """Close a reaped worker's pipe and sentinel, once nobody waits on them:
        closing an fd another thread polls lets the number be reused under it."""
        with worker.read_lock:
            loops = [w for w in worker.watchers if isinstance(w, asyncio.AbstractEventLoop)]
        for loop in loops:
            if loop.is_closed():  # its selector is gone, and our reader with it
                with worker.read_lock:
                    worker.watchers.discard(loop)
            elif loop.is_running():
                try:
                    loop.call_soon_threadsafe(self._drop_loop_reader, worker, loop)
                except RuntimeError:  # closed meanwhile
                    with worker.read_lock:
                        worker.watchers.discard(loop)
            else:
                # Stopped (maybe for good: an abandoned loop): nothing runs in
                # it to remove the reader, so it is removed from here.
                with worker.read_lock:
                    self._remove_loop_reader(worker, loop)
        with worker.read_lock:
            if not worker.watchers:  # else the last watcher to leave closes it
                worker.close()
