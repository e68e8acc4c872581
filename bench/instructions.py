"""Hot-path cost of two commits side by side, in instructions per job (deterministic).

    python bench/instructions.py OLD_REV [NEW_REV] [--modes sync async ids] [--timed ROUNDS]

For each revision (NEW_REV defaults to the working tree), the caller's
process runs tiny jobs under ``valgrind --tool=callgrind`` twice, with a
few and with many jobs; the difference of the two totals over the
difference of the job counts is the user-space instructions one job costs
the calling process (all its threads: caller, event loop, manager), start-up
and pool creation cancelled out. The workers run natively: only the caller
is counted.

Unlike a timing, the count does not move with the machine's load (the same
figure twice on a loaded machine), so a change of a few percent to the hot
path shows in one run. It does not see system calls' kernel time, cache
misses or waits: confirm a gain with ``--timed ROUNDS``, an interleaved
timing (old, new, old, new...; each round a fresh process per side): sync
``score`` p50, then 64 coroutines' ``score_async`` throughput against
ProcessPoolExecutor's in the same round; the medians of the rounds, and the
median of the per-round new/old ratios. The modes:

- ``sync``: ``pool.score`` from one thread (the caller reads the worker's pipe);
- ``async``: ``score_async`` from 64 coroutines;
- ``ids``: ``create_job_async`` + ``get_result_async`` from 64 coroutines.

Each revision is checked out in a temporary git worktree (removed after)
and imported from its ``src``; only the public API is used, so any commit
since 0.2 works. Needs valgrind (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "_instructions_driver.py"
# Jobs in the short and the long run of each mode (the long one minus the short one is measured).
COUNTS = {"sync": (200, 1200), "async": (640, 3840), "ids": (640, 3840)}


def instructions(src: Path, mode: str, jobs: int) -> int:
    """Instructions the caller's process executed to run ``jobs`` jobs (start-up included)."""
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, str(DRIVER), mode,
         str(jobs)],
        env=env, capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no total:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def per_job(src: Path, mode: str) -> float:
    few, many = COUNTS[mode]
    return (instructions(src, mode, many) - instructions(src, mode, few)) / (many - few)


def timed_rounds(sides: dict[str, Path], rounds: int, seconds: float) -> None:
    """Interleaved timed rounds (see the module's docstring); prints the medians."""
    results: dict[str, list[dict]] = {label: [] for label in sides}
    for r in range(rounds):
        for label, src in sides.items():
            out = subprocess.run(
                [sys.executable, str(DRIVER), "timed", str(seconds)], env=dict(os.environ, PYTHONPATH=str(src)),
                capture_output=True, text=True, check=True, timeout=600,
            )  # fmt: skip
            results[label].append(json.loads(out.stdout.splitlines()[-1]))
        old, new = (side[-1] for side in results.values())
        print(f"timed round {r + 1}/{rounds}: sync p50 {old['sync_p50_us']:.0f} / {new['sync_p50_us']:.0f} µs, "
              f"ratio to ProcessPoolExecutor {old['ratio_to_ppe']:.2f} / {new['ratio_to_ppe']:.2f} (old / new)",
              flush=True)  # fmt: skip
    med = statistics.median
    keys = list(next(iter(results.values()))[0])
    print(f"\n{'median of ' + str(rounds) + ' rounds':<22} " + " ".join(f"{label:>24}" for label in results)
          + f" {'new / old':>10}")  # fmt: skip
    old, new = results.values()
    for key in keys:
        figures = [med(r[key] for r in side) for side in results.values()]
        ratio = med(n[key] / o[key] for o, n in zip(old, new, strict=True))
        print(f"{key:<22} " + " ".join(f"{f:>24,.2f}" for f in figures) + f" {ratio:>10.3f}")


def checkout(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev], check=True,
                   capture_output=True)  # fmt: skip
    return into / "src"


@contextmanager
def checkouts(revs: list[str]) -> Iterator[list[Path]]:
    """The ``src`` of each revision, each checked out in a temporary git
    worktree that is removed afterwards, whatever happens."""
    scratch = Path(tempfile.mkdtemp(prefix="mlpool-revs-"))
    trees: list[Path] = []
    try:
        srcs = []
        for i, rev in enumerate(revs):
            trees.append(scratch / f"rev{i}")
            srcs.append(checkout(rev, trees[-1]))
        yield srcs
    finally:
        for tree in trees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the revision to compare against (a commit, tag or branch)")
    parser.add_argument("new", nargs="?", default=None, help="the revision measured (default: the working tree)")
    parser.add_argument("--modes", nargs="*", default=list(COUNTS), choices=list(COUNTS))
    parser.add_argument("--timed", type=int, default=0, metavar="ROUNDS", help="also time ROUNDS interleaved rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of each throughput run (--timed)")
    opts = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    revs = [rev for rev in (opts.old, opts.new) if rev is not None]
    with checkouts(revs) as srcs:
        sides = {f"{name} ({rev})": src for name, rev, src in zip(("old", "new"), revs, srcs, strict=False)}
        if opts.new is None:
            sides["new (working tree)"] = ROOT / "src"
        if opts.modes:
            header = " ".join(f"{label:>24}" for label in sides)
            print(f"{'instructions per job':<22} {header} {'new / old':>10}", flush=True)
        for mode in opts.modes:
            figures = [per_job(src, mode) for src in sides.values()]
            print(f"{mode:<22} " + " ".join(f"{f:>24,.0f}" for f in figures) + f" {figures[1] / figures[0]:>10.3f}",
                  flush=True)  # fmt: skip
        if opts.timed:
            timed_rounds(sides, opts.timed, opts.seconds)


if __name__ == "__main__":
    main()
