"""A shared pool under real faults: API processes SIGKILLed, the host SIGKILLed, races to start it.

Every wait is on a process handle, a FIFO or a job's answer, with a timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers import shared_models
from helpers.shared_processes import (
    ApiProcess,
    host_and_workers,
    wait_attached,
    wait_gone,
    workers_of,
)

from mlpool import MLPool
from mlpool._shared.rendezvous import address
from mlpool.errors import JobTimeoutError, ModelLoadError, PoolBrokenError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def name(share_name):
    return share_name


def _pool(name: str, nb_workers: int = 2) -> MLPool:
    return MLPool(shared_models.MODELS, nb_workers, share_across_processes=name)


def test_a_process_killed_while_it_floods_leaves_nothing_behind_and_nobody_notices(name, fifo, tmp_path):
    pool = _pool(name, nb_workers=1)
    procs = host_and_workers(pool.stats().process.host_pid)
    log = tmp_path / "tags.log"
    held = fifo()
    flooder = ApiProcess(name, nb_workers=1)
    try:
        assert flooder.ask("hold", fifo=str(held), n=1) == "held"
        held.wait_running()
        worker = held.pid
        assert flooder.ask("tag", log=str(log), tag="flood", n=30) == "queued"
        assert pool.stats().queue_depth == 30
        flooder.kill()
        wait_attached(pool, 1)  # the host saw it go (and dropped its queue) before we go on
        mine = pool.submit("m", shared_models.append_tag, str(log), "mine")
        held.release_opened()  # the dead process's running job finishes, its result discarded
        assert mine.result(30) == "mine"
        stats = pool.stats()
        assert stats.queue_depth == 0 and stats.process.processes == 1
        assert stats.worker_restarts == 0 and workers_of(stats.process.host_pid) == {worker}
        assert log.read_text().split().count("flood") <= 1  # dropped (one may have gone before us in turn)
        assert stats.jobs_cancelled >= 29
    finally:
        pool.shutdown()
    wait_gone(procs)


def test_an_interrupting_session_s_running_job_is_interrupted_when_its_process_dies(name, fifo):
    pool = _pool(name, nb_workers=1)
    procs = host_and_workers(pool.stats().process.host_pid)
    held = fifo()
    child = ApiProcess(name, nb_workers=1)
    try:
        child.ask("hold", fifo=str(held), n=1, interrupt=True)
        held.wait_running()
        victim = psutil.Process(held.pid)
        child.kill()
        victim.wait(30)  # killed by the host: nobody wants its result
        assert pool.score("m", shared_models.pid) != held.pid
        assert pool.stats().worker_restarts == 1
    finally:
        pool.shutdown()
    wait_gone(procs)


def test_every_api_process_killed_the_host_and_its_workers_end(name):
    children = [ApiProcess(name), ApiProcess(name)]
    host_pid = children[0].ask("info")["host_pid"]
    assert children[1].ask("info")["host_pid"] == host_pid
    procs = host_and_workers(host_pid)
    assert len(workers_of(host_pid)) == 2
    for child in children:
        child.kill()
    wait_gone(procs)  # grace, then shutdown: no orphan
    assert not Path(f"/proc/{host_pid}").exists() or psutil.Process(host_pid).status() == psutil.STATUS_ZOMBIE


def test_a_killed_host_fails_the_jobs_in_flight_and_the_next_call_starts_a_new_one(name, fifo):
    pool = _pool(name)
    other = ApiProcess(name)
    try:
        old = pool.stats().process.host_pid
        old_procs = host_and_workers(old)
        held = fifo()
        future = pool.submit("m", shared_models.wait_on, str(held))
        held.wait_running()
        os.kill(old, signal.SIGKILL)
        with pytest.raises(PoolBrokenError, match=rf"the pool host \(pid {old}\) died"):
            future.result(30)
        wait_gone(old_procs)  # its workers saw their parent go
        assert pool.score("m", shared_models.double, 2) == 4  # starts (or finds) a new host
        new = pool.stats().process.host_pid
        assert new != old
        assert other.ask("info")["host_pid"] == new  # the other process found it at its next call
        assert other.ask("pids", n=2)
        assert pool.stats().process.processes == 2
    finally:
        other.leave()
        new_procs = host_and_workers(pool.stats().process.host_pid)
        pool.shutdown()
    wait_gone(new_procs)


def test_processes_arriving_at_once_end_with_one_host(name, tmp_path):
    children = [ApiProcess(name) for _ in range(3)]
    try:
        hosts = {child.ask("info")["host_pid"] for child in children}
        assert len(hosts) == 1
        assert shared_models.loads(tmp_path) == 2  # one host, its two workers
        procs = host_and_workers(hosts.pop())
    finally:
        for child in children:
            child.leave()
    wait_gone(procs)


def test_a_flooding_process_does_not_starve_another(name, fifo, tmp_path):
    pool = _pool(name, nb_workers=1)
    procs = host_and_workers(pool.stats().process.host_pid)
    log = tmp_path / "tags.log"
    flooder = ApiProcess(name, nb_workers=1)
    try:
        held = fifo()
        first = pool.submit("m", shared_models.wait_on, str(held))
        held.wait_running()
        assert flooder.ask("tag", log=str(log), tag="flood", n=40) == "queued"
        mine = [pool.submit("m", shared_models.append_tag, str(log), "mine") for _ in range(3)]
        held.release_opened()
        first.result(30)
        assert [future.result(60) for future in mine] == ["mine"] * 3
        order = log.read_text().split()
        assert order.index("mine") <= 1 and len(order[: order.index("mine")]) <= 1
        last = max(i for i, tag in enumerate(order) if tag == "mine")
        assert last <= 6, order[:10]  # the two processes took turns; FIFO would put ours after 40
    finally:
        flooder.leave()
        pool.shutdown()
    wait_gone(procs)


def test_a_process_that_rejoins_within_the_grace_finds_the_same_host(monkeypatch, name):
    # A grace longer than any machine takes to start Python; the host is ended by SIGTERM after.
    first = ApiProcess(name, MLPOOL_SHARE_GRACE="120")
    host = first.ask("info")["host_pid"]
    procs = host_and_workers(host)
    first.leave()
    second = ApiProcess(name, MLPOOL_SHARE_GRACE="120")  # a recycled API worker coming back
    try:
        assert second.ask("info")["host_pid"] == host
    finally:
        second.leave()
        os.kill(host, signal.SIGTERM)
    wait_gone(procs)


def test_a_loader_that_fails_fails_the_constructor_and_leaves_no_host(name):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ModelLoadError, match="the model file is corrupt"):
        MLPool({"m": shared_models.load_fails}, 1, share_across_processes=name)
    left = [
        p for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
    ]  # fmt: skip
    wait_gone(left)  # the host exited once it had reported the error; its workers with it
    again = _pool(name)  # the name is free: a good pool starts under it
    procs = host_and_workers(again.stats().process.host_pid)
    assert again.score("m", shared_models.double, 2) == 4
    again.shutdown()
    wait_gone(procs)


def test_a_starter_killed_while_its_host_loads_leaves_that_host_to_the_next_process(name, fifo):
    gate = fifo()
    starter = ApiProcess(name, nb_workers=1, MLPOOL_TEST_GATE=str(gate))
    gate.wait_running()  # its host runs, its worker loads (and waits on the gate)
    host = psutil.Process(gate.pid).parent()
    starter.kill()
    attached: list[MLPool] = []
    errors: list[BaseException] = []

    def arrive() -> None:  # blocks on the lock the host still holds
        try:
            attached.append(MLPool({"m": shared_models.load_gated}, 1, share_across_processes=name))
        except BaseException as exc:
            errors.append(exc)

    os.environ["MLPOOL_TEST_GATE"] = str(gate)
    try:
        thread = threading.Thread(target=arrive)
        thread.start()
        gate.release_opened()
        thread.join(60)
    finally:
        del os.environ["MLPOOL_TEST_GATE"]
    assert not errors and attached, errors
    pool = attached[0]
    assert pool.stats().process.host_pid == host.pid  # the same host: no second one started
    procs = host_and_workers(host.pid)
    pool.shutdown()
    wait_gone(procs)


def test_a_stopped_host_ends_every_wait_that_has_a_timeout(name):
    pool = _pool(name, nb_workers=1)
    host = psutil.Process(pool.stats().process.host_pid)
    procs = host_and_workers(host.pid)
    host.suspend()
    try:
        with pytest.raises(JobTimeoutError, match="did not answer"):
            pool.options(timeout=0.5).score("m", shared_models.double, 1)
        pool.shutdown(wait=True, timeout=1.0)  # returns: nothing waits on the stopped host
    finally:
        host.resume()
    wait_gone(procs)


def test_a_forked_child_s_shutdown_leaves_its_parent_s_pool_alone(name, fifo):
    pool = _pool(name, nb_workers=1)
    procs = host_and_workers(pool.stats().process.host_pid)
    held = fifo()
    future = pool.submit("m", shared_models.wait_on, str(held))
    held.wait_running()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        pool.shutdown(cancel_pending=True)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    held.release_opened()
    assert future.result(30) > 0  # not cancelled by the child
    assert pool.score("m", shared_models.double, 2) == 4
    pool.shutdown()
    wait_gone(procs)


def test_a_new_host_loads_the_version_a_reload_put_in_place(name):
    pool = _pool(name)
    other = ApiProcess(name)
    try:
        assert other.ask("version") == 1
        pool.reload_models({"m": shared_models.load_v2})
        assert other.ask("version") == 2
        old = pool.stats().process.host_pid
        old_procs = host_and_workers(old)
        os.kill(old, signal.SIGKILL)
        wait_gone(old_procs)
        assert other.ask("version") == 2  # the other process starts the new host: with the new loader
        assert pool.score("m", shared_models.version) == 2
    finally:
        other.leave()
        procs = host_and_workers(pool.stats().process.host_pid)
        pool.shutdown()
    wait_gone(procs)


def test_stats_alone_reattach_after_the_host_died(name):
    pool = _pool(name, nb_workers=1)
    old = pool.stats().process.host_pid
    old_procs = host_and_workers(old)
    os.kill(old, signal.SIGKILL)
    wait_gone(old_procs)
    stats = pool.stats()  # the first call after the death may still see the old connection end
    stats = pool.stats() if stats.process.host_pid in (old, 0) else stats
    assert stats.process.host_pid not in (old, 0) and stats.state == "running" and stats.workers_alive == 1
    procs = host_and_workers(stats.process.host_pid)
    pool.shutdown()
    wait_gone(procs)


def test_garbage_on_the_socket_drops_only_that_connection(name):
    pool = _pool(name, nb_workers=1)
    procs = host_and_workers(pool.stats().process.host_pid)
    where = address(name, ["m"])
    for garbage in (b"\x00\x00\x00\x10" + b"x" * 16, b"\xff\xff\xff\xff" + b"y" * 1000):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(where.socket_path)
            sock.sendall(garbage)
            sock.settimeout(30)
            assert sock.recv(1) == b""  # the host closed it
    assert pool.score("m", shared_models.double, 3) == 6
    pool.shutdown()
    wait_gone(procs)


def test_the_key_of_true_names_the_program(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/srv/app_a.py"])
    first = address(True, ["m"])
    monkeypatch.setattr(sys, "argv", ["/srv/app_b.py"])
    assert address(True, ["m"]).socket_path != first.socket_path
    monkeypatch.setattr(sys, "argv", ["/srv/app_a.py", "--other-args"])
    assert address(True, ["m"]).socket_path == first.socket_path


def test_a_process_that_attaches_after_a_reload_starts_later_hosts_with_the_new_version(name):
    pool = _pool(name)
    try:
        pool.reload_models({"m": shared_models.load_v2})
        late = ApiProcess(name)  # attaches after the reload
        try:
            assert late.ask("version") == 2
            old = pool.stats().process.host_pid
            old_procs = host_and_workers(old)
            os.kill(old, signal.SIGKILL)
            wait_gone(old_procs)
            assert late.ask("version") == 2  # it starts the new host: with the version it never reloaded
        finally:
            late.leave()
    finally:
        procs = host_and_workers(pool.stats().process.host_pid)
        pool.shutdown()
    wait_gone(procs)


def test_a_ctrl_c_while_a_job_is_sent_leaks_nothing(name, monkeypatch):
    from mlpool._shared import submissions

    pool = MLPool(shared_models.MODELS, 1, share_across_processes=name, max_queue_size=1)
    procs = host_and_workers(pool.stats().process.host_pid)
    real_send = submissions.Submissions.send
    calls = {"n": 0}

    def interrupted(self, connection, job):
        calls["n"] += 1
        if calls["n"] <= 3:  # before the message is queued, then after it is
            if calls["n"] == 3:
                real_send(self, connection, job)
            raise KeyboardInterrupt
        real_send(self, connection, job)

    monkeypatch.setattr(submissions.Submissions, "send", interrupted)
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            pool.submit("m", shared_models.double, 1)
    assert pool.stats().process.jobs_in_flight == 0  # nothing counts against the share (1 + 1 slot)
    assert [pool.submit("m", shared_models.double, i).result(30) for i in range(4)] == [0, 2, 4, 6]
    pool.shutdown()
    wait_gone(procs)


def test_a_ctrl_c_that_loses_a_function_s_first_pickle_costs_nothing_but_its_job(name, monkeypatch):
    from mlpool._shared import connection as connections

    pool = _pool(name, nb_workers=1)
    procs = host_and_workers(pool.stats().process.host_pid)
    real_send = connections.Connection.send
    dropped = []

    def lossy(self, msg, fds=()):
        if msg[0] == 2 and msg[5] is not None and not dropped:  # a SUBMIT with a function's pickle
            dropped.append(msg[2])
            raise KeyboardInterrupt
        real_send(self, msg, fds)

    monkeypatch.setattr(connections.Connection, "send", lossy)
    with pytest.raises(KeyboardInterrupt):
        pool.score("m", shared_models.double, 1)
    assert pool.score("m", shared_models.double, 2) == 4  # the pickle goes again: the host has it
    host = pool.stats().process.host_pid
    assert host in {p.pid for p in procs}  # the same host: no connection was lost
    pool.shutdown()
    wait_gone(procs)
