"""A connection lost while it is being set up, between the driver's connect and the end of the
pool's ``connect`` listeners (SQLAlchemy's ``on_connect``, the commit protocol's set-up).

- asyncpg: SQLAlchemy's ``on_connect`` (the JSON codecs) meets a connection the server ended and
  asyncpg raises its bare ``InterfaceError`` from ``Connection._check_open``, which SQLAlchemy
  does not wrap. It is a disconnect: ``run`` retries it, ``is_transient`` says so, a lost
  COMMIT's check keeps checking after it. asyncpg's ``InterfaceError`` of an application's
  mistake (wrong argument count, two operations at once) stays not transient, raised in a
  ``connect`` listener too (where SQLAlchemy then closes the connection itself).
- the commit markers' set-up meets a lost connection: the markers are not reported missing (the
  once-per-engine warning stays for a real misconfiguration), the connection is not used on,
  and the unit is retried.
- the task connecting is cancelled in the middle of the markers' set-up: the new connection is
  closed at once (SQLAlchemy before 2.0.53 closes no connection whose ``connect`` listener raised).

Every fault is the test's own ``connect`` listener terminating its own backend at exactly that
moment (``pg_terminate_backend``, waiting until the backend has gone), or cancelling its own
task; backoff zeroed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._internals import sa_await as await_only
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")

CONFIG = rdb.Config(initial_delay=0.001, max_delay=0.002, failure_threshold=100)
PID = sa.text("SELECT pg_backend_pid()")
GONE = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p")


def _terminate(admin: sa.Engine, pid: int) -> None:
    """Terminate backend ``pid`` and return once it has gone."""
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        deadline = time.monotonic() + 10
        while conn.execute(GONE, {"p": pid}).scalar_one():
            assert time.monotonic() < deadline, "the backend did not exit"
            time.sleep(0.005)


class Killer:
    """A ``connect`` listener that, while ``armed`` is above zero, terminates the backend of the
    connection being set up and returns once it has gone (and, for asyncpg, once the driver
    has seen its connection close, unless not ``driver_sees_it``: its next statement is then
    the first to meet the dead connection): what the listeners after it do next meets a dead
    connection."""

    def __init__(self, admin: sa.Engine, *, driver_sees_it: bool = True) -> None:
        self.admin = admin
        self.driver_sees_it = driver_sees_it
        self.armed = 0
        self.killed = 0

    def __call__(self, dbapi_connection: Any, record: Any) -> None:
        if self.armed <= 0:
            return
        self.armed -= 1
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        is_asyncpg = isinstance(driver, asyncpg.Connection)
        _terminate(self.admin, driver.get_server_pid() if is_asyncpg else driver.info.backend_pid)
        if is_asyncpg and self.driver_sees_it:
            deadline = time.monotonic() + 10
            while not driver.is_closed():
                assert time.monotonic() < deadline, "asyncpg did not see its connection close"
                await_only(asyncio.sleep(0.005))
        self.killed += 1


@pytest.fixture
def admin(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield eng
    eng.dispose()


def _counters(service: str) -> dict[str, Any]:
    return dict(rdb.health()["services"][service]["counters"])


# -- asyncpg's InterfaceError of a closed connection, raised by SQLAlchemy's on_connect ---------
@pytest_asyncio.fixture
async def async_engine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    yield eng
    await eng.dispose()


async def _warm_up(engine: AsyncEngine) -> None:
    """The engine's first connect (SQLAlchemy's dialect initialisation) done, and its
    connection dropped: the next checkout connects anew."""
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
    await engine.dispose()


@pytest.mark.asyncio
async def test_asyncpg_on_connect_meeting_a_closed_connection_is_retried(
    async_engine: AsyncEngine, admin: sa.Engine, service: str
) -> None:
    await _warm_up(async_engine)
    killer = Killer(admin)
    # before SQLAlchemy's own on_connect: its JSON codec set-up meets the dead connection
    event.listen(async_engine.sync_engine, "connect", killer, insert=True)
    Sessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        return int((await session.execute(sa.text("SELECT 7"))).scalar_one())

    killer.armed = 1
    assert await Sessions.run(unit) == 7
    assert killer.killed == 1
    assert len(calls) == 2  # the first attempt's connect failed, the second one ran it
    counters = _counters(service)
    assert counters["retries"] == 1
    assert counters["recovered"] == 1


@pytest.mark.asyncio
async def test_asyncpg_closed_connection_error_at_connect_is_a_disconnect(
    async_engine: AsyncEngine, admin: sa.Engine
) -> None:
    """The error itself, as a drop-in caller (or plain SQLAlchemy) sees it."""
    await _warm_up(async_engine)
    killer = Killer(admin)
    event.listen(async_engine.sync_engine, "connect", killer, insert=True)
    killer.armed = 1
    with pytest.raises(asyncpg.InterfaceError) as info:  # asyncpg's own, not wrapped
        async with async_engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    err = info.value
    assert rdb.classify(err) is rdb.Outcome.DISCONNECT
    assert rdb.is_transient(err)


@pytest.mark.asyncio
async def test_asyncpg_interface_errors_of_a_sound_connection_are_not_transient(
    async_engine: AsyncEngine,
) -> None:
    """The application's mistakes asyncpg reports as InterfaceError, on an open connection."""
    async with async_engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert isinstance(driver, asyncpg.Connection)
        with pytest.raises(asyncpg.InterfaceError) as wrong_count:
            await driver.fetchval("SELECT $1::int")  # no argument for $1
        busy = asyncio.ensure_future(driver.execute("SELECT pg_sleep(0.2)"))
        await asyncio.sleep(0)  # (its task runs up to waiting for the server's answer)
        with pytest.raises(asyncpg.InterfaceError) as in_progress:
            await driver.execute("SELECT 1")  # another operation is in progress
        await busy
        assert not driver.is_closed()
    for err in (wrong_count.value, in_progress.value):
        assert rdb.classify(err) is rdb.Outcome.NOT_TRANSIENT, err
        assert not rdb.is_transient(err)


