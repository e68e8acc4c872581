"""How many cores this process may really use.

``os.cpu_count()`` reports the host's cores. A container is limited by its CPU
affinity mask (``taskset``, Kubernetes static CPU manager) and by its cgroup
CPU quota (Docker ``--cpus``, Kubernetes ``limits.cpu``, Cloud Run). The
smaller of the two is what a pool should size itself by.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpu_count() -> int:
    """Cores this process may use: min(affinity mask, cgroup CPU quota), at least 1."""
    cores = _affinity_count()
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _affinity_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_cpu_quota() -> float | None:
    """The cgroup CPU limit in cores (e.g. 1.5), or None when unlimited or unknown.

    Reads cgroup v2 ``cpu.max`` along the process's cgroup path up to the
    root (the tightest limit wins), else cgroup v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            limits += _v2_limits(path)
        elif "cpu" in controllers.split(","):
            limits += _v1_limits(path)
    return min(limits) if limits else None


def _v2_limits(path: str) -> list[float]:
    limits = []
    current = (_CGROUP_ROOT / path.lstrip("/")).resolve()
    while True:
        limit = _parse_cpu_max(current / "cpu.max")
        if limit is not None:
            limits.append(limit)
        if current == _CGROUP_ROOT or _CGROUP_ROOT not in current.parents:
            break
        current = current.parent
    return limits


def _parse_cpu_max(file: Path) -> float | None:
    try:
        quota, period = file.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or int(period) <= 0:
        return None
    return int(quota) / int(period)


def _v1_limits(path: str) -> list[float]:
    for base in (_CGROUP_ROOT / "cpu,cpuacct", _CGROUP_ROOT / "cpu"):
        for directory in (base / path.lstrip("/"), base):
            try:
                quota = int((directory / "cpu.cfs_quota_us").read_text())
                period = int((directory / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            return [quota / period] if quota > 0 and period > 0 else []
    return []
