"""pool.worker_stacks(), and the stacks that timeout and crash errors carry (#18)."""

from __future__ import annotations

import concurrent.futures
import os
import traceback

import pytest
from helpers import workloads
from helpers.pools import make_pool

from mlpool import JobTimeoutError, MLPool, WorkerCrashedError

pytestmark = pytest.mark.usefixtures("worker_mode")
WORKER_MODES = ("spawned", "forked")  # see conftest.worker_mode; Ray actors have no stack pipe


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool(models_to_load={"m": workloads.load_constant}, nb_workers=2) as pool:
        yield pool


def test_no_descriptor_left_after_workers_come_and_go(worker_mode):
    # First in the module: the module's pool, and its replacements of crashed workers, do not exist yet.
    with make_pool(models_to_load={"m": workloads.load_constant}, nb_workers=1):
        pass  # what lives as long as the process (multiprocessing's resource tracker)
    fds = len(os.listdir("/proc/self/fd"))
    with make_pool(models_to_load={"m": workloads.load_constant}, nb_workers=2) as pool:
        stacks = pool.worker_stacks()
        assert stacks and all("(most recent call first)" in text for text in stacks.values())
        with pytest.raises(WorkerCrashedError):
            pool.score("m", workloads.sigkill_self)
        after = pool.worker_stacks()
        assert all("(most recent call first)" in text for text in after.values()), after
    assert len(os.listdir("/proc/self/fd")) == fds


def _printed(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_worker_stacks_names_the_function_a_worker_runs(pool, fifo):
    gate = fifo()
    future = pool.submit("m", workloads.hang_on_fifo, str(gate))
    gate.wait_running()
    stacks = pool.worker_stacks()
    busy = stacks[gate.pid]
    assert "hang_on_fifo" in busy and "workloads.py" in busy
    for pid, text in stacks.items():
        if pid != gate.pid:  # an idle worker waits for its next job
            assert "hang_on_fifo" not in text and "in serve" in text
    gate.release_opened()
    assert future.result(timeout=30) == gate.pid  # the dump did not disturb the job


def test_worker_stacks_of_a_job_busy_in_python(pool, fifo, tmp_path):
    gate, marker = fifo(), tmp_path / "stop"
    future = pool.submit("m", workloads.busy_until, str(gate), str(marker))
    try:
        gate.path.read_text()  # the job opened its end and closed it: it runs, and spins now or next
        busy = [text for text in pool.worker_stacks().values() if "in busy_until" in text]
        assert len(busy) == 1, busy
    finally:
        marker.touch()
    assert future.result(timeout=30) >= 0


def test_worker_stacks_leaves_jobs_and_workers_as_they_were(pool):
    before = set(pool.worker_stacks())
    for _ in range(5):
        assert set(pool.worker_stacks()) == before
    assert [pool.score("m", workloads.add, i) for i in range(20)] == [10 + i for i in range(20)]
    assert pool.stats().worker_restarts == 0


def test_back_to_back_requests_each_get_a_dump(pool):
    # A request can land while the worker puts its dump handler back after the
    # last one: it must be answered all the same (28 of 200 were not, before).
    for _ in range(200):
        stacks = pool.worker_stacks()
        assert stacks and all("(most recent call first)" in text for text in stacks.values()), stacks


def test_worker_stacks_from_many_threads_at_once(pool):
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        results = list(executor.map(lambda _: pool.worker_stacks(), range(8)))
    pids = set(results[0])
    assert pids
    for stacks in results:  # each caller got every worker: a dump or a sentence saying why not
        assert set(stacks) == pids


def test_timed_out_job_shows_the_line_it_hung_on(pool, fifo):
    gate = fifo()
    job_id = pool.create_job(workloads.hang_on_fifo, "m", args=(str(gate),), timeout=0.5)
    with pytest.raises(JobTimeoutError) as caught:
        pool.get_result(job_id, timeout=30)
    line = _line_of("hang_on_fifo: waiting here")
    assert f'workloads.py", line {line} in hang_on_fifo' in _printed(caught.value)


def test_segfault_shows_the_faulting_python_frame(pool):
    with pytest.raises(WorkerCrashedError) as caught:
        pool.score("m", workloads.segfault)
    printed = _printed(caught.value)
    assert "Segmentation fault" in printed
    assert 'workloads.py", line ' in printed and "in segfault" in printed


def test_abort_shows_the_aborting_python_frame(pool):
    with pytest.raises(WorkerCrashedError) as caught:
        pool.score("m", workloads.abort)
    assert "Aborted" in _printed(caught.value) and "in abort" in _printed(caught.value)


def test_sigkilled_worker_carries_no_dump(pool):
    with pytest.raises(WorkerCrashedError) as caught:
        pool.score("m", workloads.sigkill_self)
    assert not getattr(caught.value, "__notes__", None)


def _line_of(marker: str) -> int:
    with open(workloads.__file__) as f:
        return next(i for i, text in enumerate(f, 1) if marker in text)


def test_inline_pool_has_no_worker_stacks():
    with MLPool(models_to_load={"m": workloads.load_constant}, nb_workers=0) as pool:
        assert pool.worker_stacks() == {}


def test_worker_stacks_rejects_a_bad_timeout(pool):
    with pytest.raises(ValueError, match="timeout"):
        pool.worker_stacks(timeout=0)
