"""The overhead benchmark's own counts, on the suite's server (``bench/overhead.py``).

Timings belong to the benchmark, never to tests; these two counts don't depend on the machine:
- round trips per unit, on the wire: a writing or guarded unit pays none more than plain
  SQLAlchemy's (the marker travels in the COMMIT message, the compare-and-set in the flush's
  UPDATE), a read none at all;
- the Python lines each unit runs, counted by ``sys.settrace``. What resilient_db adds to a
  plain unit is held to a budget here, so that work creeping back onto every statement fails
  at once instead of hiding in the benchmark's noise (an engine's connection events made every
  statement run their dispatch: +285 lines per sync write unit, found only by counting).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from resilient_db.testing import PostgresServer

BENCH = Path(__file__).resolve().parent.parent / "bench"

#: Python lines resilient_db may add to a plain unit (measured 2026-12-03 on SQLAlchemy 2.1,
#: psycopg 3.3, asyncpg 0.31, and on the oldest pins, SQLAlchemy 2.0.24: sync read +156, write
#: +269, guarded write +495 (+496), read with pg_sleep +200; the async units run fewer lines
#: than plain ``async_sessionmaker.begin()``: -289, -211, +18). About 45 of headroom: a
#: SQLAlchemy release may move its own share a little, and a regression like an engine event
#: (+285 per write unit) shows. (The sync budgets grew from 180 / 300 / 500 / 220 with the
#: checks units gained: a read/write split's drivers, a coroutine returned by a sync unit.)
#: The guarded write, measured again 2026-12-04 once the flush guard's one-row flush and
#: one-row UPDATE took shorter paths: sync +395 (+398 on 2.0.24, from +477 / +480), async -77
#: (-67, from +5 / +15); its budgets came down from 540 / 100.
LINE_BUDGET = {
    "sync": {"read": 200, "write": 315, "guarded": 445, "read_2ms_server_wait": 245},
    "async": {"read": 0, "write": 0, "guarded": 0},
}


@pytest.fixture(scope="module")
def overhead() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        import overhead as module  # noqa: PLC0415 - bench/ is not a package

        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def counts(overhead: ModuleType, pg_server: PostgresServer) -> Iterator[dict[str, Any]]:
    """The benchmark's counts, made once for this module's tests (a few seconds), in a
    database of their own."""
    database = f"t_bench_counts_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(database)
    try:
        url = pg_server.url(database)
        overhead.prepare(url, markers=True)
        trips, method = overhead.count_round_trips(
            url, pg_server.url(database, driver="asyncpg"), references=("pre_ping",)
        )
        assert "INCOMPLETE" not in method
        yield trips
    finally:
        pg_server.ensure_running()
        pg_server.drop_database(database)


def test_units_pay_no_round_trip_more_than_plain_sqlalchemy(counts: dict[str, Any]) -> None:
    expected = {"read": 3, "write": 5, "guarded": 5, "read_2ms_server_wait": 3}
    for driver in ("sync", "async"):
        for unit, per_unit in counts[driver].items():
            assert per_unit["plain"] == expected[unit], (driver, unit, per_unit)
            assert per_unit["resilient"] == per_unit["plain"], (driver, unit, per_unit)


def test_the_pre_ping_reference_pays_its_ping(counts: dict[str, Any]) -> None:
    """``--pre-ping``'s variant is what it says: plain SQLAlchemy whose pool pings every
    connection it checks out, at least one round trip more per unit than plain (resilient_db's
    check of a pooled connection sends nothing)."""
    for driver in ("sync", "async"):
        for unit, per_unit in counts[driver].items():
            # sync: one ping; async: SQLAlchemy's asyncpg ping runs in a transaction of its own
            # (BEGIN, the ping, ROLLBACK: three)
            assert per_unit["pre_ping"] >= per_unit["plain"] + 1, (driver, unit, per_unit)
            assert per_unit["pre_ping_lines"] > per_unit["plain_lines"], (driver, unit, per_unit)


def test_the_python_lines_resilient_db_adds_stay_within_budget(counts: dict[str, Any]) -> None:
    over = []
    for driver, budgets in LINE_BUDGET.items():
        for unit, budget in budgets.items():
            per_unit = counts[driver][unit]
            added = per_unit["resilient_lines"] - per_unit["plain_lines"]
            assert per_unit["plain_lines"] > 1000, (driver, unit, per_unit)  # it counted
            if added > budget:
                over.append(f"{driver} {unit}: +{added:.0f} lines (budget +{budget})")
    assert not over, "; ".join(over)


def test_the_line_counter_counts_the_lines_run_inside_it(overhead: ModuleType) -> None:
    def three_lines() -> list[int]:
        found = [1]
        found.append(2)
        return found

    found = sys.gettrace()  # (a coverage run's tracer, say: put back on leaving)
    with overhead.LineCounter() as counter:
        three_lines()
    assert counter.lines == 3
    # each line runs a few instructions (the call and the list's method among them)
    assert 3 < counter.instructions < 40
    assert sys.gettrace() is found


def test_the_benchmark_reports_resilient_dbs_warnings(overhead: ModuleType) -> None:
    """A run whose units left the success path says so (its figures measure something else)."""
    heard = overhead.Heard()
    logger = logging.getLogger("resilient_db")
    logger.addHandler(heard)
    try:
        logging.getLogger("resilient_db.session").warning("[SELF-HEAL] something happened")
        logging.getLogger("resilient_db.session").info("not a warning")
    finally:
        logger.removeHandler(heard)
    assert heard.messages == ["[SELF-HEAL] something happened"]


def test_the_cpu_split_sees_the_clients_time_and_the_servers(
    overhead: ModuleType, pg_server: PostgresServer
) -> None:
    """The throughput cases' CPU per unit: this process's time (user and system) and the time
    of every process of the server (found from a backend's parent), each where it was spent."""
    with pg_server.connect() as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        stat = Path(f"/proc/{row[0]}/stat")
        if not stat.exists():
            pytest.skip("the suite's server does not run on this machine")
        postmaster = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        split = overhead.CpuSplit(postmaster)
        here = overhead.CpuSplit(None)  # a server elsewhere (--url): the client only
        before, before_here = split.now(), here.now()
        conn.execute("SELECT count(*) FROM generate_series(1, 2000000)")  # the server's CPU
        busy_until = time.process_time() + 0.2
        while time.process_time() < busy_until:  # this process's CPU
            pass
        split.add("plain", before, 10)
        here.add("plain", before_here, 10)
    cpu = split.per_unit()["plain"]
    # per unit: 0.2 s over 10 units is 20,000 µs of this process's time at least
    assert 20_000 <= cpu["client"] < 200_000
    assert 0 <= cpu["client_system"] <= cpu["client"]
    # the server counted two million rows in its own time, not this process's
    assert cpu["server"] is not None
    assert cpu["server"] > 1_000
    assert here.per_unit()["plain"]["server"] is None
    # and the report shows both, for plain and resilient_db side by side
    split.totals["resilient"] = [10.0, 0.3, 0.1, 0.2]
    rows = [{"unit": "read", "case": "async_32_tasks", "cpu_us_per_unit": split.per_unit()}]
    table = overhead.cpu_lines(rows)
    assert table[-1].startswith("| read | async, 32 tasks, throughput | ")
    assert "→ 40000 (" in table[-1]  # client
    assert "→ 20000 (" in table[-1]  # server


@pytest.fixture(scope="module")
def instructions(overhead: ModuleType) -> ModuleType:
    import instructions as module  # noqa: PLC0415 - bench/ is not a package (on sys.path now)

    return module


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_the_instruction_count_runs_the_units_it_says_on_its_slots_rows(
    instructions: ModuleType, overhead: ModuleType, pg_server: PostgresServer, driver: str
) -> None:
    """``bench/instructions.py``'s counted process (run here in this process, without
    valgrind): the warm-up of both variants, then the counted units of one, each on the rows of
    its slot only, so the two processes counted side by side never wait on each other's locks."""
    import sqlalchemy as sa  # noqa: PLC0415

    database = f"t_bench_instr_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(database)
    engine = sa.create_engine(pg_server.url(database))
    try:
        overhead.prepare(pg_server.url(database), markers=True)
        url = pg_server.url(database, driver="asyncpg" if driver == "asyncpg" else "psycopg")
        args = ["--child", f"--url={url}", f"--driver={driver}", "--unit=write"]
        # (three workers at once: each on rows of its own, seven units shared out 3 / 2 / 2)
        instructions.main(
            [*args, "--variant=resilient", "--layout=2", "--slot=1", "--count=7", "--concurrency=3"]
        )
        with engine.connect() as conn:
            hits = dict(
                conn.execute(sa.text("SELECT id % 2, sum(hits) FROM bench_items GROUP BY 1")).all()
            )
            events = conn.execute(
                sa.text("SELECT count(*) FROM bench_events WHERE row_id % 2 = 0")
            ).scalar()
        assert hits == {0: 0, 1: 2 * instructions.WARMUP + 7}
        assert events == 0
    finally:
        engine.dispose()
        pg_server.ensure_running()
        pg_server.drop_database(database)


def test_the_instruction_count_refuses_what_it_cannot_count(
    instructions: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for bad in (
        ["--units=nope"],
        ["--units="],
        ["--layouts=0"],
        ["--few=5", "--many=5"],
        ["--concurrency=0"],
        ["--concurrency=101"],
    ):
        with pytest.raises(SystemExit) as exited:
            instructions.main(bad)
        assert exited.value.code == 2, bad
    said = capsys.readouterr().err
    assert "--layouts must be at least 1" in said
    assert "--concurrency must be between 1 and 100" in said
    assert instructions._spread(7, 3) == [3, 2, 2]
    monkeypatch.setenv("PATH", str(tmp_path))  # (a PATH without valgrind)
    with pytest.raises(SystemExit, match="valgrind is not on the PATH"):
        instructions.main(["--units=read"])


def test_the_instruction_count_fails_when_a_worker_thread_fails(
    instructions: ModuleType, pg_server: PostgresServer
) -> None:
    """A unit failing in one of the counted process's threads fails the process (its count
    would be of fewer units than it says), instead of dying with that thread."""
    import sqlalchemy as sa  # noqa: PLC0415

    url = pg_server.url(f"t_bench_missing_{uuid.uuid4().hex[:10]}")  # no such database
    args = ["--child", f"--url={url}", "--unit=read", "--variant=plain", "--count=3"]
    with pytest.raises(sa.exc.OperationalError, match="does not exist"):
        instructions.main([*args, "--concurrency=2"])
