"""Large arrays through a worker, revisions side by side (interleaved).

    python bench/arrays_ab.py REV [REV...] [--rounds 5] [--repeats 15]

Each round runs ``_arrays_driver.py`` once per revision given, then once for
the working tree (a fresh process each time, a revision imported from a
temporary git worktree's ``src``). A driver
times REPEATS round trips of each case through one worker and keeps the
median:

- ``in``: an array of 8 MB or 64 MB goes to the worker, which sums it;
- ``out``: the worker returns an array of that size (made once);
- the in-process floor: a copy of the array plus the same sum (``in``), a
  copy alone (``out``).

Printed: the median over the rounds of each side's medians, and the median
of the per-round ratios of the working tree to the first revision. Timings on a shared machine move between
rounds; the interleaving puts both sides under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from instructions import ROOT, checkouts

DRIVER = Path(__file__).resolve().parent / "_arrays_driver.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="the revisions to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15, help="round trips per case in each round (median)")
    opts = parser.parse_args()
    with checkouts(opts.revs) as srcs:
        sides = dict(zip(opts.revs, srcs, strict=True))
        sides["working tree"] = ROOT / "src"
        results: dict[str, list[dict[str, float]]] = {label: [] for label in sides}
        for r in range(opts.rounds):
            for label, src in sides.items():
                out = subprocess.run(
                    [sys.executable, str(DRIVER), str(opts.repeats)], env=dict(os.environ, PYTHONPATH=str(src)),
                    capture_output=True, text=True, check=True, timeout=600,
                )  # fmt: skip
                results[label].append(json.loads(out.stdout.splitlines()[-1]))
            print(f"round {r + 1}/{opts.rounds} done", flush=True)
        med = statistics.median
        first, new = results[opts.revs[0]], results["working tree"]
        labels = list(results)
        print(f"\n| median of {opts.rounds} rounds (ms) | " + " | ".join(labels) + f" | working tree / {labels[0]} |")
        print("|---|" + "---:|" * (len(labels) + 1))
        for key in first[0]:
            figures = [med(r[key] for r in side) * 1e3 for side in results.values()]
            ratio = med(n[key] / o[key] for o, n in zip(first, new, strict=True))
            print(f"| {key} | " + " | ".join(f"{f:.2f}" for f in figures) + f" | {ratio:.2f} |")


if __name__ == "__main__":
    main()