@pytest.mark.asyncio
async def test_an_interface_error_of_an_applications_connect_listener_raises_at_once(
    async_engine: AsyncEngine, service: str
) -> None:
    """A connect listener of the application makes a mistake and closes its connection (as
    SQLAlchemy itself does after a ``connect`` listener raised since sqlalchemy#13548 was fixed;
    before 2.0.53 it is left open, held by nothing), so it is closed when the error is
    classified, yet the error is not a lost connection."""
    await _warm_up(async_engine)

    def mistaken(dbapi_connection: Any, record: Any) -> None:
        driver = dbapi_connection.driver_connection
        try:
            await_only(driver.fetchval("SELECT $1::int"))
        finally:
            await_only(driver.close())

    event.listen(async_engine.sync_engine, "connect", mistaken)
    Sessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(sa.text("SELECT 1"))

    with pytest.raises(asyncpg.InterfaceError) as info:
        await Sessions.run(unit)
    assert len(calls) == 1  # not retried
    assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
    assert _counters(service)["retries"] == 0


@pytest.mark.asyncio
async def test_a_lost_commits_check_meeting_the_error_keeps_checking(
    fault_proxy: FaultProxy, pg_database: str, admin: sa.Engine, service: str
) -> None:
    """The check of a lost COMMIT answer connects anew; that connect meets a dead connection
    (asyncpg's bare InterfaceError): the check is made again, not given up as unknown."""
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE TABLE ledger (id uuid PRIMARY KEY)"))
    engine = create_async_engine(fault_proxy.url(pg_database, driver="asyncpg"))
    try:
        await _warm_up(engine)
        killer = Killer(admin)
        event.listen(engine.sync_engine, "connect", killer, insert=True)
        Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
        row = str(uuid.uuid4())
        calls: list[int] = []

        async def unit(session: AsyncSession) -> None:
            calls.append(1)
            await session.execute(sa.text("INSERT INTO ledger VALUES (:i)"), {"i": row})
            killer.armed = 1  # the next connect is the check's
            fault_proxy.lose_commit_answer()

        await Sessions.run(unit)
        assert fault_proxy.commits_lost == 1
        assert killer.killed == 1
        assert len(calls) == 1  # verified committed, never replayed
        assert _counters(service)["verified_commits"] == 1
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar_one() == 1
    finally:
        await engine.dispose()


