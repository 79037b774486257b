"""``configure(bind=...)`` arriving while a unit runs: the unit runs wholly on the engine its
session was bound to, the check of its lost COMMIT answer included; the new engine is the
next unit's.

The check of a lost COMMIT answer without the commit markers (the fallback: the transaction
id's status) looked the factory's engine up again at each check: a ``configure(bind=...)``
made while it backed off between two checks sent the next ones to the new engine's database,
where the unit never ran (on another server, an id of another counter: "future" there reads
as not committed, and the committed unit would be replayed on the new engine). Here the
factory is rebound by another thread while the unit backs off between its checks (the first
check's own COMMIT answer is lost too), the two threads meeting on events. Real server, two
databases; the old one behind the fault proxy.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

CONFIG = rdb.Config(initial_delay=0.001, max_delay=0.002, max_retries=5, circuit_breaker=False)
LEDGER = "CREATE TABLE ledger (unit text NOT NULL)"


@pytest.fixture(params=["markers", "fallback"])
def engines(
    request: pytest.FixtureRequest,
    pg_server: PostgresServer,
    pg_database: str,
    second_database: str,
    fault_proxy: FaultProxy,
) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """The old engine (through the proxy) and the new one, each database with its ledger and,
    for ``markers``, the commit markers (``fallback``: none, the transaction id's status is
    checked)."""
    made = (
        sa.create_engine(fault_proxy.url(pg_database)),
        sa.create_engine(pg_server.url(second_database)),
    )
    for engine in made:
        with engine.begin() as conn:
            conn.exec_driver_sql(LEDGER)
        if request.param == "markers":
            rdb.install_commit_markers(engine)
    yield made
    for engine in made:
        engine.dispose()


def rows(engine: sa.Engine, unit: str) -> int:
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT count(*) FROM ledger WHERE unit = :u"), {"u": unit})
        return int(found.scalar_one())


def test_a_rebind_while_a_lost_commit_is_checked_leaves_the_check_on_the_units_engine(
    engines: tuple[sa.Engine, sa.Engine], fault_proxy: FaultProxy
) -> None:
    old, new = engines
    backing_off = threading.Event()
    rebound = threading.Event()

    def sleep(_seconds: float) -> None:
        """The unit's backoff between two checks: the other thread rebinds meanwhile."""
        backing_off.set()
        assert rebound.wait(30)

    factory = rdb.ResilientSession(old, service="rebound-mid-unit", config=CONFIG, sleep=sleep)
    checked_out_of_new: list[Any] = []
    event.listen(new, "checkout", lambda dbapi, *_: checked_out_of_new.append(dbapi))
    unit = uuid.uuid4().hex
    calls: list[int] = []

    def write(session: Session) -> str:
        calls.append(1)
        session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
        return unit

    def rebind() -> None:
        assert backing_off.wait(30)
        factory.configure(bind=new)
        rebound.set()

    other = threading.Thread(target=rebind)
    other.start()
    fault_proxy.lose_commit_answer(2)  # the unit's COMMIT answer, then the first check's
    try:
        assert factory.run(write) == unit
    finally:
        rebound.set()
        other.join(30)
    assert checked_out_of_new == []  # (every check on the unit's engine, none on the new one)
    assert fault_proxy.commits_lost == 2
    assert calls == [1]  # found committed: done, never replayed
    assert (rows(old, unit), rows(new, unit)) == (1, 0)
    # the next unit runs on the new engine
    assert factory.run(write) == unit
    assert (rows(old, unit), rows(new, unit)) == (1, 1)


@pytest.mark.asyncio
async def test_an_async_units_check_stays_on_its_engine_through_a_rebind(
    engines: tuple[sa.Engine, sa.Engine], fault_proxy: FaultProxy
) -> None:
    """The same with asyncpg: the rebind made by another thread while the unit's task backs
    off between its checks."""
    old, new = (
        create_async_engine(engine.url.set(drivername="postgresql+asyncpg")) for engine in engines
    )
    backing_off = threading.Event()
    rebound = threading.Event()

    async def asleep(_seconds: float) -> None:
        backing_off.set()
        assert await asyncio.to_thread(rebound.wait, 30)

    factory = rdb.AsyncResilientSession(
        old, service="rebound-mid-unit-async", config=CONFIG, asleep=asleep
    )
    checked_out_of_new: list[Any] = []
    event.listen(new.sync_engine, "checkout", lambda dbapi, *_: checked_out_of_new.append(dbapi))
    unit = uuid.uuid4().hex
    calls: list[int] = []

    async def write(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
        return unit

    def rebind() -> None:
        assert backing_off.wait(30)
        factory.configure(bind=new)
        rebound.set()

    other = threading.Thread(target=rebind)
    other.start()
    fault_proxy.lose_commit_answer(2)
    try:
        assert await factory.run(write) == unit
    finally:
        rebound.set()
        other.join(30)
        await old.dispose()
    try:
        assert checked_out_of_new == []
        assert fault_proxy.commits_lost == 2
        assert calls == [1]
        assert (rows(engines[0], unit), rows(engines[1], unit)) == (1, 0)
        assert await factory.run(write) == unit
        assert (rows(engines[0], unit), rows(engines[1], unit)) == (1, 1)
    finally:
        await new.dispose()
