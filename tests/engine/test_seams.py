"""Where the engine's parts meet callers: interrupts, signal handlers, loans and
deadlines, arguments the caller changes afterwards (found by an outside review)."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers.workloads import add, add_then_say, array_summary, load_constant, raise_value_error, wait_for_release

from mlpool import JobTimeoutError, MLPool

TESTS = Path(__file__).resolve().parent.parent
SRC = TESTS.parent / "src"


def run_script(code: str, timeout: float = 90) -> str:
    env = {"PYTHONPATH": f"{SRC}:{TESTS}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


STORM = """
    import os, random, signal, threading, time
    from helpers.workloads import add, load_constant
    from mlpool import MLPool

    if __name__ == "__main__":
        # Ctrl-C raises KeyboardInterrupt even if this script inherited SIGINT ignored
        # (a background job of a shell without job control, as some CI runners start the tests).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        random.seed(SEED)
        pool = MLPool({"m": load_constant}, nb_workers=2, share_models=SHARE)
        stop = threading.Event()

        def pelt():
            while not stop.wait(random.uniform(0.001, 0.02)):
                os.kill(os.getpid(), signal.SIGINT)

        futures, interrupts, others = [], 0, []
        pelter = threading.Thread(target=pelt, daemon=True)
        pelter.start()
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                futures += [(i, pool.submit("m", add, i)) for i in range(10)]
                pool.score("m", add, 1)
            except KeyboardInterrupt:
                interrupts += 1
            except Exception as exc:
                others.append(repr(exc))
        stop.set()
        while True:  # the last signals may still come
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                break
            except KeyboardInterrupt:
                pass
        pelter.join()
        results = [(i, future.result(timeout=10)) for i, future in futures]
        after = [pool.submit("m", add, i).result(timeout=10) for i in range(4)]
        print(interrupts, len(futures), sum(r != i + 10 for i, r in results), others, after, pool.healthy)
        pool.shutdown(timeout=5)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("share", [False, True], ids=["spawned", "forked"])
def test_a_storm_of_ctrl_c_in_the_caller_leaves_the_pool_serving_and_every_job_answered(share):
    out = run_script(STORM.replace("SEED", "1").replace("SHARE", str(share)))
    interrupts, jobs, wrong, others, after, healthy = out.strip().split(" ", 5)[:5] + [out.strip().rsplit(" ", 1)[1]]
    assert int(interrupts) > 10 and int(jobs) > 100  # the storm hit
    assert int(wrong) == 0 and healthy == "True", out
    assert "[10, 11, 12, 13]" in out and "[]" in out, out  # no other exception reached the caller


def test_a_sigterm_handler_may_shut_the_pool_down_while_the_main_thread_is_inside_it():
    out = run_script(
        """
        import os, signal, threading
        from concurrent.futures import CancelledError
        from helpers.workloads import add, load_constant
        from mlpool import MLPool, PoolClosedError

        if __name__ == "__main__":
            pool = MLPool({"m": load_constant}, nb_workers=2)
            signal.signal(signal.SIGTERM, lambda signum, frame: pool.shutdown(wait=False))
            done = 0
            for delay in (0.2, 0.3):
                pass
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
            try:
                while True:
                    for future in [pool.submit("m", add, i) for i in range(20)]:
                        future.result(timeout=30)
                    done += 20
            except (PoolClosedError, CancelledError) as exc:
                print("stopped", done > 0, type(exc).__name__)
            pool.shutdown()
            print("closed", pool.healthy)
        """,
        timeout=60,
    )
    assert "stopped True" in out and "closed False" in out, out


@pytest.mark.timeout(60)
def test_a_result_waiting_on_a_blocked_loops_pipe_beats_the_jobs_deadline(fifo):
    said = fifo()

    async def main(pool: MLPool) -> int:
        job_id = await pool.create_job_async(add_then_say, "m", args=(1, str(said)))
        # The handler blocks its loop (a sync call) until the job has run and
        # answered into the loop's pipe, then (CPU work) past the job's deadline.
        said.path.read_text()  # the fault: a blocked loop
        time.sleep(1.0)  # noqa: ASYNC251  (the fault: a blocked loop, not synchronisation)
        return await pool.get_result_async(job_id)

    with MLPool({"m": load_constant}, nb_workers=1, job_timeout=0.5) as pool:
        pool.score("m", add, 0)  # started and warm: the job takes about a millisecond
        assert asyncio.run(main(pool)) == 11
        assert pool.stats().jobs_timed_out == 0 and pool.stats().worker_restarts == 0


