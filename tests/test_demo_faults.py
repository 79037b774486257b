"""The demo's fault schedule (``resilient_db.demo._faults``) against a real database: a fault
that takes long to heal does not hold the schedule up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.demo import _workload_async, apply_migrations, demo_config
from resilient_db.demo._faults import Contender, FaultLog, Schedule, Stage
from resilient_db.demo._loop import EventLoop
from resilient_db.demo._workload import Ledger, Runner, setup_hot_rows, wait_until
from resilient_db.testing import PostgresServer


@pytest.fixture
def factory(pg_url: str) -> Iterator[rdb.ResilientSession[Session]]:
    apply_migrations(pg_url)
    engine = sa.create_engine(pg_url)
    yield rdb.ResilientSession(engine, service="demo-faults", config=demo_config())
    engine.dispose()


def _schedule(
    pg_server: PostgresServer,
    pg_database: str,
    runner: Contender,
    rows: tuple[tuple[int, int], tuple[int, int]],
    service: str,
) -> Schedule:
    """The demo's fault schedule on ``runner`` and its hot rows (deadlock, serialization),
    no crash allowed."""
    deadlock_rows, serial_rows = rows
    stage = Stage(
        pg_server,
        cast(Any, None),
        pg_database,
        runner,
        cast(Any, None),
        deadlock_rows,
        serial_rows,
    )
    return Schedule(
        seconds=60.0,
        stage=stage,
        application_name="demo-faults-test",
        log=FaultLog(clock=time.monotonic, on_event=lambda message: None),
        stop=threading.Event(),
        service=service,
        crash_allowed=False,
    )


def _conflict_behind_row_locks(
    blocker: sa.Connection, schedule: Schedule, serial_rows: tuple[int, int]
) -> bool:
    """The schedule's serialization conflict injected while ``blocker`` holds the pair's rows
    locked (the conflict under way, its end not in sight); whether the schedule returned
    meanwhile. The pair's writes then go on and the fault's thread ends."""
    blocker.execute(
        sa.text("SELECT id FROM tasks WHERE id = ANY(:ids) FOR UPDATE"),
        {"ids": list(serial_rows)},
    )
    fault = threading.Thread(target=schedule.serialization_conflict, daemon=True)
    fault.start()
    fault.join(timeout=8.0)
    returned = not fault.is_alive()
    blocker.rollback()  # the pair's writes go on
    fault.join(timeout=30.0)
    return returned


def test_the_schedule_goes_on_once_a_contention_pair_met(
    pg_server: PostgresServer, pg_database: str, factory: rdb.ResilientSession[Any]
) -> None:
    # With 100 workers on a loaded machine the serializable pair's loser, run again, conflicted
    # with the workers' own SERIALIZABLE claims for the rest of the run; the schedule waited for
    # it and injected nothing else (the fault_kinds invariant failed). Here the pair's writes
    # wait on row locks held elsewhere: the conflict is under way, its end is not in sight.
    ledger = Ledger()
    runner = Runner(factory, ledger, threading.Event())
    rows = setup_hot_rows(runner)
    schedule = _schedule(pg_server, pg_database, runner, rows, "demo-faults")
    with factory.kw["bind"].connect() as blocker:
        returned = _conflict_behind_row_locks(blocker, schedule, rows[1])
    assert returned, "the schedule waited for the pair's units to end"
    assert schedule.log.injected["serialization_conflict"] == 1
    # both units end, written once each (the loser ran again after its 40001)
    assert wait_until(lambda: {"s1a", "s1b"} <= set(ledger.done), 30.0)
    schedule.stop.set()


def test_an_asyncio_contention_pair_runs_on_the_event_loop_and_the_schedule_goes_on(
    pg_server: PostgresServer, pg_database: str, pg_url: str, pg_async_url: str
) -> None:
    # --async: the schedule (a thread) starts the pair's units as tasks of the demo's event
    # loop, sees them meet at their barrier (an asyncio one) and goes on while the loser waits
    apply_migrations(pg_url)
    loop = EventLoop().start()
    engine = create_async_engine(pg_async_url)
    try:
        factory = rdb.AsyncResilientSession(
            engine, service="demo-faults-async", config=demo_config()
        )
        ledger = Ledger()
        runner = _workload_async.Runner(factory, ledger, threading.Event())
        rows = loop.call(_workload_async.setup_hot_rows(runner))
        schedule = _schedule(pg_server, pg_database, runner, rows, "demo-faults-async")
        blocker = sa.create_engine(pg_url)
        try:
            with blocker.connect() as conn:
                returned = _conflict_behind_row_locks(conn, schedule, rows[1])
        finally:
            blocker.dispose()
        assert returned, "the schedule waited for the pair's units to end"
        assert schedule.log.injected["serialization_conflict"] == 1
        assert wait_until(lambda: {"s1a", "s1b"} <= set(ledger.done), 30.0)
        (pair,) = schedule._contention
        pair.join()  # both tasks ended, nothing raised
        schedule.stop.set()
    finally:
        loop.call(engine.dispose())
        loop.close()
    assert not loop.is_alive()
    assert loop.error is None


class _Pair:
    """A failover that records when it was crashed, written on once ``writes`` is set."""

    def __init__(self) -> None:
        self.writes = threading.Event()
        self.asked = 0
        self.crashed = threading.Event()
        self.crashed_written: bool | None = None

    def written(self) -> bool:
        self.asked += 1
        return self.writes.is_set()

    def crash_primary(self) -> None:
        self.crashed_written = self.writes.is_set()
        self.crashed.set()

    def promote(self) -> float:
        return 0.0


class _NoIllegal:
    def attempt(self) -> None:
        pass


def _failover_schedule(seconds: float, pair: _Pair, stop: threading.Event) -> Schedule:
    # nothing but the schedule's timing is used: the faults before the failover are skipped
    # (no server to kill backends on), those after it never come (the test stops the run)
    return Schedule(
        seconds=seconds,
        stage=Stage(
            cast(Any, None),
            cast(Any, None),
            "none",
            cast(Any, None),
            cast(Any, _NoIllegal()),
            (0, 0),
            (0, 0),
        ),
        application_name="demo-faults-test",
        log=FaultLog(clock=time.monotonic, on_event=lambda message: None),
        stop=stop,
        service="demo-faults-failover",
        crash_allowed=False,
        failover=pair,
    )


def test_the_failover_waits_for_the_workers_first_writes() -> None:
    # On a loaded machine the demo's worker processes had written nothing when the failover
    # came (1.6 s into an 8 s run): no write on the old primary, a failover that showed nothing
    pair = _Pair()
    stop = threading.Event()
    schedule = _failover_schedule(60.0, pair, stop)
    schedule.start()
    try:
        # its time has come (about 3.75 s in), the schedule asks, again and again
        assert wait_until(lambda: pair.asked >= 5, 30.0), "the failover did not wait"
        assert not pair.crashed.is_set()
        pair.writes.set()
        assert pair.crashed.wait(30.0)
    finally:
        stop.set()
        schedule.join(timeout=30.0)
    assert pair.crashed_written is True
    assert schedule.log.injected["failover"] == 1
    assert schedule.error is None


def test_a_failover_still_comes_when_nobody_writes_while_it_still_fits() -> None:
    pair = _Pair()  # never written on
    stop = threading.Event()
    schedule = _failover_schedule(8.0, pair, stop)
    started = time.monotonic()
    schedule.start()
    try:
        assert pair.crashed.wait(30.0)
        crashed_after = time.monotonic() - started
    finally:
        stop.set()
        schedule.join(timeout=30.0)
    assert pair.crashed_written is False
    assert pair.asked > 1  # it waited first
    # at the last moment it fits: its outage and recovery (3 s) and a second before the end
    assert crashed_after >= 8.0 - 3.0 - 1.0
    assert schedule.log.injected["failover"] == 1


class _Redis:
    """The demo's Redis as the schedule sees it (stopped, started, rejoined at once); whether
    every worker process wrote since the stop is the test's to say."""

    def __init__(self) -> None:
        self.writes = threading.Event()
        self.asked = 0
        self.started = threading.Event()
        self.started_written: bool | None = None

    def stop(self) -> None:
        pass

    def start(self) -> None:
        self.started_written = self.writes.is_set()
        self.started.set()

    def rejoined(self) -> bool:
        return self.started.is_set()

    def written_meanwhile(self) -> bool:
        self.asked += 1
        return self.writes.is_set()


