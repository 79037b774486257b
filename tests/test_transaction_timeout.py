"""The server ends a unit's session for a timeout of its transaction: PostgreSQL 17's
``transaction_timeout`` (SQLSTATE 25P04) firing while a statement, or the COMMIT, runs; and
``idle_in_transaction_session_timeout`` (25P03) ending a session just as the unit sends its
next statement. Either is the unit's doing, as a statement timeout is: raised at once, not
replayed, no failure for the circuit breaker; the connection is gone and is not reused.

psycopg (3.2.4+) reports the server's error. asyncpg (0.32+) raises a lost connection (its
``ConnectionDoesNotExistError``, 08003) from it: the server's code is the error's all the same.
A COMMIT cut off this way did not commit (the server ends the session only inside a transaction,
and never once the commit record is written: a COMMIT waiting for a synchronous standby after
that runs past the timeout), so it is not verified either.

Real server (PostgreSQL 17+ for ``transaction_timeout``, skipped on older ones; the idle
timeout's tests on any), real timeouts of a few hundred milliseconds; no backoff slept.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from scenarios import quick, server_settings_args, set_synchronous_standby_names, set_up_database
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

#: the sync driver and the async ones, side by side
DRIVERS = ["psycopg (sync)", "psycopg", "asyncpg"]
MARKERS = "markers"
FALLBACK = "fallback"
TIMEOUT_MS = "300"
#: ``transaction_timeout`` is PostgreSQL 17's; the idle-session timeout's tests run on older
#: servers too
NEEDS_TRANSACTION_TIMEOUT = pytest.mark.server_version(17, "transaction_timeout")

#: a deferred constraint trigger that sleeps at COMMIT, past the transaction's timeout
SLOW_COMMIT = """
CREATE TABLE slow_commits (id serial PRIMARY KEY, note text NOT NULL);
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(5);
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
CREATE TABLE notes (id serial PRIMARY KEY, note text NOT NULL);
"""
#: what a unit that ran past its timeout does: a write, then a statement that runs on; or a
#: write whose COMMIT runs on
UNITS = {
    "statement": [
        "INSERT INTO notes (note) VALUES ('written')",
        "SELECT pg_sleep(5)",
    ],
    "commit": ["INSERT INTO slow_commits (note) VALUES ('written')"],
}
#: events of a unit whose failure was taken for a lost connection, or whose COMMIT was checked
NOT_EXPECTED = {
    "retry",
    "gave_up",
    "breaker_opened",
    "commit_verified",
    "commit_not_applied",
    "commit_unknown",
    "commit_interrupted",
}
CONFIG = rdb.Config(max_retries=2, failure_threshold=2)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(".")[:3] if n.isdigit())


def skip_unless_the_servers_code_is_kept(driver: str) -> None:
    """asyncpg 0.32+ raises its lost connection from the server's error; 0.30 and 0.31 keep
    nothing of it (no code). psycopg 3.2.4+ raises the server's error; before, its "consuming
    input failed" has no code. There it stays a lost connection, replayed."""
    if driver == "asyncpg" and _version(asyncpg.__version__) < (0, 32):
        pytest.skip("asyncpg before 0.32 keeps no code of the server's error")
    if driver != "asyncpg" and _version(psycopg.__version__) < (3, 2, 4):
        pytest.skip("psycopg before 3.2.4 keeps no code of the server's error")


def prepare(server: PostgresServer, database: str, mode: str) -> None:
    set_up_database(server, database, SLOW_COMMIT, markers=mode == MARKERS)


def rows(server: PostgresServer, database: str) -> int:
    found = server.execute(
        "SELECT (SELECT count(*) FROM notes) + (SELECT count(*) FROM slow_commits)",
        database=database,
    )
    return int(found[0][0])


def settings(driver: str, **values: str) -> dict[str, Any]:
    return server_settings_args("psycopg" if driver == "psycopg (sync)" else driver, **values)


