"""Machine instructions per unit of work, resilient_db against plain SQLAlchemy, counted by
valgrind (callgrind) over several interpreter layouts.

    python bench/instructions.py                 # sync read, write, guarded write; 4 layouts
    python bench/instructions.py --units read --layouts 6
    python bench/instructions.py --driver asyncpg    # the async units
    python bench/instructions.py --driver asyncpg --concurrency 32   # 32 tasks at once
    python bench/instructions.py --json

Needs ``valgrind`` on the PATH (a system package, not a pip one: without it the script says so
and stops). About 2.5 minutes per unit and layout on two cores.

Why instructions: on this shared, noisy machine timed ratios move by a few percent between two
runs, and the overhead bench's Python line counts miss what the interpreter does in C. Counted
instructions are exact and repeatable: the same program on the same layout counts the same to a
few instructions in a billion, so a change of one per cent is seen at once.

Why several layouts: CPython keeps type attribute lookups (``_PyType_Lookup``: a dunder method
called from C, an attribute set on an instance, a Cython extension's attribute access) in one
direct-mapped cache of 4,096 entries, indexed by the type's version tag and the name's address.
Which (type, name) pairs collide there depends on the order types were first looked up and
where names were allocated: on the whole program, not on the code under test. A miss walks the
type's MRO (several dict lookups) instead of one probe, and in a unit of work a few hundred
lookups miss or not according to that layout. Measured on 2026-12-05 (sync read unit, six
layouts made by creating 0 to 8 throwaway classes before anything else): plain SQLAlchemy ran
1.076 to 1.216 million instructions per unit, resilient_db 1.201 to 1.296 million, the ratio
of the two from 1.010 to 1.132 by layout alone. One process, as the overhead bench runs, is one
draw of that lottery: the same program with the same inputs draws the same, and a change
anywhere in the program, or in its inputs (a server URL of another length), draws again. The
mean over layouts is the expected cost; this script reports it, with each layout's ratio
beside it.

Each count runs in a process of its own under valgrind: the unit is warmed up (plain and
resilient alike, so that both share one program state), then run ``--few`` and ``--many``
times; instructions per unit are the difference of the two totals over the difference in units
(start-up and warm-up cancel out). The two processes of a pair work on disjoint rows, so
concurrent writes never wait on each other's locks. The server (embedded PostgreSQL, as in the
overhead bench) runs outside valgrind; only the client is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "resilient")
#: units each child runs unmeasured first, per variant (statements compiled and cached, pool full)
WARMUP = 300


# -- the child: runs under valgrind -------------------------------------------------------------
def perturb_layout(layout: int) -> list[object]:
    """Make ``layout`` throwaway classes and look an attribute up on each, before anything
    else is imported: every later type gets another version tag, every later name another
    address, so the type cache's collisions are drawn again (see the module's docstring)."""
    made: list[object] = []
    for i in range(layout):
        cls = type(f"Layout{i}", (), {"attribute": i})
        getattr(cls, "attribute")  # noqa: B009 (a lookup assigns the class its version tag)
        made.append(cls)
    made.append("x" * (7 * layout))  # and shift the heap a little
    return made


def child(args: argparse.Namespace) -> None:
    """Run ``WARMUP`` units of each variant, then ``args.count`` of one, on the rows of
    ``args.slot`` of 2 (see the overhead bench's ``_own_keys``), by ``args.concurrency``
    threads (sync) or tasks (async) at once, each on rows of its own."""
    kept = perturb_layout(args.layout)
    sys.path.insert(0, str(HERE))
    import overhead as bench  # noqa: PLC0415 - after the layout is set

    keys = bench._own_keys(args.slot, 2)
    n = args.concurrency
    shares = [keys[w::n] for w in range(n)]  # each worker's rows
    if args.driver == "asyncpg":
        asyncio.run(_async_child(bench, args, shares))
        del kept
        return
    factories = bench.sync_factories(args.url, n)
    try:
        variants = bench.sync_variants(factories, bench.SYNC_UNITS[args.unit])

        def run(fn: Callable[[int], object], count: int) -> None:
            failed: list[BaseException] = []

            def work(rows: list[int], units: int) -> None:
                try:
                    for i in range(units):
                        fn(rows[i % len(rows)])
                except BaseException as exc:  # (raised below: a count of failed units is void)
                    failed.append(exc)

            threads = [
                threading.Thread(target=work, args=(rows, units))
                for rows, units in zip(shares, _spread(count, n), strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if failed:
                raise failed[0]

        for name in VARIANTS:
            run(variants[name], WARMUP)
        run(variants[args.variant], args.count)
    finally:
        factories.dispose()
    del kept


def _spread(count: int, workers: int) -> list[int]:
    """``count`` units shared out between ``workers`` as evenly as they go."""
    return [count // workers + (w < count % workers) for w in range(workers)]


async def _async_child(bench: Any, args: argparse.Namespace, shares: list[list[int]]) -> None:
    factories = bench.async_factories(args.url, len(shares))
    try:
        variants = bench.async_variants(factories, bench.ASYNC_UNITS[args.unit])

        async def run(fn: Callable[[int], Awaitable[object]], count: int) -> None:
            async def work(rows: list[int], units: int) -> None:
                for i in range(units):
                    await fn(rows[i % len(rows)])

            spread = _spread(count, len(shares))
            await asyncio.gather(*(work(r, u) for r, u in zip(shares, spread, strict=True)))

        for name in VARIANTS:
            await run(variants[name], WARMUP)
        await run(variants[args.variant], args.count)
    finally:
        await factories.dispose()


# -- the parent: the server, the valgrind runs, the report --------------------------------------
@dataclass(frozen=True)
class Target:
    """What a counted process runs: ``unit`` of ``driver`` against the server at ``url``."""

    url: str
    driver: str
    unit: str
    tmp: Path
    concurrency: int = 1


def count_instructions(target: Target, variant: str, layout: int, slot: int, count: int) -> int:
    """Instructions the child process ran in all (callgrind's total)."""
    out = target.tmp / f"{target.unit}.{layout}.{variant}.{count}.out"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--url={target.url}",
        f"--driver={target.driver}",
        f"--unit={target.unit}",
        f"--variant={variant}",
        f"--layout={layout}",
        f"--slot={slot}",
        f"--count={count}",
        f"--concurrency={target.concurrency}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(
            f"the counted process failed ({' '.join(command[5:])}):\n{done.stderr[-3000:]}"
        )
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"no instruction total in {out}")


