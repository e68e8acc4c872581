"""Every wait ends: interrupted callers, blocked event loops, callbacks that
call back in, forked processes, cancelled jobs that held a place."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import struct
import threading

import psutil
import pytest
from helpers.workloads import add, bytes_digest, exit_now, load_constant, wait_for_release

from mlpool import MLPool, PoolClosedError, PoolFullError, WorkerCrashedError


class Interrupted(Exception):
    """Raised by the test's signal handler in the main thread (a stand-in for Ctrl-C)."""


def _raise_interrupted(signum, frame):
    raise Interrupted


@pytest.mark.timeout(60)
def test_an_interrupted_lent_wait_gives_the_pipe_back(fifo, caplog):
    caplog.set_level(logging.WARNING, logger="mlpool")
    previous = signal.signal(signal.SIGUSR1, _raise_interrupted)
    try:
        with MLPool({"m": load_constant}, nb_workers=1) as pool:
            gate = fifo()

            def interrupt_once_running() -> None:
                gate.wait_running()
                os.kill(os.getpid(), signal.SIGUSR1)

            interrupter = threading.Thread(target=interrupt_once_running)
            interrupter.start()
            with pytest.raises(Interrupted):
                pool.score("m", wait_for_release, str(gate))  # an idle pool: this thread reads the pipe
            interrupter.join(30)
            gate.release_opened()
            assert pool.submit("m", add, 1).result(timeout=30) == 11
            pool.shutdown(timeout=10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert "shutdown timed out" not in caplog.text


def _run_in_thread(fn, timeout: float = 30.0):
    """Run ``fn`` in a daemon thread; its result, or fail if it hangs."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn.__name__} hung"
    return out[0]


@pytest.mark.timeout(60)
def test_a_sync_call_on_a_loop_that_reads_a_busy_pipe_completes(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()

        async def main():
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(pool.score_async("m", wait_for_release, str(gate)))
            await loop.run_in_executor(None, gate.wait_running)
            threading.Thread(target=gate.release_opened).start()
            with pytest.warns(RuntimeWarning, match="score_async"):  # a sync call in a coroutine is a mistake...
                result = pool.score("m", add, 1)  # ...that still completes: this loop was reading the busy pipe
            return result, await task

        result, first = _run_in_thread(lambda: asyncio.run(main()))
        assert result == 11 and first is not None


@pytest.mark.timeout(60)
def test_shutdown_is_prompt_after_a_loop_ended_with_a_job_in_flight(fifo, caplog):
    caplog.set_level(logging.WARNING, logger="mlpool")
    pool = MLPool({"m": load_constant}, nb_workers=1)
    gate = fifo()

    async def main():
        loop = asyncio.get_running_loop()
        asyncio.ensure_future(pool.score_async("m", wait_for_release, str(gate)))
        await loop.run_in_executor(None, gate.wait_running)
        # asyncio.run cancels the task and closes the loop with the job in flight.

    asyncio.run(main())
    gate.release_opened()
    pool.shutdown(timeout=10)
    assert "shutdown timed out" not in caplog.text


@pytest.mark.timeout(60)
def test_a_sync_shutdown_on_a_loop_that_reads_a_busy_pipe_is_prompt(fifo, caplog):
    caplog.set_level(logging.WARNING, logger="mlpool")
    pool = MLPool({"m": load_constant}, nb_workers=1)
    gate = fifo()

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(pool.score_async("m", wait_for_release, str(gate)))
        await loop.run_in_executor(None, gate.wait_running)
        threading.Thread(target=gate.release_opened).start()
        with pytest.warns(RuntimeWarning, match="blocks the event loop"):  # it does, on purpose
            pool.shutdown(timeout=10)  # blocks the loop that reads the pipe
        return await task

    assert _run_in_thread(lambda: asyncio.run(main())) is not None
    assert "shutdown timed out" not in caplog.text


@pytest.mark.timeout(60)
def test_a_done_callback_that_uses_the_pool_does_not_block_it(fifo):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        first, second = fifo(), fifo()
        blocker = pool.submit("m", wait_for_release, str(first))
        first.wait_running()
        results: list = []
        called = threading.Event()

        def callback(future) -> None:
            results.append(pool.score("m", add, future.result()))  # queued behind the second FIFO job
            called.set()

        one = pool.submit("m", add, 1)
        one.add_done_callback(callback)
        behind = pool.submit("m", wait_for_release, str(second))
        first.release_opened()
        second.release()
        assert called.wait(30), "the callback's own job never finished"
        assert results == [21]
        assert blocker.result(timeout=30) is not None and behind.result(timeout=30) is not None


def c_fork() -> int:
    """fork(2) called from C, as uWSGI forks its workers: no os.register_at_fork hook runs."""
    return ctypes.CDLL(None).fork()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fork", [os.fork, c_fork], ids=["os.fork", "fork in C"])
def test_a_forked_child_gets_a_clear_error_and_the_parent_pool_is_unaffected(fork):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        assert pool.score("m", add, 1) == 11
        pid = fork()
        if pid == 0:  # the child: never return into pytest
            code = 3
            try:
                pool.score("m", add, 1)
                code = 1
            except PoolClosedError as exc:
                code = 0 if "forked" in str(exc) else 2
            except BaseException:
                code = 4
            finally:
                os._exit(code)
        assert psutil.Process(pid).wait(timeout=30) == 0
        for i in range(3):  # nothing of the child's crossed into the parent's pool
            assert pool.score("m", add, i) == 10 + i
            assert pool.submit("m", add, i).result(timeout=30) == 10 + i


@pytest.mark.timeout(90)
def test_a_pool_made_in_a_child_forked_in_c_serves_and_shuts_down():
    with MLPool({"m": load_constant}, nb_workers=1) as pool:  # the parent has used a pool
        assert pool.score("m", add, 1) == 11
    pid = c_fork()
    if pid == 0:
        code = 3
        try:
            with MLPool({"m": load_constant}, nb_workers=1) as child_pool:
                code = 0 if child_pool.score("m", add, 2) == 12 else 1
            if psutil.Process().children():
                code = 5  # its workers outlived the shutdown
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    assert psutil.Process(pid).wait(timeout=60) == 0


@pytest.mark.timeout(60)
def test_cancelled_queued_jobs_free_their_place_at_once(fifo):
    with MLPool({"m": load_constant}, nb_workers=1, max_queue_size=5) as pool:
        gate = fifo()
        blocker = pool.submit("m", wait_for_release, str(gate))
        gate.wait_running()
        queued = [pool.submit("m", add, i) for i in range(5)]
        with pytest.raises(PoolFullError):
            pool.create_job(add, "m", args=(1,), block_until_scheduled=False)
        assert all(future.cancel() for future in queued)
        assert pool.stats().queue_depth == 0
        job_id = pool.create_job(add, "m", args=(1,), block_until_scheduled=False)
        gate.release_opened()
        assert pool.get_result(job_id, timeout=30) == 11
        assert blocker.result(timeout=30) is not None
        assert pool.stats().jobs_cancelled == 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["score", "submit"])
def test_out_of_descriptors_for_shared_memory_a_job_goes_through_the_pipe_and_the_worker_serves_on(
    call, descriptor_limit, caplog
):
    """Shared memory for the arguments is taken when the job is made: without
    a descriptor for it, the job goes through the pipe, with one log line."""
    from mlpool._wire import shm as _shm_worker

    _shm_worker._warned.discard("memfd")
    data = b"x" * 200_000  # crosses in shared memory: placing it needs a new descriptor
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        assert pool.score("m", add, 1) == 11
        with caplog.at_level(logging.WARNING, logger="mlpool"):
            with descriptor_limit(max(int(fd) for fd in os.listdir("/proc/self/fd")) + 8):
                for _ in range(2):
                    if call == "score":
                        answer = pool.score("m", bytes_digest, data)
                    else:
                        answer = pool.submit("m", bytes_digest, data).result(timeout=30)
                    assert answer == bytes_digest(None, data)
        assert len([r for r in caplog.records if "shared memory unavailable" in r.getMessage()]) == 1
        assert pool.submit("m", add, 2).result(timeout=30) == 12
        assert pool.score("m", bytes_digest, data)[0] == "bytes"
        stats = pool.stats()
        assert stats.workers_alive == 1 and stats.worker_restarts == 0


@pytest.mark.parametrize("name", ["bad\udc80name", "x" * 70_000])
def test_a_model_name_no_message_can_carry_is_refused_at_construction(name, no_leaked_workers):
    with pytest.raises(ValueError, match="model name"):
        MLPool({name: load_constant}, nb_workers=1)


def fork_helper(model: dict) -> int:
    """Fork a helper process that outlives this job, holding every descriptor the worker has."""
    pid = os.fork()
    if pid == 0:
        signal.pause()  # until the test kills it
        os._exit(0)
    return pid


@pytest.mark.timeout(60)
def test_a_worker_death_is_seen_while_a_process_it_forked_lives():
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        helper = pool.score("m", fork_helper)
        try:
            with pytest.raises(WorkerCrashedError, match="exited with code 3"):
                pool.submit("m", exit_now, 3).result(timeout=20)
            assert pool.score("m", add, 1) == 11
        finally:
            os.kill(helper, signal.SIGKILL)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 1e12, -1.0])
def test_a_shutdown_timeout_that_cannot_be_waited_is_refused_and_changes_nothing(timeout):
    pool = MLPool({"m": load_constant}, nb_workers=1)
    with pytest.raises(ValueError, match="timeout"):
        pool.shutdown(timeout=timeout)
    assert pool.ready and pool.score("m", add, 1) == 11
    pool.shutdown(timeout=10)
    assert not pool.healthy


def write_garbage_to_my_pipes(model: dict, garbage: bytes) -> int:
    """Write bytes that are no message on every socket this worker has open."""
    import stat

    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.write(fd, garbage)
        except OSError:
            pass
    return 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["score", "submit", "score_async"])
def test_a_worker_whose_pipe_carries_garbage_is_replaced_and_the_pool_serves_on(call):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        with pytest.raises(WorkerCrashedError, match="no message"):
            if call == "score":
                pool.score("m", write_garbage_to_my_pipes, b"\0" * 64)
            elif call == "submit":
                pool.submit("m", write_garbage_to_my_pipes, b"\0" * 64).result(timeout=30)
            else:
                asyncio.run(asyncio.wait_for(pool.score_async("m", write_garbage_to_my_pipes, b"\0" * 64), 30))
        assert pool.score("m", add, 1) == 11
        assert pool.healthy


# A frame header whose kind no message has, announcing 4 GiB: the reader must
# not wait for (nor make room for) bytes that will never come.
BOGUS_HEADER = struct.pack("<IB", 2**32 - 1, 0xEE)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["score", "submit"])
def test_a_frame_header_no_message_has_is_refused_at_once(call):
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        rss = psutil.Process().memory_info().rss
        with pytest.raises(WorkerCrashedError, match="no message"):
            if call == "score":
                pool.score("m", write_garbage_to_my_pipes, BOGUS_HEADER)
            else:
                pool.submit("m", write_garbage_to_my_pipes, BOGUS_HEADER).result(timeout=30)
        assert psutil.Process().memory_info().rss - rss < 256 * 2**20  # no room made for 4 GiB
        assert pool.score("m", add, 1) == 11


@pytest.mark.timeout(60)
def test_loops_abandoned_with_a_job_in_flight_pin_no_descriptor_after_shutdown(fifo):
    import gc

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with MLPool({"m": load_constant}, nb_workers=1):  # what lives as long as the process (multiprocessing's tracker)
        pass
    gc.collect()
    before = fds()
    pool = MLPool({"m": load_constant}, nb_workers=1)
    for _ in range(3):
        gate = fifo()

        async def go(gate=gate) -> None:
            asyncio.ensure_future(pool.score_async("m", wait_for_release, str(gate)))
            await asyncio.get_running_loop().run_in_executor(None, gate.wait_running)

        def abandon(go=go) -> None:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(go())  # returns with the job in flight; the loop is never closed

        thread = threading.Thread(target=abandon)
        thread.start()
        thread.join(30)
        gate.release_opened()
        assert pool.score("m", add, 1) == 11
    pool.shutdown(timeout=10)
    gc.collect()
    assert fds() == before
