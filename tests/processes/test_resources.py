"""Cores, cgroup quotas and thread caps in workers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.workloads import load_numpy_model, thread_settings

from mlpool import MLPool
from mlpool._api import resources as _resources


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_usable_cpu_count_follows_the_affinity_mask():
    code = "import os, mlpool; os.sched_setaffinity(0, {0}); print(mlpool.usable_cpu_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_cgroup_v2_quota_is_read_up_the_hierarchy(tmp_path, monkeypatch):
    leaf = tmp_path / "kubepods" / "pod1"
    leaf.mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "cpu.max").write_text("300000 100000\n")
    (leaf / "cpu.max").write_text("150000 100000\n")
    monkeypatch.setattr(_resources, "_CGROUP_ROOT", tmp_path)
    assert _resources._v2_limits("/kubepods/pod1") == [1.5, 3.0]
    assert _resources._parse_cpu_max(tmp_path / "cpu.max") is None


def test_cgroup_v1_quota(tmp_path, monkeypatch):
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("250000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setattr(_resources, "_CGROUP_ROOT", tmp_path)
    assert _resources._v1_limits("/") == [2.5]
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert _resources._v1_limits("/") == []


def test_this_machine_quota_is_consistent():
    quota = _resources.cgroup_cpu_quota()
    count = _resources.usable_cpu_count()
    assert 1 <= count <= (os.cpu_count() or 1)
    if quota is not None:
        assert count <= max(1, -(-quota // 1))


def test_threads_per_worker_caps_blas_and_openmp():
    with MLPool({"np": load_numpy_model}, nb_workers=1, threads_per_worker=1) as pool:
        settings = pool.score("np", thread_settings)
    assert settings["env"] == "1"
    assert settings["pools"], "numpy's BLAS should be visible to threadpoolctl"
    assert all(threads == 1 for _, threads in settings["pools"])


def test_default_threads_per_worker_splits_the_cores():
    with MLPool({"np": load_numpy_model}, nb_workers=1) as pool:
        settings = pool.score("np", thread_settings)
    assert settings["env"] == str(max(1, _resources.usable_cpu_count() // 1))
