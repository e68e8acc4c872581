"""mlpool against every alternative a user would pick, on the same workloads, in one run.

    python bench/suite.py [--systems NAME,NAME] [--quick]

Systems: in-process (the direct call), ProcessPoolExecutor (an initializer
loads the model), loky's reusable executor, mpire's WorkerPool with worker
state, Ray actors on a local Ray, the original mlpool 0.1.0, and mlpool
(spawned workers, and share_models). Each runs in its own process with a
time bound: a hang or a crash is recorded, not fatal. ``make bench``
installs the peers first.

Workloads (``suite_workloads``): a tiny job (pure overhead); a hungry job
(pure-Python CPU holding the GIL, calibrated to ~20 ms here); a
scikit-learn RandomForest (100 trees) scoring one row; NumPy arrays of 8 MB
and 64 MB both ways (``array_*``: the argument, which the worker sums;
``array_*_out``: the result, an array the worker made once); the forest with
dynamic batching where the system has it.

Figures: sequential latency p50/p99 and its overhead over the direct call;
jobs per second with 64 concurrent async callers; for the hungry job, that
throughput as a fraction of the ideal (workers / single-call time); time
from start to the first result. Writes ``bench/results/latest.json``,
``latest.md`` and two charts (``throughput.png``, ``latency.png``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import suite_workloads as w  # noqa: E402
from suite_systems import SYSTEMS  # noqa: E402

WORKERS = 2
SYSTEM_TIMEOUT = 300.0  # seconds a system may take for everything
HUNGRY_SECONDS = 0.020
BUDGETS = {  # per workload: sequential calls, concurrent jobs, seconds each phase may take
    "tiny": {"calls": 2000, "jobs": 20000, "seconds": 4.0},
    "hungry": {"calls": 30, "jobs": 150, "seconds": 4.0},
    "forest": {"calls": 200, "jobs": 1500, "seconds": 4.0},
    "array_8mb": {"calls": 100, "jobs": 400, "seconds": 4.0},
    "array_64mb": {"calls": 30, "jobs": 100, "seconds": 4.0},
    "array_8mb_out": {"calls": 100, "jobs": 400, "seconds": 4.0},
    "array_64mb_out": {"calls": 30, "jobs": 100, "seconds": 4.0},
    "forest_batched": {"calls": 200, "jobs": 5000, "seconds": 4.0},
}
PACKAGES = ("mlpool", "loky", "mpire", "ray", "numpy", "scikit-learn", "cloudpickle")


def train_forest(path: Path) -> list[float]:
    """A RandomForest saved with pickle (what the loaders load); one row to score."""
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    x, y = make_classification(n_samples=2000, n_features=w.FOREST_FEATURES, random_state=0)
    model = RandomForestClassifier(n_estimators=100, n_jobs=1, random_state=0).fit(x, y)
    path.write_bytes(pickle.dumps(model))
    return [float(v) for v in x[0]]


def calibrate_hungry() -> int:
    """Rounds of ``suite_workloads.hungry`` that take about HUNGRY_SECONDS here."""
    rounds = 10_000
    while True:
        start = time.perf_counter()
        w.hungry(None, rounds)
        elapsed = time.perf_counter() - start
        if elapsed > 0.005:
            break
        rounds *= 2
    rounds = int(rounds * HUNGRY_SECONDS / elapsed)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        w.hungry(None, rounds)
        samples.append(time.perf_counter() - start)
    return int(rounds * HUNGRY_SECONDS / statistics.median(samples))


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    old = HERE / ".peers" / "mlpool-0.1.0"
    found = list(old.glob("[Mm][Ll][Pp]ool-*.dist-info"))
    out["mlpool (original)"] = found[0].name.removesuffix(".dist-info").split("-")[1] if found else "not installed"
    return out


def run_system(name: str, config_path: Path, tmp: Path) -> dict:
    """Run one system in its own process (and session, so whatever it leaves
    behind can be counted and killed); its result, or why there is none."""
    out = tmp / f"{name.replace(' ', '_')}.json"
    log = tmp / f"{name.replace(' ', '_')}.log"
    started = time.perf_counter()
    print(f"-- {name}", flush=True)
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "suite_run.py"), name, str(config_path), str(out)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=SYSTEM_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
    leftovers = _kill_session(proc.pid)
    result = json.loads(out.read_text()) if out.exists() else {"system": name, "workloads": {}}
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    if code is None:
        result["status"] = f"timed out after {SYSTEM_TIMEOUT:.0f} s"
    elif code == 3:
        result["status"] = lines[-1] if lines else "not installed"
    elif code != 0 or "status" not in result:
        result["status"] = f"failed (exit code {code}): " + " | ".join(lines[-3:])
    result["processes_left_behind"] = leftovers
    result["wall_s"] = time.perf_counter() - started
    return result


def _kill_session(session: int) -> int:
    """SIGKILL every process still in ``session``; how many there were."""
    import psutil

    left = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    # A moment to exit on their own (multiprocessing's resource tracker
    # leaves when the pipe from the system's process closes).
    _, left = psutil.wait_procs(left, timeout=3)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    return len(left)


def derive(results: list[dict], hungry_rounds: int) -> None:
    """Overhead over the direct call, and the hungry job's share of the ideal."""
    direct = next((r for r in results if r["system"] == "in-process" and r["status"] == "ok"), None)
    for r in results:
        for workload, figures in r["workloads"].items():
            if "p50_s" not in figures:
                continue
            base = direct["workloads"].get(workload, direct["workloads"].get("forest")) if direct else None
            if base and "p50_s" in base:
                figures["overhead_s"] = figures["p50_s"] - base["p50_s"]
            if workload == "hungry" and direct:
                single = direct["workloads"]["hungry"]["p50_s"]
                figures["share_of_ideal"] = figures["throughput_per_s"] / (WORKERS / single)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if abs(s) < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if abs(s) < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def commit() -> str:
    """The commit measured (short hash; "+ changes" when the work tree differs from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "../src", "../bench")
    return f"{head} + changes" if dirty else head


def markdown(report: dict) -> str:
    results = report["results"]
    lines = [
        f"{report['date']}, mlpool at {report.get('commit', 'an unrecorded commit')}, "
        f"{report['cores']} cores ({report['machine']}), {WORKERS} workers per system; "
        f"hungry job calibrated to {report['hungry_ms']:.1f} ms in-process.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "**Throughput, 64 concurrent async callers (jobs/s)**; hungry: share of the ideal "
        f"({WORKERS} workers / single-call time)",
        "",
        "| system | start to first result | " + " | ".join(w.WORKLOADS) + " | hungry, share of ideal |",
        "|---|---:|" + "---:|" * len(w.WORKLOADS) + "---:|",
    ]
    for r in results:
        if r["status"] != "ok":
            continue
        cells = []
        for workload in w.WORKLOADS:
            f = r["workloads"].get(workload, {})
            cells.append(f"{f['throughput_per_s']:,.0f}" if "throughput_per_s" in f else f.get("skipped", "-"))
        share = r["workloads"].get("hungry", {}).get("share_of_ideal")
        lines.append(
            f"| {r['system']} | {fmt_seconds(r['startup_s'])} | " + " | ".join(cells)
            + f" | {'-' if share is None else f'{share:.0%}'} |"
        )
    lines += [
        "",
        "**Sequential latency, one call at a time: p50 / p99 (overhead of the p50 over the direct call)**",
        "",
        "| system | " + " | ".join(w.WORKLOADS) + " |",
        "|---|" + "---:|" * len(w.WORKLOADS),
    ]
    for r in results:
        if r["status"] != "ok":
            continue
        cells = []
        for workload in w.WORKLOADS:
            f = r["workloads"].get(workload, {})
            if "p50_s" not in f:
                cells.append(f.get("skipped", "-"))
                continue
            over = f.get("overhead_s")
            extra = f" (+{fmt_seconds(over)})" if over is not None and r["system"] != "in-process" else ""
            cells.append(f"{fmt_seconds(f['p50_s'])} / {fmt_seconds(f['p99_s'])}{extra}")
        lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "Could not run:"] + [f"- {r['system']}: {r['status']}" for r in failed]
    left = [r for r in results if r.get("processes_left_behind")]
    if left:
        lines += ["", "Processes still running after the system's shutdown (killed by the suite):"]
        lines += [f"- {r['system']}: {r['processes_left_behind']}" for r in left]
    return "\n".join(lines) + "\n"


def charts(report: dict) -> None:
    """One panel per workload, systems as horizontal bars on a linear axis of
    its own (a shared log axis hid the differences that matter); a system
    without a figure for a workload says "n/a"; the in-process bar, far off
    the scale for the tiny job, is cut at the panel's edge and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r["status"] == "ok"]
    names = [r["system"] for r in results][::-1]  # the first system on top
    for key, title, filename, scale, unit in (
        ("throughput_per_s", "Jobs per second, 64 concurrent async callers (higher is better)", "throughput.png", 1,
         ""),
        ("p50_s", "Sequential latency p50 (lower is better)", "latency.png", 1e3, " ms"),
    ):
        fig, axes = plt.subplots(1, len(w.WORKLOADS), figsize=(3.2 * len(w.WORKLOADS), 0.45 * len(names) + 1.6),
                                 sharey=True)  # fmt: skip
        for ax, workload in zip(axes, w.WORKLOADS, strict=True):
            values = []
            for r in results[::-1]:
                figure = r["workloads"].get(workload, {}).get(key)
                values.append(None if figure is None else figure * scale)
            known = [v for v in values if v is not None]
            others = [v for v, name in zip(values, names, strict=True) if v is not None and name != "in-process"]
            limit = 1.3 * max(others or known or [1.0])
            for y, value in enumerate(values):
                if value is None:
                    ax.text(0.02 * limit, y, "n/a", va="center", fontsize=8, color="grey")
                    continue
                ax.barh(y, min(value, limit), color="tab:orange" if _ours(names[y]) else "tab:blue")
                label = f"{value:,.0f}{unit}" if value >= 10 else f"{value:.2g}{unit}"
                if value > limit:
                    ax.text(0.98 * limit, y, f"{label} (off scale)", va="center", ha="right", fontsize=7, color="white")
                else:
                    ax.text(min(value, limit) + 0.01 * limit, y, label, va="center", fontsize=7)
            ax.set_xlim(0, limit)
            ax.set_title(workload, fontsize=10)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(names)), names, fontsize=8)
        fig.suptitle(f"{title}\n{report['date']}, {report['cores']} cores, {WORKERS} workers", fontsize=11)
        fig.tight_layout()
        fig.savefig(RESULTS / filename, dpi=110)
        plt.close(fig)


