"""A real spawned worker driven over its socket, without the engine: the
started word, and the cost of the memory check."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
from collections import deque
from typing import Any

import pytest
from helpers import worker_probe

from mlpool._processes.groups import pack_loaders
from mlpool._wire.protocol import Done, Exiting, Ready, Stop, encode, encode_run, encode_run_batch, setup_frame
from mlpool._wire.serialization import dumps_by_value
from mlpool._wire.started import LastStarted
from mlpool._wire.transport import FrameReader, send_frames
from mlpool._worker.main import WorkerSettings, worker_main

pytestmark = [
    pytest.mark.usefixtures("no_leaked_workers"),
    pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the started word needs memfd (Linux)"),
]


class DirectWorker:
    """One spawned worker and the parent's end of its socket."""

    def __init__(self, loaders: dict, *, setup: bool = True, **settings: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe(duplex=True)
        self.sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self.sock.settimeout(60)
        self.reader = FrameReader()
        self._messages: deque = deque()
        self.word = LastStarted()
        if setup:  # as the engine does: written before the worker starts, waiting in the socket
            fd, self.word = LastStarted.create()
            send_frames(self.sock, [setup_frame(fd)])
            os.close(fd)
        options = {"parent_pid": os.getpid(), "threads": 1, "memory_limit": None, "nice": 0, "shm_threshold": None,
                   "shm_limit": None}  # fmt: skip
        options.update(settings)
        pickled = pack_loaders({name: dumps_by_value(fn, name) for name, fn in loaders.items()})
        self.process = context.Process(target=worker_main, args=(child, 0, pickled, WorkerSettings(**options)))
        self.process.start()
        child.close()
        assert type(self.receive()) is Ready

    def receive(self) -> Any:
        """The next message from the worker (blocking, bounded by the socket's timeout)."""
        while not self._messages:
            assert self.reader.recv_from(self.sock, 0), "the worker closed its socket"
            self._messages.extend(self.reader.messages())
        return self._messages.popleft()

    def run(self, job_id: int, fn: Any, *args: Any, fn_id: int = 1) -> None:
        payload = pickle.dumps((args, {}))
        send_frames(self.sock, [(encode_run(job_id, fn_id, "m", dumps_by_value(fn, "fn"), payload), [])])

    def stop(self) -> None:
        send_frames(self.sock, [(encode(Stop()), [])])
        assert type(self.receive()) is Exiting
        self.process.join(30)
        assert self.process.exitcode == 0
        self.word.close()
        self.reader.close()
        self.sock.close()
        self._conn.close()


def test_the_worker_notes_each_job_it_begins_in_the_started_word(fifo):
    worker = DirectWorker({"m": worker_probe.load_empty})
    try:
        assert worker.word.read() == 0  # loaded, nothing begun
        gate = fifo()
        worker.run(41, worker_probe.block_on, str(gate))
        gate.wait_running()
        assert worker.word.read() == 41  # begun, not finished
        gate.release_opened()
        assert worker.receive().job_id == 41
        worker.run(42, worker_probe.pid, fn_id=2)
        assert worker.receive().job_id == 42 and worker.word.read() == 42
        batch = encode_run_batch((50, 51, 52), 3, "m", dumps_by_value(checksum, "fn"), (pickle.dumps(((1,), {})),) * 3)
        send_frames(worker.sock, [(batch, [])])
        assert [worker.receive().job_id for _ in range(3)] == [50, 51, 52]
        assert worker.word.read() == 50  # a batch: its first job
    finally:
        worker.stop()


def checksum(model: dict, items: list) -> list:
    return [item + 1 for item in items]


def test_a_worker_without_a_setup_message_still_serves():
    worker = DirectWorker({"m": worker_probe.load_empty}, setup=False)
    try:
        worker.run(1, worker_probe.pid)
        done = worker.receive()
        assert type(done) is Done and pickle.loads(done.result) == worker.process.pid
    finally:
        worker.stop()


def _read_calls(worker: DirectWorker) -> int:
    """The read system calls the worker's process made so far (``syscr``)."""
    with open(f"/proc/{worker.process.pid}/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("syscr:"))


def _round_trips(worker: DirectWorker, jobs: int) -> None:
    for job_id in range(1, jobs + 1):
        worker.run(job_id, worker_probe.pid)
        assert worker.receive().job_id == job_id


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads in /proc/<pid>/io")
def test_the_private_memory_check_reads_memory_after_few_quick_jobs():
    # One reading of smaps_rollup takes milliseconds in a process that imported
    # torch; it used to run after every job, before the result. Quick jobs are
    # now followed by a reading at most once per 100 times its cost: counted in
    # the read calls the checked worker makes beyond a plain one's, for the same
    # 300 jobs (a reading is two or more: a reading per job, 600 or more).
    checked = DirectWorker({"m": worker_probe.load_empty}, memory_limit=2**40, private_memory=True)
    plain = DirectWorker({"m": worker_probe.load_empty})
    try:
        _round_trips(checked, 20)  # warm up: the first reading always happens
        _round_trips(plain, 20)
        before = _read_calls(checked), _read_calls(plain)
        _round_trips(checked, 300)
        _round_trips(plain, 300)
        extra = (_read_calls(checked) - before[0]) - (_read_calls(plain) - before[1])
        assert extra < 300, f"{extra} more read calls than a worker without the check, in 300 jobs"
    finally:
        checked.stop()
        plain.stop()
