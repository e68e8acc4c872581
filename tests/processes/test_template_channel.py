"""The parent's handle on a model template, without the engine: nothing it
does waits for the template (a stopped template cannot block the manager)."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import socket
import threading
import time

import cloudpickle
import pytest
from helpers.structure import child_side, mlpool_imports
from helpers.workloads import load_constant, load_raises
from test_template_processes import load_with_thread_pool

from mlpool._processes import template as _template
from mlpool._processes.groups import pack_loaders
from mlpool._processes.template import Template, TemplateClosed, WorkerForked
from mlpool._wire.protocol import LoadFailed, Ready
from mlpool._wire.template_protocol import Reaped, TemplateReady
from mlpool._wire.transport import FrameReader
from mlpool._worker.main import WorkerSettings

pytestmark = [
    pytest.mark.usefixtures("no_leaked_workers"),
    pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfd (Linux)"),
]

SETTINGS = WorkerSettings(
    parent_pid=os.getpid(), threads=1, memory_limit=None, nice=0, shm_threshold=65536, shm_limit=None,
    private_memory=True,
)  # fmt: skip


def start(loader=load_constant, **options) -> Template:
    context = multiprocessing.get_context("spawn")
    return Template(context, pack_loaders({"m": cloudpickle.dumps(loader)}), SETTINGS, **options)


def next_events(template: Template, timeout: float = 60.0) -> list:
    """Wait for the template's channel to be readable; what receive() gives then."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the template sent nothing"
        if select.select([template.fd], [], [], remaining)[0]:
            events = template.receive()
            if events:
                return events


def wait_readable(fd: int, timeout: float = 30.0) -> None:
    assert select.select([fd], [], [], timeout)[0], f"fd {fd} not readable within {timeout}s"


def finish(template: Template) -> int | None:
    template.close()
    wait_readable(template.sentinel)
    return template.reap()


def test_requests_return_at_once_while_the_template_is_stopped():
    template = start()
    try:
        assert [type(e) for e in next_events(template)] == [TemplateReady]
        os.kill(template.pid, signal.SIGSTOP)
        parent_sock, child_sock = socket.socketpair()
        began = time.monotonic()
        asking = threading.Thread(target=template.request_fork, args=(7, child_sock), daemon=True)
        asking.start()
        asking.join(30)  # a request that waited for the answer would wait until SIGCONT
        assert not asking.is_alive(), "request_fork waited for a stopped template"
        child_sock.close()
        assert template.receive() == []  # returned with no answer: the template is still stopped
        assert template.pending_since() is not None and template.pending_since() >= began
        os.kill(template.pid, signal.SIGCONT)  # the answer comes as an event
        (forked,) = next_events(template)
        assert type(forked) is WorkerForked and forked.worker_id == 7
        assert template.pending_since() is None
        process = forked.process
        reader = FrameReader()
        wait_readable(parent_sock.fileno())
        reader.recv_from(parent_sock)
        assert reader.messages() == [Ready(process.pid, 0.0)]
        process.kill()
        wait_readable(process.sentinel)  # the worker's pidfd
        (reaped,) = next_events(template)
        assert reaped == Reaped(process.pid, -signal.SIGKILL) and process.exitcode == -signal.SIGKILL
        process.close()
        parent_sock.close()
        reader.close()
    finally:
        assert finish(template) == 0


def test_a_stopped_template_is_killed_and_reaped_without_waiting(monkeypatch):
    monkeypatch.setattr(_template, "_REAP_WAIT", 120.0)  # reap's bound, far past the bound below
    template = start()
    assert [type(e) for e in next_events(template)] == [TemplateReady]
    os.kill(template.pid, signal.SIGSTOP)
    template.close()  # returns at once; a stopped template cannot exit at end of file
    template.kill()
    wait_readable(template.sentinel)
    began = time.monotonic()
    assert template.reap() == -signal.SIGKILL
    assert time.monotonic() - began < 60  # not reap's bound: it did not wait for a stopped process


def test_a_template_that_exits_ends_its_channel_with_an_event():
    template = start()
    assert [type(e) for e in next_events(template)] == [TemplateReady]
    template.kill()
    assert [type(e) for e in next_events(template)] == [TemplateClosed]
    assert template.gone and template.pending_since() is None
    wait_readable(template.sentinel)
    assert template.reap() == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_a_load_failure_read_after_the_template_exited_is_not_lost():
    """The template exits without reading what the parent sent it (the
    SpawnSentinel): the kernel then reports ECONNRESET on the parent's end
    before the packets queued there. The LoadFailed must still be read."""
    for _ in range(3):
        template = start(load_raises)
        wait_readable(template.sentinel)  # it sent LoadFailed and exited; nothing was read yet
        events = template.receive()
        assert [type(event) for event in events] == [LoadFailed, TemplateClosed], events
        assert template.load_failure is not None and "weights file is corrupt" in template.load_failure.error
        template.reap()


@pytest.mark.parametrize("fork_with_threads", [False, True])
def test_threads_left_by_loaders_are_refused_unless_declared_fork_safe(fork_with_threads):
    template = start(load_with_thread_pool, fork_with_threads=fork_with_threads)
    try:
        (event,) = next_events(template)
        if fork_with_threads:
            assert type(event) is TemplateReady
        else:
            assert type(event) is LoadFailed and event.model == "m"
            assert "'loader-pool_0'" in event.error and "load_with_thread_pool" in event.traceback
    finally:
        finish(template)


@pytest.mark.parametrize("module", ["_worker.template_main", "_wire.shm", "_worker.main", "_worker.ray_actor"])
def test_the_child_side_imports_no_parent_side_module(module):
    assert sorted(name for name in mlpool_imports(module) if not child_side(name)) == []
