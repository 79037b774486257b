"""The demo's fault schedule (``resilient_db.demo._faults``) against a real database: a fault
that takes long to heal does not hold the schedule up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.demo import apply_migrations, demo_config
from resilient_db.demo._faults import FaultLog, Schedule, Stage
from resilient_db.demo._workload import Ledger, Runner, setup_hot_rows, wait_until
from resilient_db.testing import PostgresServer


@pytest.fixture
def factory(pg_url: str) -> Iterator[rdb.ResilientSession[Session]]:
    apply_migrations(pg_url)
    engine = sa.create_engine(pg_url)
    yield rdb.ResilientSession(engine, service="demo-faults", config=demo_config())
    engine.dispose()


def test_the_schedule_goes_on_once_a_contention_pair_met(
    pg_server: PostgresServer, pg_database: str, factory: rdb.ResilientSession[Any]
) -> None:
    # With 100 workers on a loaded machine the serializable pair's loser, run again, conflicted
    # with the workers' own SERIALIZABLE claims for the rest of the run; the schedule waited for
    # it and injected nothing else (the fault_kinds invariant failed). Here the pair's writes
    # wait on row locks held elsewhere: the conflict is under way, its end is not in sight.
    ledger = Ledger()
    runner = Runner(factory, ledger, threading.Event())
    deadlock_rows, serial_rows = setup_hot_rows(runner)
    stop = threading.Event()
    log = FaultLog(clock=time.monotonic, on_event=lambda message: None)
    schedule = Schedule(
        seconds=60.0,
        stage=Stage(
            pg_server,
            cast(Any, None),
            pg_database,
            runner,
            cast(Any, None),
            deadlock_rows,
            serial_rows,
        ),
        application_name="demo-faults-test",
        log=log,
        stop=stop,
        service="demo-faults",
        crash_allowed=False,
    )
    engine = factory.kw["bind"]
    with engine.connect() as blocker:
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
    assert returned, "the schedule waited for the pair's units to end"
    assert log.injected["serialization_conflict"] == 1
    # both units end, written once each (the loser ran again after its 40001)
    assert wait_until(lambda: {"s1a", "s1b"} <= set(ledger.done), 30.0)
    stop.set()
