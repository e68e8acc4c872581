"""share_models: a forked worker's death is seen whatever it started, the pool
never adopts (nor leaves as zombies) the app's own subprocesses, and loaders
that leave threads running are refused with a clear error."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from helpers.workloads import load_constant

from mlpool import MLPool, ModelLoadError, WorkerCrashedError

pytestmark = [
    pytest.mark.usefixtures("no_leaked_workers"),
    pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfd (Linux)"),
]


def start_helper(model: dict, how: str) -> int:
    """Start a long-lived helper process and return its pid (the test kills it)."""
    if how == "popen":
        return subprocess.Popen(["sleep", "60"]).pid
    pid = os.fork()  # a plain fork keeps every descriptor of the worker open
    if pid == 0:
        signal.alarm(60)  # its own bound, should the test fail to kill it
        signal.pause()
        os._exit(0)
    return pid


def exit_now(model: dict, code: int) -> None:
    os._exit(code)


def wait_gone(pid: int, timeout: float) -> None:
    """Wait (on its pidfd) until process ``pid`` exited."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([handle], [], [], timeout)[0], f"process {pid} still runs after {timeout}s"
    finally:
        os.close(handle)


def kill_helper(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_gone(pid, 10)
    try:
        os.waitpid(pid, 0)  # ours only if we adopted it (the defect of #13.18)
    except ChildProcessError:
        pass


@pytest.mark.parametrize("how", ["popen", "fork"])
def test_a_forked_worker_death_is_seen_while_a_process_it_started_lives(how):
    with MLPool({"m": load_constant}, nb_workers=1, share_models=True) as pool:
        helper = pool.score("m", start_helper, how)
        try:
            started = time.monotonic()
            with pytest.raises(WorkerCrashedError, match="exited with code 3|exit status unknown"):
                pool.submit("m", exit_now, 3).result(timeout=20)
            assert time.monotonic() - started < 10
            assert psutil.pid_exists(helper)  # seen while the helper lives, not when it dies
            assert pool.score("m", lambda model: 1) == 1  # replaced
        finally:
            kill_helper(helper)


def zombie_children() -> set[int]:
    zombies = set()
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies


@pytest.fixture
def no_new_zombies():
    """Zombie children of this process that the test made (others' are not its business)."""
    before = zombie_children()
    return lambda: zombie_children() - before


def background_sleeps(count: int) -> None:
    """The app's own orphans: ``sh -c "sleep 0.2 &"``, waited for by pid."""
    pids = []
    for _ in range(count):
        out = subprocess.run(["sh", "-c", "sleep 0.2 & echo $!"], capture_output=True, text=True, check=True)
        pids.append(int(out.stdout))
    for pid in pids:
        wait_gone(pid, 10)


def subreaper_flag() -> int:
    flag = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    return flag.value


@pytest.mark.parametrize("nb_workers", [1, 0])
def test_the_apps_orphans_never_become_the_pools_zombies(nb_workers, no_new_zombies):
    """Inline pools (nb_workers=0) with share_models too (they used to undo an
    adoption they never made)."""
    assert subreaper_flag() == 0
    with MLPool({"m": load_constant}, nb_workers=nb_workers, share_models=True) as pool:
        assert pool.score("m", lambda model: 1) == 1
        background_sleeps(3)
        assert no_new_zombies() == set()
        assert subreaper_flag() == 0  # nothing is adopted, so nothing needs reaping
    assert subreaper_flag() == 0
    background_sleeps(2)
    assert no_new_zombies() == set()


def test_a_dead_templates_workers_serve_on_and_their_deaths_are_seen(no_new_zombies):
    """Without adoption, workers of a killed template are nobody's children
    here: their deaths are still seen (pidfd), the pool replaces them."""
    with MLPool({"m": load_constant}, nb_workers=1, share_models=True, max_retries=1) as pool:
        template = pool.score("m", lambda model: os.getppid())
        os.kill(template, signal.SIGKILL)
        worker = pool.score("m", lambda model: os.getpid())  # still served by the orphaned worker
        with pytest.raises(WorkerCrashedError):
            pool.submit("m", exit_now, 3).result(timeout=30)
        assert pool.score("m", lambda model: os.getpid()) != worker
        assert no_new_zombies() == set()


def load_with_thread_pool() -> dict:
    executor = ThreadPoolExecutor(2, thread_name_prefix="loader-pool")
    executor.submit(sum, [1, 2]).result()  # its threads now wait for more work
    return {"executor": executor}


def test_a_loader_that_leaves_threads_running_is_refused_naming_them():
    with pytest.raises(ModelLoadError) as caught:
        MLPool({"m": load_with_thread_pool}, nb_workers=1, share_models=True, start_timeout=60)
    message = str(caught.value)
    assert "'loader-pool_0'" in message and "concurrent.futures.thread._worker" in message
    assert f"{__file__}:" in message  # the line that started it
    assert "share_models=False" in message and "fork_with_threads=True" in message
    assert "model 'm'" in message


def test_spawned_workers_take_a_loader_that_leaves_threads_running():
    with MLPool({"m": load_with_thread_pool}, nb_workers=1) as pool:
        assert pool.score("m", lambda model: model["executor"].submit(sum, [1, 2]).result()) == 3