def per_unit(target: Target, variant: str, layout: int, few: int, many: int) -> float:
    """Instructions per unit: two counts of ``few`` and ``many`` units, run side by side on the
    two slots' rows, start-up and warm-up cancelling out."""
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(
            lambda count, slot: count_instructions(target, variant, layout, slot, count),
            (few, many),
            (0, 1),
        )
    return (large - small) / (many - few)


def measure(
    url: str,
    driver: str,
    units: list[str],
    *,
    layouts: int,
    few: int,
    many: int,
    concurrency: int = 1,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "driver": driver,
        "few": few,
        "many": many,
        "concurrency": concurrency,
        "units": {},
    }
    with tempfile.TemporaryDirectory(prefix="rdb-instructions-") as tmp:
        for unit in units:
            target = Target(url, driver, unit, Path(tmp), concurrency)
            rows: list[dict[str, float]] = []
            for layout in range(layouts):
                row: dict[str, float] = {"layout": layout}
                for variant in VARIANTS:
                    row[variant] = per_unit(target, variant, layout, few, many)
                row["ratio"] = row["resilient"] / row["plain"]
                rows.append(row)
                print(
                    f"  {unit}, layout {layout}: plain {row['plain']:,.0f}, resilient "
                    f"{row['resilient']:,.0f} instructions per unit ({row['ratio']:.3f})",
                    file=sys.stderr,
                )
            plain = statistics.fmean(r["plain"] for r in rows)
            resilient = statistics.fmean(r["resilient"] for r in rows)
            result["units"][unit] = {
                "layouts": rows,
                "plain_mean": plain,
                "resilient_mean": resilient,
                "ratio_of_means": resilient / plain,
                "ratio_min": min(r["ratio"] for r in rows),
                "ratio_max": max(r["ratio"] for r in rows),
            }
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        f"Instructions per unit ({result['driver']}, {result['concurrency']} at once; callgrind, "
        "each count the difference of "
        f"{result['many']} and {result['few']} units), resilient_db against plain SQLAlchemy:"
    ]
    for unit, r in result["units"].items():
        lines.append(
            f"- {unit}: plain {r['plain_mean']:,.0f}, resilient_db {r['resilient_mean']:,.0f} "
            f"(mean over {len(r['layouts'])} layouts): {r['ratio_of_means']:.3f}; by layout "
            f"{r['ratio_min']:.3f} to {r['ratio_max']:.3f} "
            f"({', '.join(format(row['ratio'], '.3f') for row in r['layouts'])})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", default="read,write,guarded", help="comma-separated")
    parser.add_argument("--driver", choices=("psycopg", "asyncpg"), default="psycopg")
    parser.add_argument("--layouts", type=int, default=4, help="interpreter layouts (>= 1)")
    parser.add_argument("--few", type=int, default=200, help="units of the smaller count")
    parser.add_argument("--many", type=int, default=700, help="units of the larger count")
    parser.add_argument("--url", help="an existing server (postgresql+psycopg://...)")
    parser.add_argument("--json", action="store_true")
    # the child's own arguments (it runs under valgrind)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--unit", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--layout", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--slot", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="threads (sync) or tasks (async) running units at once (>= 1; default 1)",
    )
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    units = [u for u in args.units.split(",") if u]
    known = ("read", "write", "guarded")
    if not units or set(units) - set(known):
        parser.error(f"--units: one or more of {', '.join(known)}")
    if args.layouts < 1:
        parser.error("--layouts must be at least 1")
    if not 1 <= args.concurrency <= 100:
        parser.error("--concurrency must be between 1 and 100 (each worker has rows of its own)")
    if not 0 < args.few < args.many:
        parser.error("--few and --many: 0 < few < many")
    if shutil.which("valgrind") is None:
        raise SystemExit(
            "valgrind is not on the PATH: this benchmark counts instructions with valgrind's "
            "callgrind (a system package, e.g. apt install valgrind); bench/overhead.py needs "
            "nothing but Python"
        )
    sys.path.insert(0, str(HERE))
    import overhead as bench  # noqa: PLC0415 - bench/ is not a package
    import sqlalchemy as sa  # noqa: PLC0415

    from resilient_db.testing import EmbeddedPostgres  # noqa: PLC0415

    def run_on(url: str) -> dict[str, Any]:
        bench.prepare(url, markers=True)
        if args.driver == "asyncpg":
            async_url = sa.make_url(url).set(drivername="postgresql+asyncpg")
            url = async_url.render_as_string(hide_password=False)
        return measure(
            url,
            args.driver,
            units,
            layouts=args.layouts,
            few=args.few,
            many=args.many,
            concurrency=args.concurrency,
        )

    if args.url:
        result = run_on(args.url)
    else:
        with EmbeddedPostgres() as server:
            server.create_database("bench")
            result = run_on(server.url("bench"))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # (children: the same string hashes each run)
    sys.exit(main())
