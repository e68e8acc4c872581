"""Start, shutdown and what is left behind; an idle pool costs nothing; the loop stays free."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import worker_children
from helpers import workloads
from helpers.pools import make_pool
from helpers.workloads import add, load_constant, wait_for_release

from mlpool import PoolClosedError

pytestmark = pytest.mark.usefixtures("worker_mode", "no_leaked_workers")


def test_shutdown_leaves_no_process_and_refuses_new_jobs():
    pool = make_pool({"m": load_constant}, nb_workers=2)
    pids = {p.pid for p in worker_children()}
    assert len(pids) >= 2
    pool.shutdown()
    assert not ({p.pid for p in worker_children()} & pids)
    for call in (
        lambda: pool.score("m", add, 1),
        lambda: pool.create_job(add, "m", args=(1,)),
        lambda: pool.submit("m", add, 1),
        lambda: asyncio.run(pool.score_async("m", add, 1)),
    ):
        with pytest.raises(PoolClosedError):
            call()
    pool.shutdown()  # idempotent
    assert not pool.healthy


def test_shutdown_lets_queued_and_running_jobs_finish(fifo):
    pool = make_pool({"m": load_constant}, nb_workers=1)
    gate = fifo()
    running = pool.submit("m", wait_for_release, str(gate))
    gate.wait_running()
    queued = [pool.submit("m", add, i) for i in range(5)]
    pool.shutdown(wait=False)
    with pytest.raises(PoolClosedError):
        pool.submit("m", add, 1)
    gate.release_opened()
    assert running.result(timeout=30) > 0
    assert [f.result(timeout=30) for f in queued] == [10 + i for i in range(5)]
    pool.shutdown()


def test_shutdown_cancel_pending(fifo, tmp_path):
    pool = make_pool({"m": load_constant}, nb_workers=1)
    gate = fifo()
    running = pool.submit("m", wait_for_release, str(gate))
    gate.wait_running()
    marker = tmp_path / "ran"
    queued = pool.submit("m", workloads.touch, str(marker))
    pool.shutdown(wait=False, cancel_pending=True)
    assert queued.cancelled()
    gate.release_opened()
    assert running.result(timeout=30) > 0
    pool.shutdown()
    assert not marker.exists()


def test_shutdown_timeout_kills_stuck_workers():
    pool = make_pool({"m": load_constant}, nb_workers=1)
    stuck = pool.submit("m", workloads.spin, 600.0)
    started = time.monotonic()
    pool.shutdown(timeout=0.3)
    assert time.monotonic() - started < 10
    with pytest.raises(PoolClosedError, match="shut down before"):
        stuck.result(timeout=5)


def test_async_with_does_not_block_the_loop():
    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        async with make_pool({"m": load_constant}, nb_workers=2) as pool:
            assert pool.ready
            result = await pool.score_async("m", add, 1)
        ticker.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result == 11
    assert ticks > 0  # the loop ran while workers started


def test_idle_pool_uses_no_cpu():
    with make_pool({"m": load_constant}, nb_workers=2) as pool:
        pool.score("m", add, 1)
        procs = [psutil.Process()] + worker_children()
        before = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(1.0)  # a measurement window, not synchronisation
        after = [sum(p.cpu_times()[:2]) for p in procs]
    used = sum(after) - sum(before)
    assert used < 0.1, f"an idle pool used {used:.3f}s of CPU in 1s"


def test_event_loop_stays_responsive_while_hungry_jobs_run(fifo, tmp_path):
    """Both workers burn CPU in Python until the test says stop; meanwhile the
    loop that awaits them takes turns. Scoring in the loop's own thread would
    give it none: the jobs would still be burning, no turn taken."""
    gates, stop = [fifo(), fifo()], tmp_path / "stop"

    async def main(pool):
        loop = asyncio.get_running_loop()
        jobs = [asyncio.ensure_future(pool.score_async("m", workloads.busy_until, str(gate), str(stop)))
                for gate in gates]  # fmt: skip
        try:
            for gate in gates:  # the job opened its end: it runs, and burns CPU now or next
                await asyncio.wait_for(loop.run_in_executor(None, gate.path.read_text), 60)
            for _ in range(20):  # twenty turns of the loop...
                await asyncio.sleep(0.01)
            assert not any(job.done() for job in jobs)  # ...while both jobs burned
        finally:
            stop.touch()
        return await asyncio.gather(*jobs)

    with make_pool({"m": load_constant}, nb_workers=2) as pool:
        assert all(n >= 0 for n in asyncio.run(main(pool)))


def test_forgotten_pool_is_shut_down_when_collected():
    pool = make_pool({"m": load_constant}, nb_workers=1)
    workers = worker_children()  # psutil handles: no pid looked up again after it may have exited
    del pool
    gc.collect()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", ["return", "raise KeyboardInterrupt"])
def test_a_script_that_never_shuts_its_pool_down_exits_and_leaves_no_worker(tmp_path, ending):
    """The pool's exit hook must run before multiprocessing's, which joins
    (forever) the workers: not daemons. Here nothing imported
    multiprocessing.util before the pool was made."""
    script = tmp_path / "forgetful.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
            from helpers.workloads import add, load_constant
            from mlpool import MLPool

            def main():
                assert "multiprocessing.util" not in sys.modules
                pool = MLPool({{"m": load_constant}}, nb_workers=2)
                futures = [pool.submit("m", add, i) for i in range(50)]
                print(pool.score("m", add, 1), flush=True)
                {ending}

            if __name__ == "__main__":
                main()
            """
        )
    )
    owner = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert owner.stdout.readline().strip() == "11"
        workers = psutil.Process(owner.pid).children()
        # It exits (an uncaught KeyboardInterrupt ends Python by SIGINT).
        assert owner.wait(30) == (0 if ending == "return" else -signal.SIGINT)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        owner.kill()
        owner.wait(10)
        owner.stdout.close()


def test_workers_exit_when_the_api_process_is_killed(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, psutil
            sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
            from helpers.workloads import load_constant, spin
            from mlpool import MLPool
            if __name__ == "__main__":
                pool = MLPool({{"m": load_constant}}, nb_workers=2)
                busy = pool.submit("m", spin, 600.0)
                print(" ".join(str(p.pid) for p in psutil.Process().children()), flush=True)
                sys.stdin.read()
            """
        )
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        workers = [psutil.Process(int(p)) for p in line.split()]
        assert len(workers) >= 2
        owner.kill()
        owner.wait(30)
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"orphaned workers: {alive}"
    finally:
        owner.kill()
        owner.wait(30)
