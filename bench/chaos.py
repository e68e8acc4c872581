"""Chaos run: sustained load while workers are SIGKILLed at random.

    python bench/chaos.py [--seconds 20] [--workers 2] [--retries 3] [--share-models] [--mixed]

Async callers (one event loop) and threaded callers send short jobs for the
whole run while a killer SIGKILLs a random serving worker (one that has
answered a job; killing workers while they load models is a crash loop at
start-up, which breaks the pool by design) every 50-100 ms. Every
call is bounded: one that does not resolve within 30 s counts as hung.
At the end it checks that the pool is back to full strength, shuts it down,
and looks for any process left behind. With retries every job must succeed.

``--mixed`` adds what else keeps workers and jobs moving: half the async
callers score a ``@mlpool.batched`` function, and each async caller works
through a session it closes and opens again every 20 jobs; workers are
recycled after 50 jobs (``max_jobs_per_worker``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

import mlpool
from mlpool import MLPool, WorkerCrashedError

CALL_BOUND = 30.0  # seconds; a call not resolved by then is "hung"
ASYNC_CALLERS = 32
THREAD_CALLERS = 4


def load_model() -> dict:
    return {"salt": 7}


def checksum(model: dict, caller: str, seq: int, payload: bytes) -> tuple[str, int, int, int]:
    return caller, seq, (sum(payload) + model["salt"]) % 65521, os.getpid()


@mlpool.batched(max_batch_size=8, max_wait_ms=2.0)
def batched_checksum(model: dict, items: list) -> list:
    return [checksum(model, *item) for item in items]


def expected(caller: str, seq: int, payload: bytes) -> tuple[str, int, int]:
    return caller, seq, (sum(payload) + 7) % 65521


def wait_for_release(model: dict, fifo: str) -> int:
    with open(fifo) as f:
        f.read()
    return os.getpid()


def workers_of(parent: psutil.Process) -> list[psutil.Process]:
    out = []
    for child in parent.children(recursive=True):  # forked workers are the template's children
        try:
            if "resource_tracker" not in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.serving: set[int] = set()  # pids that answered a job

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def check(self, result: tuple, caller: str, seq: int, payload: bytes) -> None:
        self.add("succeeded" if result[:3] == expected(caller, seq, payload) else "wrong result")
        with self.lock:
            self.serving.add(result[3])


def record(tally: Tally, call, caller: str, seq: int, payload: bytes) -> None:
    tally.add("submitted")
    try:
        result = call()
    except WorkerCrashedError:
        tally.add("failed: WorkerCrashedError")
    except TimeoutError:
        tally.add("hung")
    except Exception as exc:  # every other outcome is reported by type
        tally.add(f"failed: {type(exc).__name__}")
    else:
        tally.check(result, caller, seq, payload)


def thread_caller(pool: MLPool, name: str, stop: float, tally: Tally) -> None:
    seq = 0
    while time.monotonic() < stop:
        payload = os.urandom(64)
        if seq % 2:
            call = lambda p=payload, s=seq: pool.submit("m", checksum, name, s, p).result(CALL_BOUND)  # noqa: E731
        else:
            job = pool.create_job(checksum, "m", args=(name, seq, payload))
            call = lambda j=job: pool.get_result(j, timeout=CALL_BOUND)  # noqa: E731
        record(tally, call, name, seq, payload)
        seq += 1


async def async_callers(pool: MLPool, stop: float, tally: Tally, mixed: bool) -> None:
    async def one(index: int) -> None:
        name = f"async-{index}"
        seq = 0
        session = pool.session() if mixed else pool
        while time.monotonic() < stop:
            payload = os.urandom(64)
            tally.add("submitted")
            if mixed and seq % 20 == 19:  # a client leaves and another comes
                session.close()
                session = pool.session()
            try:
                if mixed and index % 2:
                    call = session.score_async("m", batched_checksum, (name, seq, payload))
                else:
                    call = session.score_async("m", checksum, name, seq, payload)
                result = await asyncio.wait_for(call, CALL_BOUND)
            except WorkerCrashedError:
                tally.add("failed: WorkerCrashedError")
            except asyncio.TimeoutError:
                tally.add("hung")
            except Exception as exc:
                tally.add(f"failed: {type(exc).__name__}")
            else:
                tally.check(result, name, seq, payload)
            seq += 1

    await asyncio.gather(*(one(i) for i in range(ASYNC_CALLERS)))


def killer(parent: psutil.Process, stop: float, kills: list[int], tally: Tally) -> None:
    rng = random.Random(1)
    done = threading.Event()
    while time.monotonic() < stop:
        done.wait(rng.uniform(0.05, 0.10))  # the pace of the storm, not a synchronisation
        with tally.lock:
            serving = set(tally.serving)
        victims = [p for p in workers_of(parent) if p.pid in serving]
        if victims:
            victim = rng.choice(victims)
            try:
                os.kill(victim.pid, signal.SIGKILL)
                kills.append(victim.pid)
            except ProcessLookupError:
                pass


def full_strength(pool: MLPool) -> bool:
    """True when nb_workers jobs run at the same moment (each blocks on a FIFO)."""
    with tempfile.TemporaryDirectory() as tmp:
        fifos = [Path(tmp) / f"gate-{i}" for i in range(pool.nb_workers)]
        for fifo in fifos:
            os.mkfifo(fifo)
        futures = [pool.submit("m", wait_for_release, str(f)) for f in fifos]
        opened: list[int] = []

        def open_all() -> None:
            for fifo in fifos:
                opened.append(os.open(fifo, os.O_WRONLY))  # returns once the job holding it runs

        opener = threading.Thread(target=open_all, daemon=True)
        opener.start()
        opener.join(CALL_BOUND)
        all_running = len(opened) == len(fifos)
        for fd in opened:
            os.write(fd, b"go")
            os.close(fd)
        for fd in range(len(opened), len(fifos)):  # release jobs still waiting
            with open(fifos[fd], "w") as f:
                f.write("go")
        for future in futures:
            future.result(CALL_BOUND)
        return all_running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--share-models", action="store_true", help="workers forked from a model template")
    parser.add_argument("--mixed", action="store_true", help="batching, sessions and max_jobs_per_worker=50 too")
    opts = parser.parse_args()

    parent = psutil.Process()
    rss_before = parent.memory_info().rss
    tally = Tally()
    kills: list[int] = []
    pool = MLPool(
        {"m": load_model}, nb_workers=opts.workers, max_retries=opts.retries, share_models=opts.share_models,
        max_jobs_per_worker=50 if opts.mixed else None,
    )
    rss_started = parent.memory_info().rss
    stop = time.monotonic() + opts.seconds
    threads = [
        threading.Thread(target=thread_caller, args=(pool, f"thread-{i}", stop, tally)) for i in range(THREAD_CALLERS)
    ]
    threads.append(threading.Thread(target=killer, args=(parent, stop, kills, tally)))
    for t in threads:
        t.start()
    asyncio.run(async_callers(pool, stop, tally, opts.mixed))
    for t in threads:
        t.join(CALL_BOUND * 2)
    stats = pool.stats()
    back_to_full = full_strength(pool)
    rss_after = parent.memory_info().rss
    workers = {p.pid for p in workers_of(parent)}
    pool.shutdown()
    gone, orphans = psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=5)
    left = list(workers_of(parent))

    counts = tally.counts
    print(f"chaos run: {opts.seconds:.0f} s, {opts.workers} workers, max_retries={opts.retries}, "
          f"{ASYNC_CALLERS} async + {THREAD_CALLERS} threaded callers, a SIGKILL every 50-100 ms"
          + (", forked workers" if opts.share_models else "")
          + (", batching + sessions + recycling every 50 jobs" if opts.mixed else ""))
    rows = [
        ("workers SIGKILLed", len(kills)),
        ("jobs submitted", counts["submitted"]),
        ("jobs succeeded (result checked)", counts["succeeded"]),
        ("jobs failed with WorkerCrashedError", counts["failed: WorkerCrashedError"]),
        ("crashed jobs retried (retry events)", stats.jobs_retried),
        ("jobs hung (unresolved after 30 s)", counts["hung"]),
        ("wrong results", counts["wrong result"]),
        *((key, value) for key, value in sorted(counts.items()) if key.startswith("failed: ") and "Crashed" not in key),
        ("worker restarts", stats.worker_restarts),
        ("workers recycled", stats.workers_recycled),
        ("back to full strength after the storm", f"{back_to_full} ({opts.workers} jobs ran at once)"),
        ("orphan processes after shutdown", len(orphans) + len(left)),
        (
            "parent RSS before pool / after start / after run",
            f"{rss_before / 2**20:.0f} / {rss_started / 2**20:.0f} / {rss_after / 2**20:.0f} MiB",
        ),
    ]
    for name, value in rows:
        print(f"  {name:<50} {value}")
    ok = (
        counts["hung"] == 0
        and counts["wrong result"] == 0
        and not orphans
        and not left
        and back_to_full
        and (opts.retries < 3 or counts["succeeded"] == counts["submitted"])
    )
    print("PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
