"""Large arguments and results cross in shared memory; nothing leaks, whatever dies."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import workloads
from helpers.workloads import array_summary, load_constant

from mlpool import MLPool, WorkerCrashedError

pytestmark = [
    pytest.mark.usefixtures("no_leaked_workers"),
    pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="shared memory transport needs memfd_create (Linux)"),
]


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def memfds() -> int:
    """Shared-memory files this process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "memfd:mlpool" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return count


@pytest.fixture(scope="module")
def pool():
    with MLPool({"m": load_constant}, nb_workers=2) as p:
        yield p


@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32", "float64", "complex128", "bool"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_arrays_of_every_dtype_and_order(pool, dtype, order):
    array = np.arange(600_000).reshape(200, 3000)
    array = np.asfortranarray(array) if order == "F" else array
    array = array.astype(dtype)
    total, shape, kind, writeable, owndata = pool.score("m", array_summary, array)
    assert (total, shape, kind) == (workloads.byte_sum(array), array.shape, dtype)
    assert not writeable and not owndata  # a read-only view on shared memory: no copy in the worker
    back = pool.score("m", workloads.copy_of, array)
    assert back.dtype == array.dtype and np.array_equal(back, array)
    assert back.flags.writeable  # a result the worker made is the caller's to change
    assert not pool.score("m", workloads.echo, array).flags.writeable  # its read-only input stays read-only


def test_non_contiguous_views_and_small_arrays_still_round_trip(pool):
    base = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    for view in (base[::3, ::7], base.T, base[10:20], np.float32(3.5), np.arange(10)):
        assert np.array_equal(pool.score("m", workloads.echo, view), view)


def test_1080p_image_and_a_200_mb_array(pool):
    image = np.random.default_rng(0).integers(0, 255, size=(1080, 1920, 3), dtype=np.uint8)
    assert pool.score("m", array_summary, image)[:2] == (workloads.byte_sum(image), image.shape)
    big = np.ones(200 * 2**20, dtype=np.uint8)
    assert pool.score("m", array_summary, big)[0] == big.size
    made = pool.score("m", workloads.make_array, 200 * 2**20, 7)
    assert made.shape == (200 * 2**20,) and made.sum(dtype=np.uint64) == workloads.make_array(None, 200 * 2**20, 7).sum(
        dtype=np.uint64
    )


def test_workers_get_read_only_views(pool):
    with pytest.raises(ValueError, match="read-only"):
        pool.score("m", workloads.try_to_write, np.zeros(100_000))


def test_pandas_pyarrow_and_bytes(pool):
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"x": np.arange(100_000, dtype=np.float64), "y": np.arange(100_000)})
    assert pool.score("m", workloads.frame_summary, frame) == (float(frame.x.sum()), int(frame.y.sum()), ["x", "y"])
    assert pool.score("m", workloads.echo, frame).equals(frame)
    table = pa.table({"x": np.arange(100_000, dtype=np.float64)})
    assert pool.score("m", workloads.table_summary, table) == (float(np.arange(100_000).sum()), 100_000)
    assert pool.score("m", workloads.echo, table).equals(table)
    data = os.urandom(1_000_000)
    digest = hashlib.sha256(data).hexdigest()
    assert pool.score("m", workloads.bytes_digest, data) == ("bytes", digest)
    assert pool.score("m", workloads.bytes_digest, bytearray(data)) == ("bytearray", digest)
    assert pool.score("m", workloads.bytes_digest, memoryview(data)) == ("memoryview", digest)
    assert pool.score("m", workloads.echo, data) == data