def _redis_outage(seconds: float, redis: _Redis, stop: threading.Event) -> Schedule:
    """A schedule of a ``seconds`` run whose Redis outage starts now (in a thread)."""
    schedule = Schedule(
        seconds=seconds,
        stage=cast(Any, None),
        application_name="demo-faults-test",
        log=FaultLog(clock=time.monotonic, on_event=lambda message: None),
        stop=stop,
        service="demo-faults-redis",
        crash_allowed=False,
        redis=redis,
    )
    threading.Thread(target=schedule.redis_outage, daemon=True).start()
    return schedule


def test_redis_stays_stopped_until_every_process_wrote_meanwhile() -> None:
    # On a loaded machine a worker process of the demo had written nothing when Redis was
    # started again (its 1.5 s outage right after the backends killed, its workers still
    # reconnecting): an outage that showed nothing of that process
    redis = _Redis()
    stop = threading.Event()
    schedule = _redis_outage(60.0, redis, stop)
    try:
        # its 1.5 s are over, the schedule asks, again and again
        assert wait_until(lambda: redis.asked >= 5, 30.0), "Redis was not kept stopped"
        assert not redis.started.is_set()
        redis.writes.set()
        assert redis.started.wait(30.0)
    finally:
        stop.set()
    assert redis.started_written is True
    assert schedule.log.injected["redis_outage"] == 1


def test_redis_is_started_again_when_nobody_writes_while_the_database_outage_still_fits() -> None:
    redis = _Redis()  # never written on
    stop = threading.Event()
    began = time.monotonic()
    _redis_outage(12.0, redis, stop)
    try:
        assert redis.started.wait(30.0)
        started_after = time.monotonic() - began
    finally:
        stop.set()
    assert redis.started_written is False
    assert redis.asked > 1  # it waited first
    # at the last moment the rest fits: the processes' rejoining (2.5 s), the database's
    # outage and recovery (3 s) and a second before the end
    assert started_after >= 12.0 - 2.5 - 3.0 - 1.0