# -- the commit markers' set-up meeting a lost connection -----------------------------------------
@pytest.fixture
def markers_engine(pg_url: str, admin: sa.Engine) -> Iterator[sa.Engine]:
    rdb.install_commit_markers(admin)
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def test_markers_set_up_on_a_lost_connection_is_retried_not_reported_missing(
    markers_engine: sa.Engine,
    admin: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    killer = Killer(admin)
    # after SQLAlchemy's own listeners, before the commit protocol's (the factory's, added next)
    event.listen(markers_engine, "connect", killer)
    Sessions = rdb.ResilientSession(markers_engine, service=service, config=CONFIG)
    modes: list[Any] = []

    def unit(session: Session) -> int:
        driver = session.connection().connection.driver_connection
        modes.append(getattr(driver, "_rdb_mode", None))
        return int(session.execute(sa.text("SELECT 7")).scalar_one())

    killer.armed = 1
    assert Sessions.run(unit) == 7
    assert killer.killed == 1
    assert modes == ["markers"]  # the only connection used was set up and verified
    assert _counters(service)["retries"] == 1
    assert [e for e in events if e.name == "commit_markers_missing"] == []
    # the once-per-engine warning is still there for a real misconfiguration
    with admin.connect() as conn:
        conn.execute(sa.text("DROP SCHEMA resilient_db CASCADE"))
    markers_engine.dispose()
    assert Sessions.run(unit) == 7
    assert modes[-1] == "xid"
    assert [e.name for e in events if e.name == "commit_markers_missing"] == [
        "commit_markers_missing"
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "driver_sees_it",
    [
        True,  # asyncpg's InterfaceError, raised as the set-up begins
        False,  # the set-up's first statement meets the lost connection
    ],
)
async def test_async_markers_set_up_on_a_lost_connection_is_retried_not_reported_missing(
    async_engine: AsyncEngine,
    admin: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
    driver_sees_it: bool,
) -> None:
    rdb.install_commit_markers(admin)
    await _warm_up(async_engine)
    killer = Killer(admin, driver_sees_it=driver_sees_it)
    event.listen(async_engine.sync_engine, "connect", killer)  # before the factory's listener
    Sessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
    modes: list[Any] = []

    async def unit(session: AsyncSession) -> int:
        raw = await (await session.connection()).get_raw_connection()
        modes.append(getattr(raw.driver_connection, "_rdb_mode", None))
        return int((await session.execute(sa.text("SELECT 7"))).scalar_one())

    killer.armed = 1
    assert await Sessions.run(unit) == 7
    assert killer.killed == 1
    assert modes == ["markers"]
    assert _counters(service)["retries"] == 1
    assert [e for e in events if e.name == "commit_markers_missing"] == []


@pytest.mark.asyncio
@pytest.mark.parametrize("async_driver", ["asyncpg", "psycopg"])
async def test_a_connect_cancelled_in_the_markers_set_up_closes_its_connection(
    async_engine: AsyncEngine, admin: sa.Engine, service: str, async_driver: str
) -> None:
    """The task connecting is cancelled while the commit markers' set-up waits on the server:
    the cancellation goes on to the caller, and the new connection, which the pool never got,
    is closed there and then, its backend gone from the server (SQLAlchemy before 2.0.53 closes no
    connection whose ``connect`` listener raised: it was left open to the garbage collector)."""
    rdb.install_commit_markers(admin)
    await _warm_up(async_engine)
    made: list[tuple[Any, int]] = []

    def cancel(dbapi_connection: Any, record: Any) -> None:
        if made:
            return
        driver = dbapi_connection.driver_connection
        is_asyncpg = isinstance(driver, asyncpg.Connection)
        made.append((driver, driver.get_server_pid() if is_asyncpg else driver.info.backend_pid))
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # delivered at the task's next wait: the set-up's first statement

    event.listen(async_engine.sync_engine, "connect", cancel)  # before the factory's listener
    Sessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(sa.text("SELECT 1"))

    run = asyncio.ensure_future(Sessions.run(unit))
    with pytest.raises(asyncio.CancelledError):
        await run
    assert calls == [1]  # its first statement connected; not run again
    [(driver, pid)] = made
    assert getattr(driver, "_rdb_mode", None) is None  # the set-up never finished
    assert driver.is_closed() if async_driver == "asyncpg" else driver.closed
    with admin.connect() as conn:
        deadline = time.monotonic() + 10
        while conn.execute(GONE, {"p": pid}).scalar_one():
            assert time.monotonic() < deadline, "the set-up's backend is still there"
            time.sleep(0.005)


# -- the check of a lost COMMIT answer meeting a connection lost under it --------------------------
def test_a_check_whose_connection_is_lost_under_it_leaves_no_pool_error(
    pg_server: Any,
    pg_database: str,
    admin: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The check settling a lost COMMIT answer gets a connection whose backend is terminated as
    it is checked out, and psycopg has seen it (setting the check's isolation level raises
    psycopg's own "the connection is lost", unwrapped). The check's connection is dropped, not
    handed back to the pool (whose reset would fail, and SQLAlchemy log that with a
    traceback); the next check verifies the COMMIT."""
    rdb.install_commit_markers(admin)
    with FaultProxy(pg_server) as proxy:
        engine = sa.create_engine(proxy.url(pg_database))
        Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
        armed: list[int] = []

        @event.listens_for(engine, "checkout")
        def kill(dbapi_connection: Any, record: Any, proxied: Any) -> None:
            if not armed:
                return
            armed.clear()
            _terminate(admin, dbapi_connection.info.backend_pid)
            pgconn = dbapi_connection.pgconn
            for _ in range(100):  # libpq reads the server's goodbye, then the end of the stream
                if pgconn.status == psycopg.pq.ConnStatus.BAD:
                    break
                with contextlib.suppress(psycopg.OperationalError):
                    pgconn.consume_input()
                time.sleep(0.005)
            assert pgconn.status == psycopg.pq.ConnStatus.BAD

        key = str(uuid.uuid4())
        calls: list[int] = []

        def unit(session: Session) -> None:
            calls.append(1)
            session.execute(sa.text("CREATE TABLE IF NOT EXISTS lost_checks (k text)"))
            session.execute(sa.text("INSERT INTO lost_checks VALUES (:k)"), {"k": key})
            proxy.lose_commit_answer()
            armed.append(1)  # the next checkout is the check's

        caplog.set_level(logging.WARNING, logger="sqlalchemy.pool")
        try:
            Sessions.run(unit)
        finally:
            engine.dispose()
    assert calls == [1]  # verified, not replayed
    assert not armed, "the check never checked a connection out"
    with admin.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM lost_checks WHERE k = :k"), {"k": key})
        assert rows.scalar_one() == 1
    assert _counters(service)["verified_commits"] == 1
    assert [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy.pool")] == []


# -- a check that reached the server, then checks that could not -------------------------------
def test_an_unknown_outcome_says_what_the_check_that_reached_the_server_found(
    pg_server: Any, pg_database: str, admin: sa.Engine, service: str
) -> None:
    """Without markers: the COMMIT never reached the server (the transaction stays open there),
    the first check finds it in progress, then the network fails and no later check connects.
    The unknown outcome says it was found in progress and that later checks could not reach the
    server (it said no check had reached the server at all)."""
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE TABLE in_progress_units (id int)"))
    with FaultProxy(pg_server) as proxy:
        engine = sa.create_engine(proxy.url(pg_database))
        backoffs: list[float] = []

        def sleep(seconds: float) -> None:  # between checks: the network fails after check 1
            backoffs.append(seconds)
            proxy.refuse(cut=True)

        Sessions = rdb.ResilientSession(
            engine,
            service=service,
            # the first check waits for the open transaction most of that time; the later
            # ones are refused at once
            config=rdb.Config(initial_delay=0.01, max_delay=0.02, deadline=2.0),
            sleep=sleep,
        )

        def unit(session: Session) -> None:
            session.execute(sa.text("INSERT INTO in_progress_units VALUES (1)"))
            proxy.swallow_commit()

        def release() -> None:
            deadline = time.monotonic() + 10
            while not proxy.commits_swallowed and time.monotonic() < deadline:
                time.sleep(0.005)
            proxy.release_swallowed(keep_server=True)  # the transaction stays open there

        releaser = threading.Thread(target=release)
        releaser.start()
        try:
            with rdb.set_testing(False), pytest.raises(rdb.CommitOutcomeUnknownError) as info:
                Sessions.run(unit)  # (backoffs between checks as configured, through sleep)
        finally:
            releaser.join(15)
            proxy.restore()
            engine.dispose()
    assert backoffs, "no check after the first"
    text = str(info.value)
    assert "in progress" in text
    assert "a later check could not reach the server" in text
    assert "no check on a new connection reached the server" not in text


@pytest.mark.asyncio
async def test_a_raw_asyncpg_connection_used_after_it_was_closed_is_the_applications_mistake(
    async_engine: AsyncEngine, service: str
) -> None:
    """A raw asyncpg connection kept from an earlier unit and used after it was closed: the
    same InterfaceError of a closed connection, raised outside connecting, is the application's
    mistake, raised at once (it was replayed and opened the circuit of a healthy database)."""
    Sessions = rdb.AsyncResilientSession(
        async_engine, service=service, config=rdb.Config(max_retries=3, failure_threshold=3)
    )
    kept: list[Any] = []

    async def first(session: AsyncSession) -> None:
        conn = await session.connection()
        kept.append((await conn.get_raw_connection()).driver_connection)

    await Sessions.run(first)
    await kept[0].close()
    calls: list[int] = []

    async def second(session: AsyncSession) -> object:
        calls.append(1)
        return await kept[0].fetchval("SELECT 1")

    with pytest.raises(asyncpg.InterfaceError) as info:
        await Sessions.run(second)
    assert calls == [1]
    assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
    assert rdb.health()["services"][service]["breaker"]["failures"] == 0