def test_concurrent_callers_each_get_their_own_data(pool):
    def caller(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        for _ in range(10):
            array = rng.normal(size=rng.integers(20_000, 200_000))
            if not np.array_equal(pool.score("m", workloads.echo_plus_one, array), array + 1):
                return False
        return True

    with ThreadPoolExecutor(8) as threads:
        assert all(threads.map(caller, range(8)))


def test_nothing_is_left_behind_by_use_crashes_or_shutdown(fifo):
    before_shm, before_fds = shm_entries(), memfds()
    with MLPool({"m": load_constant}, nb_workers=2) as pool:
        for _ in range(20):
            pool.score("m", workloads.echo_plus_one, np.zeros(500_000))
        used = memfds() - before_fds
        assert used <= 4  # regions are reused, not made per job
        gate = fifo()
        dying = pool.submit("m", workloads.hold_array_then_die, np.ones(2_000_000), str(gate))
        gate.wait_running()
        os.kill(gate.pid, 9)
        with pytest.raises(WorkerCrashedError):
            dying.result(timeout=30)
        for _ in range(20):
            pool.score("m", workloads.echo_plus_one, np.zeros(500_000))
        assert memfds() - before_fds <= used + 2  # the dead job's region went back to the pool
    assert shm_entries() == before_shm
    assert memfds() == before_fds  # shutdown closed every region


def test_nothing_is_left_when_the_api_process_is_killed(tmp_path):
    before = shm_entries()
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        import numpy as np
        from helpers.workloads import load_constant, echo
        from mlpool import MLPool
        if __name__ == "__main__":
            pool = MLPool({{"m": load_constant}}, nb_workers=2)
            kept = pool.score("m", echo, np.ones(5_000_000))
            pending = [pool.submit("m", echo, np.ones(5_000_000)) for _ in range(4)]
            print("ready", flush=True)
            sys.stdin.read()
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        workers = psutil.Process(owner.pid).children()
        owner.kill()
        owner.wait(30)
        psutil.wait_procs(workers, timeout=5)
    finally:
        owner.kill()
        owner.wait(30)
    assert shm_entries() == before


def test_over_the_limit_goes_through_the_pipe_with_one_log_line(caplog):
    from mlpool._wire import shm as _shm_worker

    _shm_worker._warned.discard("limit")
    with MLPool({"m": load_constant}, nb_workers=1, shared_memory_limit=1_000_000) as pool:
        with caplog.at_level(logging.WARNING, logger="mlpool._wire.shm"):
            for _ in range(3):
                assert pool.score("m", array_summary, np.ones(2_000_000, dtype=np.uint8))[0] == 2_000_000
        assert pool.score("m", array_summary, np.ones(100_000))[3:] == (False, False)  # under the limit: shared
    warnings = [r for r in caplog.records if "shared_memory_limit" in r.getMessage()]
    assert len(warnings) == 1


def test_threshold_none_keeps_everything_in_the_pipe():
    with MLPool({"m": load_constant}, nb_workers=1, shared_memory_threshold=None) as pool:
        total, _, _, writeable, _ = pool.score("m", array_summary, np.ones(500_000, dtype=np.uint8))
        assert total == 500_000 and writeable  # unpickled from the pipe: the worker's own writable copy


def memfd_files() -> set[int]:
    """The inodes of the shared-memory files this process holds open."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "memfd:mlpool" in os.readlink(f"/proc/self/fd/{fd}"):
                inodes.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
        except OSError:
            pass
    return inodes


def test_a_64_mb_argument_reuses_one_region_from_job_to_job():
    """Every job sends its 64 MB array through the same shared-memory file:
    none is made, mapped and filled anew per job (each cost about 20 ms)."""
    array = np.ones(64 * 2**20, dtype=np.uint8)
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        before = memfd_files()
        assert pool.score("m", array_summary, array)[0] == array.nbytes
        files = memfd_files() - before
        assert len(files) == 1  # the job's region, idle now, kept
        for _ in range(4):
            assert pool.score("m", array_summary, array)[0] == array.nbytes
            assert memfd_files() - before == files


def test_shared_memory_cache_zero_keeps_no_idle_region():
    with MLPool({"m": load_constant}, nb_workers=1, shared_memory_cache=0) as pool:
        before = memfd_files()
        for _ in range(3):
            assert pool.score("m", array_summary, np.ones(8 * 2**20, dtype=np.uint8))[0] == 8 * 2**20
            assert memfd_files() == before


@pytest.mark.parametrize("value, error", [(-1, ValueError), ("1GB", TypeError), (1.5, TypeError), (True, TypeError)])
def test_a_bad_shared_memory_cache_is_refused_naming_it(value, error):
    with pytest.raises(error, match="shared_memory_cache"):
        MLPool({"m": load_constant}, nb_workers=1, shared_memory_cache=value)


def test_a_job_gets_its_arguments_as_they_were_when_it_was_made(fifo):
    """The array is copied into shared memory when the job is made: the
    caller changing it while the job waits in the queue changes nothing."""
    with MLPool({"m": load_constant}, nb_workers=1) as pool:
        gate = fifo()
        blocker = pool.submit("m", workloads.wait_for_release, str(gate))
        gate.wait_running()
        array = np.ones(8 * 2**20, dtype=np.uint8)
        queued = pool.submit("m", array_summary, array)
        array[:] = 3
        gate.release_opened()
        blocker.result(timeout=30)
        assert queued.result(timeout=30)[0] == array.nbytes  # ones, not threes


def test_jobs_refused_or_cancelled_before_they_ran_give_their_region_back(fifo):
    """A job made and then refused (full queue) or cancelled in the queue
    holds its region no longer: the same few files serve every attempt."""
    from mlpool import PoolFullError

    with MLPool({"m": load_constant}, nb_workers=1, max_queue_size=1) as pool:
        gate = fifo()
        blocker = pool.submit("m", workloads.wait_for_release, str(gate))
        gate.wait_running()
        array = np.ones(8 * 2**20, dtype=np.uint8)
        before = memfd_files()
        queued = pool.submit("m", array_summary, array)
        for _ in range(20):
            with pytest.raises(PoolFullError):
                pool.create_job(array_summary, "m", args=(array,), block_until_scheduled=False)
        assert len(memfd_files() - before) <= 2  # the queued job's region, and one the refusals share
        assert queued.cancel()
        for _ in range(20):
            pool.submit("m", array_summary, array).cancel()
        assert len(memfd_files() - before) <= 2
        gate.release_opened()
        blocker.result(timeout=30)
        assert pool.score("m", array_summary, array)[0] == array.nbytes


def test_calls_refused_by_a_closed_session_or_pool_give_their_region_back_at_once():
    """Refused before the queue (a closed session; a sync call on a shut-down
    pool): with the garbage collector off, the regions are back all the same."""
    import gc

    from mlpool import PoolClosedError

    array = np.ones(8 * 2**20, dtype=np.uint8)
    pool = MLPool({"m": load_constant}, nb_workers=1)
    session = pool.session()
    session.close()
    before = memfd_files()
    gc.disable()
    try:
        refused = (lambda: session.score("m", array_summary, array), lambda: session.submit("m", array_summary, array))
        for call in refused:
            for _ in range(10):
                with pytest.raises(PoolClosedError):
                    call()
        assert len(memfd_files() - before) <= 1
        pool.shutdown()
        for _ in range(10):
            with pytest.raises(PoolClosedError):
                pool.score("m", array_summary, array)
        assert len(memfd_files() - before) <= 1
    finally:
        gc.enable()
        pool.shutdown()