def _ours(system: str) -> bool:
    """This project's rows (not the earlier mlpool 0.1.0, a peer)."""
    return system.startswith("mlpool") and "0.1.0" not in system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", help="comma-separated subset of: " + ", ".join(SYSTEMS))
    parser.add_argument("--quick", action="store_true", help="a tenth of the calls and time")
    parser.add_argument("--charts", action="store_true", help="only redraw the charts from latest.json")
    args = parser.parse_args()
    if args.charts:
        charts(json.loads((RESULTS / "latest.json").read_text()))
        return
    names = args.systems.split(",") if args.systems else list(SYSTEMS)
    budgets = {
        k: {"calls": max(5, v["calls"] // 10), "jobs": max(20, v["jobs"] // 10), "seconds": v["seconds"] / 10}
        for k, v in BUDGETS.items()
    } if args.quick else BUDGETS
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        forest_path = tmp / "forest.pkl"
        row = train_forest(forest_path)
        rounds = calibrate_hungry()
        config = {"workers": WORKERS, "forest_path": str(forest_path), "forest_row": row,
                  "hungry_rounds": rounds, "budgets": budgets}
        config_path = tmp / "config.json"
        config_path.write_text(json.dumps(config))
        results = [run_system(name, config_path, tmp) for name in names]
    derive(results, rounds)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "versions": versions(),
        "workers": WORKERS,
        "hungry_ms": HUNGRY_SECONDS * 1e3,
        "hungry_rounds": rounds,
        "budgets": budgets,
        "results": results,
    }
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (RESULTS / "latest.md").write_text(table)
    charts(report)
    print()
    print(table)
    print(f"wrote {RESULTS / 'latest.json'}, latest.md, throughput.png, latency.png")


if __name__ == "__main__":
    main()
