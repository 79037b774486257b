"""resilient_db's Python lines per row in large units of work (``bench/large_units.py``), on the
suite's server: counted by ``sys.settrace``, never timed.

A unit of thousands of rows multiplies whatever resilient_db runs per row (a listener per
object, a check per parameter set or per fetched row): a flush of 10,000 new guarded rows
judged each one twice and went through SQLAlchemy's wrapper of mapper listeners (+50 lines
per row on 2026-12-06, +32 since). The budgets hold the per-row cost of the cases that matter
most, measured as the growth of (resilient - plain) between two sizes, so a unit's fixed cost
does not blur it.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from resilient_db.testing import PostgresServer

BENCH = Path(__file__).resolve().parent.parent / "bench"

#: lines per row resilient_db may add (measured 2026-12-06, SQLAlchemy 2.1.9, psycopg 3.3:
#: add_all of unguarded rows +1.0, of guarded rows +33, a flush of changed guarded rows +74
#: (the guard's judgment and compare-and-set of each row), reads 0; a few lines of headroom).
#: psycopg's own lines are not counted: its pipelined executemany runs more or fewer of them as
#: the server's answers arrive, which moved a fresh run's flush count to 81.9 on a busy machine
PER_ROW_BUDGET = {
    "add_all": 2.0,
    "add_all_guarded": 36.0,
    "flush_updates": 80.0,
    "select_entities": 0.5,
    "async_select_scalars": 0.5,
}


@pytest.fixture(scope="module")
def large_units() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        import large_units as module  # noqa: PLC0415 - bench/ is not a package

        yield module
    finally:
        sys.path.remove(str(BENCH))


# (every statement of some 40 units of hundreds of rows traced, and a full collection before
# each: 15-20 s on a quiet machine, past the suite's 120 s in a pytest-xdist worker late in a
# run on a loaded one; the count is of lines, whatever the time)
@pytest.mark.timeout(300)
def test_the_lines_resilient_db_adds_per_row_stay_within_budget(
    large_units: ModuleType, pg_server: PostgresServer
) -> None:
    database = f"t_bench_large_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(database)
    try:
        per_row = large_units.per_row_lines(
            pg_server.url(database),
            list(PER_ROW_BUDGET),
            large_units.Size(rows=100, read_rows=500),
            large_units.Size(rows=300, read_rows=1500),
        )
    finally:
        pg_server.ensure_running()
        pg_server.drop_database(database)
    assert set(per_row) == set(PER_ROW_BUDGET)
    over = {name: n for name, n in per_row.items() if n > PER_ROW_BUDGET[name]}
    assert not over, (over, per_row)
    # the guard still runs per row: a count of nothing would pass any budget
    assert per_row["flush_updates"] > 10, per_row
