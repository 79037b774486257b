"""What ``import resilient_db`` costs a process (a CLI run, a worker started cold, a test run).

Each measurement is a fresh interpreter (``python -X importtime -c "import ..."``), so nothing is
cached in memory but the operating system's file cache and the bytecode cache (the first run,
warming both, is dropped).
Reported: the median over the runs of the time to import what an application using SQLAlchemy's
ORM and asyncio extension with psycopg 3 and asyncpg imports anyway, the time to import
``resilient_db`` on top of that (its own modules and what they import that the application does
not: pybreaker, tenacity, ...), and the library's own modules that took longest, by self time.

    python bench/import_time.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

BASELINE = "sqlalchemy, sqlalchemy.orm, sqlalchemy.ext.asyncio, psycopg, asyncpg"
#: as an installed application runs: with the bytecode cache (the first run writes it)
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def import_times(modules: str) -> tuple[float, dict[str, int]]:
    """``-X importtime`` of ``import modules`` in a fresh interpreter: the milliseconds the
    imports took (the modules imported at the top level, with everything they imported), and
    each module's self time in microseconds."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {modules}"],
        capture_output=True,
        text=True,
        check=True,
        env=_ENV,
    )
    total = 0
    own: dict[str, int] = {}
    for line in run.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line.removeprefix("import time:").split("|")
        own[name.strip()] = int(self_us)
        if not name.startswith("  "):  # (one space: imported at the top level)
            total += int(cumulative)
    return total / 1e3, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh interpreters per case")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    import_times(f"{BASELINE}, resilient_db")  # warms the file cache; not counted
    baseline: list[float] = []
    total: list[float] = []
    own: dict[str, list[int]] = {}
    for _ in range(args.runs):
        baseline.append(import_times(BASELINE)[0])
        took, both = import_times(f"{BASELINE}, resilient_db")
        total.append(took)
        for name, self_us in both.items():
            if name.startswith("resilient_db"):
                own.setdefault(name, []).append(self_us)
    base_ms, total_ms = statistics.median(baseline), statistics.median(total)
    print(f"import {BASELINE}: {base_ms:.0f} ms (median of {args.runs})")
    print(f"  ... and resilient_db: {total_ms:.0f} ms, +{total_ms - base_ms:.0f} ms")
    print("resilient_db's own modules, longest self time (median):")
    slowest = sorted(own.items(), key=lambda item: -statistics.median(item[1]))[:8]
    for name, values in slowest:
        print(f"  {statistics.median(values) / 1e3:6.1f} ms  {name}")


if __name__ == "__main__":
    main()