def assert_the_units_doing(
    exc: BaseException, code: str, calls: int, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """Raised at once with the server's code: not replayed, not verified, nothing for the
    breaker."""
    assert isinstance(exc, sa.exc.DBAPIError)
    assert rdb.sqlstate_of(exc) == code
    assert rdb.classify(exc) is rdb.Outcome.NOT_TRANSIENT
    assert not rdb.is_transient(exc)
    assert calls == 1
    state = rdb.health()["services"][service]
    counters = state["counters"]
    assert (counters["retries"], counters["gave_up"]) == (0, 0)
    assert counters["verified_not_committed"] == counters["verified_commits"] == 0
    assert (state["breaker"]["state"], state["breaker"]["failures"]) == ("closed", 0)
    assert not [e.name for e in events if e.name in NOT_EXPECTED]


def invalidations(engine: sa.Engine) -> list[BaseException | None]:
    """The errors for which ``engine``'s pool drops a connection, as it drops them."""
    found: list[BaseException | None] = []

    @sa.event.listens_for(engine, "invalidate")
    def invalidated(_dbapi: Any, _record: Any, exc: BaseException | None) -> None:
        found.append(exc)

    return found


@NEEDS_TRANSACTION_TIMEOUT
@pytest.mark.parametrize("mode", [MARKERS, FALLBACK])
@pytest.mark.parametrize("which", sorted(UNITS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.asyncio
async def test_a_unit_past_its_transaction_timeout_is_raised_not_replayed(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    events: list[rdb.SelfHealEvent],
    driver: str,
    which: str,
    mode: str,
) -> None:
    """``transaction_timeout`` ends the session while a statement runs, or while the COMMIT
    runs (a deferred trigger): SQLSTATE 25P04 on every driver, raised at once. asyncpg's lost
    connection raised from it was taken for an outage: the unit was replayed (each attempt
    waiting out the whole timeout), each attempt counted for the breaker (which opened for the
    service's other units), and a COMMIT cut off was verified first."""
    skip_unless_the_servers_code_is_kept(driver)
    prepare(pg_server, pg_database, mode)
    connect_args = settings(driver, transaction_timeout=TIMEOUT_MS)
    calls = 0
    caught: BaseException | None = None
    if driver == "psycopg (sync)":
        engine = sa.create_engine(pg_server.url(pg_database), connect_args=connect_args)
        dropped = invalidations(engine)
        try:

            def unit(session: Session) -> str:
                nonlocal calls
                calls += 1
                for statement in UNITS[which]:
                    session.execute(sa.text(statement))
                return "done"

            Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
            try:
                Sessions.run(unit)
            except Exception as exc:
                caught = exc
            assert len(dropped) == 1  # the ended session's connection, not reused
            other = rdb.ResilientSession(engine, service=service, config=CONFIG)
            assert other.run(lambda s: s.execute(sa.text("SELECT 42")).scalar_one()) == 42
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(
            pg_server.url(pg_database, driver=driver), connect_args=connect_args
        )
        made_async_engines.append(async_engine)
        dropped = invalidations(async_engine.sync_engine)

        async def async_unit(session: AsyncSession) -> str:
            nonlocal calls
            calls += 1
            for statement in UNITS[which]:
                await session.execute(sa.text(statement))
            return "done"

        AsyncSessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
        try:
            await AsyncSessions.run(async_unit)
        except Exception as exc:
            caught = exc
        assert len(dropped) == 1  # the ended session's connection, not reused
        # another unit of the service: the breaker is closed, the pool serves
        others = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
        assert await others.run(quick) == 42
    assert caught is not None
    assert_the_units_doing(caught, "25P04", calls, service, events)
    assert rows(pg_server, pg_database) == 0  # nothing committed


def _keeps_no_code(driver: str) -> bool:
    if driver == "asyncpg":
        return _version(asyncpg.__version__) < (0, 32)
    return _version(psycopg.__version__) < (3, 2, 4)


@NEEDS_TRANSACTION_TIMEOUT
@pytest.mark.parametrize("driver", ["psycopg (sync)", "asyncpg"])
@pytest.mark.asyncio
async def test_where_the_driver_keeps_no_code_a_unit_past_its_timeout_is_a_lost_connection(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    driver: str,
) -> None:
    """What docs/units-of-work.md says of psycopg before 3.2.4 and asyncpg before 0.32, which keep
    no code of the server's error: a lost connection, replayed (each attempt waiting out the
    timeout); nothing committed."""
    if not _keeps_no_code(driver):
        pytest.skip(f"{driver} keeps the server's code here (the tests above)")
    prepare(pg_server, pg_database, MARKERS)
    connect_args = settings(driver, transaction_timeout=TIMEOUT_MS)
    config = rdb.Config(max_retries=1, failure_threshold=10)
    calls = 0
    if driver == "psycopg (sync)":
        engine = sa.create_engine(pg_server.url(pg_database), connect_args=connect_args)

        def unit(session: Session) -> str:
            nonlocal calls
            calls += 1
            for statement in UNITS["statement"]:
                session.execute(sa.text(statement))
            return "done"

        try:
            with pytest.raises(sa.exc.DBAPIError) as raised:
                rdb.ResilientSession(engine, service=service, config=config).run(unit)
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(
            pg_server.url(pg_database, driver=driver), connect_args=connect_args
        )
        made_async_engines.append(async_engine)

        async def async_unit(session: AsyncSession) -> str:
            nonlocal calls
            calls += 1
            for statement in UNITS["statement"]:
                await session.execute(sa.text(statement))
            return "done"

        with pytest.raises(sa.exc.DBAPIError) as raised:
            await rdb.AsyncResilientSession(async_engine, service=service, config=config).run(
                async_unit
            )
    assert rdb.sqlstate_of(raised.value) != "25P04"
    assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
    assert calls == 2  # replayed
    assert rdb.health()["services"][service]["counters"]["retries"] == 1
    assert rows(pg_server, pg_database) == 0


def wait_until_ended(server: PostgresServer, database: str, pid: int) -> None:
    """Until the server has ended backend ``pid``'s session, blocking: an async driver's event
    loop does not run meanwhile, so asyncpg has not read the server's message nor the close when
    the unit sends its next statement."""
    gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {int(pid)}"
    deadline = time.monotonic() + 10
    while int(server.execute(gone, database=database)[0][0]) != 0:
        assert time.monotonic() < deadline, "the server did not end the idle session in 10 s"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", [MARKERS, FALLBACK])
@pytest.mark.parametrize("which", ["statement", "commit"])
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.asyncio
async def test_a_statement_sent_as_the_idle_timeout_ended_the_session_is_the_units_doing(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    events: list[rdb.SelfHealEvent],
    driver: str,
    which: str,
    mode: str,
) -> None:
    """``idle_in_transaction_session_timeout`` ended the session of a unit busy elsewhere (code
    that blocks its event loop, here); its next statement, or its COMMIT, is sent before the
    driver has read the server's message: psycopg reports 25P03, asyncpg a lost connection
    raised from it, which was replayed (and its COMMIT verified). Nothing committed (the
    session ended before the COMMIT came): raised at once, on every driver."""
    skip_unless_the_servers_code_is_kept(driver)
    prepare(pg_server, pg_database, mode)
    connect_args = settings(driver, idle_in_transaction_session_timeout="200")
    calls = 0
    caught: BaseException | None = None
    write = sa.text("INSERT INTO notes (note) VALUES ('written')")
    backend = sa.text("SELECT pg_backend_pid()")
    if driver == "psycopg (sync)":
        engine = sa.create_engine(pg_server.url(pg_database), connect_args=connect_args)
        dropped = invalidations(engine)
        try:

            def unit(session: Session) -> str:
                nonlocal calls
                calls += 1
                session.execute(write)
                if calls == 1:
                    wait_until_ended(pg_server, pg_database, session.execute(backend).scalar_one())
                if which == "statement":
                    session.execute(sa.text("SELECT 2"))
                return "done"

            try:
                rdb.ResilientSession(engine, service=service, config=CONFIG).run(unit)
            except Exception as exc:
                caught = exc
            assert len(dropped) == 1  # the ended session's connection, not reused
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(
            pg_server.url(pg_database, driver=driver), connect_args=connect_args
        )
        made_async_engines.append(async_engine)
        dropped = invalidations(async_engine.sync_engine)

        async def async_unit(session: AsyncSession) -> str:
            nonlocal calls
            calls += 1
            await session.execute(write)
            if calls == 1:
                pid = (await session.execute(backend)).scalar_one()
                wait_until_ended(pg_server, pg_database, pid)
            if which == "statement":
                await session.execute(sa.text("SELECT 2"))
            return "done"

        Sessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
        try:
            await Sessions.run(async_unit)
        except Exception as exc:
            caught = exc
        assert len(dropped) == 1  # the ended session's connection, not reused
        assert await Sessions.run(quick) == 42
    assert caught is not None, "replayed"
    assert_the_units_doing(caught, "25P03", calls, service, events)
    assert rows(pg_server, pg_database) == 0


@NEEDS_TRANSACTION_TIMEOUT
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.asyncio
async def test_the_pools_other_connections_outlive_a_units_transaction_timeout(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    driver: str,
) -> None:
    """The server ended one session, for its own transaction's timeout: that connection is
    dropped, the pool's others serve on. SQLAlchemy took it for a server gone away and
    replaced every connection of the pool (each of the engine's next units connected anew)."""
    skip_unless_the_servers_code_is_kept(driver)
    # (set by the unit alone: the connections pooled first hold transactions open meanwhile)
    timeout = sa.text(f"SET LOCAL transaction_timeout = {TIMEOUT_MS}")
    pid = sa.text("SELECT pg_backend_pid()")
    slow = sa.text("SELECT pg_sleep(5)")
    if driver == "psycopg (sync)":
        engine = sa.create_engine(pg_server.url(pg_database))
        try:
            Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
            first, second = engine.connect(), engine.connect()  # two connections pooled
            pooled = {first.execute(pid).scalar_one(), second.execute(pid).scalar_one()}
            first.close()
            second.close()
            with pytest.raises(sa.exc.DBAPIError) as info:
                Sessions.run(lambda session: (session.execute(timeout), session.execute(slow)))
            after = Sessions.run(lambda session: session.execute(pid).scalar_one())
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(pg_server.url(pg_database, driver=driver))
        made_async_engines.append(async_engine)
        AsyncSessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
        first_async, second_async = await async_engine.connect(), await async_engine.connect()
        pooled = {
            (await first_async.execute(pid)).scalar_one(),
            (await second_async.execute(pid)).scalar_one(),
        }
        await first_async.close()
        await second_async.close()

        async def runs_on(session: AsyncSession) -> None:
            await session.execute(timeout)
            await session.execute(slow)

        async def backend(session: AsyncSession) -> int:
            return int((await session.execute(pid)).scalar_one())

        with pytest.raises(sa.exc.DBAPIError) as info:
            await AsyncSessions.run(runs_on)
        after = await AsyncSessions.run(backend)
    assert rdb.sqlstate_of(info.value) == "25P04"
    assert after in pooled  # the other pooled connection, not a new one


# server-wide (ALTER SYSTEM): every COMMIT on the server waits for the missing standby
# meanwhile, the harness's spare databases' included (paused for a server_control test); never
# on an external server
@NEEDS_TRANSACTION_TIMEOUT
@pytest.mark.server_control
def test_a_commit_past_its_commit_record_outlives_the_transaction_timeout(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """Why a COMMIT ended by ``transaction_timeout`` is not verified: the server ends the
    session only inside a transaction, and holds the timeout off from the commit record on. A
    COMMIT that waits after its commit record (for a synchronous standby that is not there)
    runs on past the timeout, until its wait is cancelled: then it is committed."""
    with pg_server.connect(pg_database) as conn:
        conn.execute(SLOW_COMMIT)
    outcome: list[object] = []
    try:
        set_synchronous_standby_names(pg_server, "nobody")
        with pg_server.connect(pg_database) as conn:
            conn.execute(f"SET transaction_timeout = {TIMEOUT_MS}")
            conn.autocommit = False
            pid = conn.info.backend_pid
            conn.execute("INSERT INTO notes (note) VALUES ('written')")

            def commit() -> None:
                try:
                    conn.commit()
                    outcome.append("committed")
                except Exception as exc:
                    outcome.append(exc)

            committing = threading.Thread(target=commit)
            committing.start()
            waiting = (
                "SELECT count(*) FROM pg_stat_activity "
                f"WHERE pid = {int(pid)} AND wait_event = 'SyncRep'"
            )
            deadline = time.monotonic() + 10
            while int(pg_server.execute(waiting, database=pg_database)[0][0]) == 0:
                assert time.monotonic() < deadline, "the COMMIT did not wait for the standby"
                time.sleep(0.02)
            time.sleep(3 * int(TIMEOUT_MS) / 1000)  # three times the timeout: still waiting
            assert int(pg_server.execute(waiting, database=pg_database)[0][0]) == 1
            assert not outcome
            pg_server.execute(f"SELECT pg_cancel_backend({int(pid)})")
            committing.join(10)
    finally:
        set_synchronous_standby_names(pg_server, None)
    assert outcome == ["committed"]
    assert rows(pg_server, pg_database) == 1


@NEEDS_TRANSACTION_TIMEOUT
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.asyncio
async def test_a_drop_in_commit_ended_by_the_transaction_timeout_did_not_commit(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    events: list[rdb.SelfHealEvent],
    driver: str,
) -> None:
    """A factory's session used directly (no unit): its COMMIT, ended by
    ``transaction_timeout``, did not commit. asyncpg's was taken for a lost answer: an unknown
    outcome ("check before doing the work again", a web answer of
    ``commit-outcome-unknown``)."""
    skip_unless_the_servers_code_is_kept(driver)
    prepare(pg_server, pg_database, FALLBACK)
    connect_args = settings(driver, transaction_timeout=TIMEOUT_MS)
    write = sa.text(UNITS["commit"][0])
    if driver == "psycopg (sync)":
        engine = sa.create_engine(pg_server.url(pg_database), connect_args=connect_args)
        try:
            with rdb.ResilientSession(engine, service=service)() as session:
                session.execute(write)
                with pytest.raises(sa.exc.DBAPIError) as info:
                    session.commit()
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(
            pg_server.url(pg_database, driver=driver), connect_args=connect_args
        )
        made_async_engines.append(async_engine)
        async with rdb.AsyncResilientSession(async_engine, service=service)() as async_session:
            await async_session.execute(write)
            with pytest.raises(sa.exc.DBAPIError) as info:
                await async_session.commit()
    assert rdb.sqlstate_of(info.value) == "25P04"
    assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
    assert not [e.name for e in events if e.name in NOT_EXPECTED]
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 0
    assert rows(pg_server, pg_database) == 0
