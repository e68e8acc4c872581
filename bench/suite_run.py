"""Measure one system on every workload (run by ``bench/suite.py``, one process per system).

    python bench/suite_run.py SYSTEM CONFIG_JSON OUT_JSON

Exit code 3: the system's package is not installed (the message says how).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / ".peers" / "mlpool-0.1.0"))  # the original mlpool (import ml_pool)

import suite_workloads as w  # noqa: E402
from suite_systems import SYSTEMS, NotInstalled, System  # noqa: E402

CONCURRENCY = 64


def argument(workload: str, config: dict) -> Any:
    if workload == "hungry":
        return config["hungry_rounds"]
    if workload in ("forest", "forest_batched"):
        return config["forest_row"]
    if workload in w.ARRAY_BYTES:
        import numpy as np

        return np.ones(w.ARRAY_BYTES[workload] // 8)
    if workload.endswith("_out"):
        return w.ARRAY_BYTES[workload.removesuffix("_out")]
    return 1


def sequential(system: System, workload: str, arg: Any, calls: int, seconds: float) -> list[float]:
    """Latency of one call at a time: up to ``calls`` calls or ``seconds``."""
    for _ in range(3):
        system.call(workload, arg)
    samples = []
    deadline = time.perf_counter() + seconds
    while len(samples) < calls and time.perf_counter() < deadline:
        start = time.perf_counter()
        system.call(workload, arg)
        samples.append(time.perf_counter() - start)
    return samples


async def concurrent(system: System, workload: str, arg: Any, jobs: int, seconds: float) -> tuple[int, float]:
    """Jobs per second with CONCURRENCY coroutines each awaiting one call at a
    time: up to ``jobs`` jobs or ``seconds``."""
    done = 0
    started = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done, started
        while started < jobs and time.perf_counter() < deadline:
            started += 1
            await system.acall(workload, arg)
            done += 1

    begin = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return done, time.perf_counter() - begin


def main() -> None:
    name, config_path, out_path = sys.argv[1:4]
    config = json.loads(Path(config_path).read_text())
    system = SYSTEMS[name](config["workers"], config["forest_path"])
    result: dict[str, Any] = {"system": name, "workloads": {}}
    started = time.perf_counter()
    try:
        system.start()
        system.call("tiny", 0)
    except NotInstalled as exc:
        print(f"{name} is not installed: {exc}", file=sys.stderr)
        sys.exit(3)
    result["startup_s"] = time.perf_counter() - started
    try:
        for workload in w.WORKLOADS:
            reason = system.skip_reason(workload)
            if reason:
                result["workloads"][workload] = {"skipped": reason}
                continue
            budget = config["budgets"][workload]
            arg = argument(workload, config)
            samples = sequential(system, workload, arg, budget["calls"], budget["seconds"])
            done, elapsed = asyncio.run(concurrent(system, workload, arg, budget["jobs"], budget["seconds"]))
            result["workloads"][workload] = {
                "calls": len(samples),
                "p50_s": statistics.median(samples),
                "p99_s": sorted(samples)[max(0, int(len(samples) * 0.99) - 1)],
                "throughput_jobs": done,
                "throughput_per_s": done / elapsed,
            }
            # What is measured survives a hang later on (the suite kills us then).
            Path(out_path).write_text(json.dumps(result))
            print(f"{name}: {workload} done", file=sys.stderr, flush=True)
    finally:
        system.close()
    result["status"] = "ok"
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