@pytest.mark.timeout(60)
def test_a_thread_waiting_on_a_job_id_gets_it_when_the_loop_that_made_it_stops(fifo):
    gate = fifo()
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        box: list = []
        waiting = threading.Event()

        def fetch(job_id: str) -> None:
            waiting.set()
            box.append(pool.get_result(job_id, timeout=30))

        async def main() -> threading.Thread:
            job_id = await pool.create_job_async(wait_for_release, "m", args=(str(gate),))
            thread = threading.Thread(target=fetch, args=(job_id,), daemon=True)
            thread.start()
            await asyncio.to_thread(waiting.wait, 10)
            return thread  # the loop stops while the thread waits

        thread = asyncio.run(main())
        gate.release()
        thread.join(30)
        assert len(box) == 1 and isinstance(box[0], int)  # the worker's pid: the job's result


@pytest.mark.timeout(60)
def test_an_array_argument_is_what_it_was_when_the_job_was_made(fifo):
    numpy = pytest.importorskip("numpy")
    gate = fifo()
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        busy = pool.submit("m", wait_for_release, str(gate))
        array = numpy.full(4_000_000, 7, dtype=numpy.uint8)  # in shared memory (over the threshold)
        queued = pool.submit("m", array_summary, array)
        array[:] = 0  # the caller reuses its buffer while the job waits
        gate.release()
        busy.result(timeout=30)
        assert queued.result(timeout=30)[0] == 7 * 4_000_000


@pytest.mark.timeout(60)
def test_a_failed_job_ids_error_fetched_later_is_not_logged_as_never_retrieved(caplog):
    async def main(pool: MLPool) -> None:
        job_id = await pool.create_job_async(raise_value_error, "m", args=("boom",))
        await pool.score_async("m", add, 1)  # one worker, in order: the failed job has finished
        with pytest.raises(ValueError, match="boom"):
            await pool.get_result_async(job_id)

    with MLPool({"m": load_constant}, nb_workers=1) as pool, caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main(pool))
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.parametrize("timeout", [float("nan"), -1.0])
def test_a_wait_bound_that_is_no_duration_is_refused(timeout):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        job_id = pool.create_job(add, "m", args=(1,))
        with pytest.raises(ValueError, match="timeout"):
            pool.get_result(job_id, timeout=timeout)
        assert pool.get_result(job_id) == 11


def test_a_job_timeout_still_replaces_a_worker_that_did_not_answer(fifo):
    gate = fifo()
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        with pytest.raises(JobTimeoutError):
            pool.options(timeout=0.5).submit("m", wait_for_release, str(gate)).result(timeout=30)
        assert pool.score("m", add, 1) == 11


def count_up(model: dict):
    n = 0
    while True:
        yield n
        n += 1


@pytest.mark.timeout(60)
def test_an_inline_stream_lets_the_loops_other_tasks_run_between_items():
    async def main(pool: MLPool) -> int:
        other = asyncio.Event()

        async def other_task() -> None:
            other.set()

        task = asyncio.ensure_future(other_task())
        taken = 0
        async with pool.stream_async("m", count_up) as items:
            async for _ in items:
                taken += 1
                if other.is_set() or taken == 10_000:
                    break
        await task
        return taken

    with MLPool({"m": load_constant}, nb_workers=0) as pool:
        assert asyncio.run(main(pool)) < 10_000  # the other task ran while the stream went on


@pytest.mark.parametrize("timeout", [float("inf"), 1e12, float("nan"), 0])
def test_worker_stacks_refuses_a_wait_it_cannot_make(timeout):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        with pytest.raises(ValueError, match="timeout"):
            pool.worker_stacks(timeout=timeout)
        assert list(pool.worker_stacks()) and pool.score("m", add, 1) == 11
