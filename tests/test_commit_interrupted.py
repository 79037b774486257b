"""A unit whose COMMIT is interrupted: by a timeout of the application's, by a cancelled task, by
the server. Against the suite's real server, through the real drivers (sync psycopg, and both of
SQLAlchemy's async drivers).

The guarantees: a unit is reported done only when committed, replayed only when provably not
committed, else ``CommitOutcomeUnknownError``; and an outcome that can be known is known:

* a claim (``resilient_db.claim_commit``, which waits for an original COMMIT still running) gets
  its whole wait, whatever the application's ``statement_timeout`` or asyncpg's
  ``command_timeout`` (they used to cut it short, and the outcome was "unknown");
* a COMMIT that the driver refused to send (asyncpg, on a connection the server had closed while
  the unit was between statements) committed nothing: the unit is replayed, not "unknown";
* a cancelled unit raises its ``CancelledError`` at once (nothing verified, nothing replayed), no
  connection is left checked out, the breaker counts nothing, and a line names the transaction
  whose COMMIT was in flight;
* a COMMIT the server refused (a deferred constraint, a cancel) is that error: not verified, not
  replayed;
* drop-in code's COMMIT cut off by an interruption (a cancellation, a deadline, Ctrl-C), however
  it commits (``await session.commit()``, ``async with Session.begin()``, ``session.begin()``):
  the interruption goes on, marked, said and counted as an unknown outcome.

The slow COMMIT is a deferred constraint trigger that sleeps at COMMIT; a cancel of the COMMIT
either ends it with an error (nothing committed) or is taken and the COMMIT goes on and commits
(as a COMMIT waiting for a synchronous standby does).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from scenarios import (
    ASYNC_DRIVERS,
    async_connect_args,
    quick,
    server_settings_args,
    set_up_database,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._commit import _CHECK_SQL
from resilient_db._unit import commit_interrupted, mark_commit_interrupted
from resilient_db.testing import FaultProxy, PostgresServer
from resilient_db.web import problem_details

pytestmark = pytest.mark.usefixtures("no_backoff")

#: ``after``: seconds the COMMIT goes on after a cancel (then commits); negative: a cancel ends it.
#: A COMMIT whose ``first`` seconds ran out uncancelled takes a number of ``slept_out`` (a
#: sequence: seen at once by every session, whatever becomes of the transaction).
SLOW_COMMIT = """
CREATE TABLE slow_commits (
    id serial PRIMARY KEY, first float8 NOT NULL, after float8 NOT NULL);
CREATE SEQUENCE slept_out;
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        PERFORM pg_sleep(NEW.first);
        PERFORM nextval('slept_out');
    EXCEPTION WHEN query_canceled THEN
        IF NEW.after < 0 THEN
            RAISE;
        END IF;
        PERFORM pg_sleep(NEW.after);
    END;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
CREATE TABLE unique_at_commit (
    id integer, CONSTRAINT unique_at_commit_id UNIQUE (id) DEFERRABLE INITIALLY DEFERRED);
INSERT INTO unique_at_commit VALUES (1);
"""
MARKERS = "markers"
FALLBACK = "fallback"


def slow_insert(first: float, after: float) -> sa.TextClause:
    return sa.text(f"INSERT INTO slow_commits (first, after) VALUES ({first}, {after})")


def prepare(server: PostgresServer, database: str, mode: str) -> None:
    set_up_database(server, database, SLOW_COMMIT, markers=mode == MARKERS)


def count(server: PostgresServer, database: str, sql: str) -> int:
    return int(server.execute(sql, database=database)[0][0])


def slow_rows(server: PostgresServer, database: str) -> int:
    return count(server, database, "SELECT count(*) FROM slow_commits")


def slept_out(server: PostgresServer, database: str) -> bool:
    """A slow COMMIT's first sleep ran to its end, uncancelled (see SLOW_COMMIT)."""
    return bool(server.execute("SELECT is_called FROM slept_out", database=database)[0][0])


def committing(server: PostgresServer, database: str) -> bool:
    """A backend of ``database`` is in the slow COMMIT's sleep."""
    return bool(
        count(
            server,
            database,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event = 'PgSleep' AND query ILIKE '%COMMIT%'",
        )
    )


def commit_ended(server: PostgresServer, database: str) -> bool:
    """No backend of ``database`` is running a COMMIT any more: not in the slow COMMIT's
    sleep, nor finishing it after the sleep (a COMMIT that caught its cancel sleeps again,
    then commits: between the sleeps, and from the second one's end until the commit is
    visible, :func:`committing` is False already)."""
    return not count(
        server,
        database,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state = 'active' AND query ILIKE '%COMMIT%'",
    )


#: a COMMIT held until the test lets it go (not for a time: a loaded machine may take any time to
#: get the test's steps done while it runs): a deferred trigger waits for advisory lock 42,
#: which the test holds
HELD_COMMIT = """
CREATE TABLE held_commits (id serial PRIMARY KEY);
CREATE FUNCTION held_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(42);
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER held_commit AFTER INSERT ON held_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION held_commit();
"""


def held(server: PostgresServer, database: str) -> bool:
    """A held COMMIT (see :data:`HELD_COMMIT`) waits for the test's lock."""
    return bool(
        count(
            server,
            database,
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.objid = 42 AND NOT l.granted "
            "AND a.query ILIKE '%COMMIT%'",
        )
    )


def claiming(server: PostgresServer, database: str) -> bool:
    """A claim in ``database`` waits for the original COMMIT's marker."""
    return bool(
        count(
            server,
            database,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'active' AND wait_event_type = 'Lock' AND query LIKE '%claim_commit%'",
        )
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def wait_until_sync(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def counters(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return found


def breaker(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["breaker"]
    return found


def named(events: list[rdb.SelfHealEvent], name: str) -> list[rdb.SelfHealEvent]:
    return [e for e in events if e.name == name]


#: what a unit's failed COMMIT may end in
VERDICTS = {"commit_verified", "commit_not_applied", "commit_unknown", "commit_interrupted"}


def verdicts(events: list[rdb.SelfHealEvent]) -> list[rdb.SelfHealEvent]:
    return [e for e in events if e.name in VERDICTS]


# -- a claim gets its whole wait -------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_claim_outlasts_asyncpgs_command_timeout(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """asyncpg's ``command_timeout`` cut the COMMIT off; the cancel it sent was taken and the
    COMMIT went on for 0.8 s, then committed. The claim that settles it waits for it (2 s): the
    same ``command_timeout`` cut the claim off too, and the unit raised
    ``CommitOutcomeUnknownError`` for a COMMIT whose outcome the wait would have known."""
    prepare(pg_server, pg_database, MARKERS)
    url = pg_server.url(pg_database, driver="asyncpg")
    engine = create_async_engine(url, connect_args={"command_timeout": 0.3})
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    calls = 0

    async def write(session: AsyncSession) -> str:
        nonlocal calls
        calls += 1
        await session.execute(slow_insert(5, 0.8))
        return "done"

    assert await Session.run(write) == "done"
    assert calls == 1
    assert slow_rows(pg_server, pg_database) == 1
    [verified] = named(events, "commit_verified")
    assert "after the client stopped waiting" in verified.message
    assert not named(events, "commit_unknown")
    assert await Session.run(quick) == 42

    async def slow(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT pg_sleep(2)"))

    # the unit's statements keep the application's timeout (asyncpg's asyncio.TimeoutError,
    # the builtin TimeoutError since Python 3.11)
    with pytest.raises(asyncio.TimeoutError):
        await Session.run(slow)


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_a_claim_outlasts_the_applications_statement_timeout(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    fault_proxy: FaultProxy,
    made_async_engines: list[AsyncEngine],
    service: str,
    driver: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The connection is lost while the COMMIT runs (it commits a second later). The claim on a
    new connection waits for it, under the application's ``statement_timeout`` of 300 ms, which
    cancelled the claim: the outcome was "unknown" though the wait would have known it."""
    prepare(pg_server, pg_database, MARKERS)
    connect_args = server_settings_args(driver, statement_timeout="300")
    engine = create_async_engine(
        fault_proxy.url(pg_database, driver=driver), connect_args=connect_args
    )
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    calls = 0

    async def write(session: AsyncSession) -> str:
        nonlocal calls
        calls += 1
        await session.execute(slow_insert(1, 0))  # (statement_timeout spares a COMMIT's work)
        return "done"

    task = asyncio.ensure_future(Session.run(write))
    await wait_until(lambda: committing(pg_server, pg_database) or task.done())
    fault_proxy.cut_all()
    assert await asyncio.wait_for(task, 10) == "done"
    assert calls == 1
    assert slow_rows(pg_server, pg_database) == 1
    assert len(named(events, "commit_verified")) == 1
    assert not named(events, "commit_unknown")

    async def slow(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT pg_sleep(1)"))

    with pytest.raises(sa.exc.DBAPIError) as info:  # the timeout holds for the unit
        await Session.run(slow)
    assert rdb.sqlstate_of(info.value) == "57014"


def test_a_claim_outlasts_the_applications_statement_timeout_sync(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    fault_proxy: FaultProxy,
    service: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The sync twin (psycopg) of the test above."""
    prepare(pg_server, pg_database, MARKERS)
    engine = sa.create_engine(
        fault_proxy.url(pg_database), connect_args={"options": "-c statement_timeout=300"}
    )
    try:
        Session = rdb.ResilientSession(engine, service=service)
        calls = 0
        outcome: list[object] = []

        def write(session: Session) -> str:
            nonlocal calls
            calls += 1
            session.execute(slow_insert(1, 0))
            return "done"

        def run() -> None:
            try:
                outcome.append(Session.run(write))
            except Exception as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        wait_until_sync(lambda: committing(pg_server, pg_database) or not worker.is_alive())
        fault_proxy.cut_all()
        worker.join(10)
        assert not worker.is_alive()
        assert outcome == ["done"]
        assert calls == 1
        assert slow_rows(pg_server, pg_database) == 1
        assert not named(events, "commit_unknown")
    finally:
        engine.dispose()


def psycopg_reports_25p03() -> bool:
    """psycopg 3.3+ reads the server's message (SQLSTATE 25P03) before the closed socket; 3.2
    reports the lost connection alone."""
    return tuple(int(n) for n in psycopg.__version__.split(".")[:2]) >= (3, 3)


def driver_cancels_the_statement(driver: str) -> bool:
    """Whether a cancelled task's driver is known to cancel its statement on the server:
    psycopg does, asyncpg 0.32 does; asyncpg 0.30 (the lowest this project supports) closes the
    connection instead, and the server's COMMIT runs to its end."""
    if driver != "asyncpg":
        return True
    return tuple(int(n) for n in asyncpg.__version__.split(".")[:2]) >= (0, 32)


# -- a COMMIT the driver never sent --------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [MARKERS, FALLBACK])
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("how", ["terminated", "idle_in_transaction_session_timeout"])
async def test_a_connection_closed_before_commit_is_replayed_not_unknown(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    mode: str,
    driver: str,
    how: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The server closes the unit's connection while the unit awaits something else (a backend
    terminated, a failover, its idle_in_transaction_session_timeout). asyncpg sees it closed and
    refuses the COMMIT without sending it ("the underlying connection is closed"): nothing can
    have committed, yet the unit raised ``CommitOutcomeUnknownError``. It is replayed; psycopg,
    which sends the COMMIT and hears the server's error, settles it on a new connection, or,
    hearing SQLSTATE 25P03 (the idle timeout: the unit's doing, as a statement timeout is),
    raises it at once."""
    prepare(pg_server, pg_database, mode)
    connect_args: dict[str, Any] = {}
    if how != "terminated":
        connect_args = server_settings_args(driver, idle_in_transaction_session_timeout="200")
    engine = create_async_engine(
        pg_server.url(pg_database, driver=driver), connect_args=connect_args
    )
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    calls = 0

    async def write(session: AsyncSession) -> str:
        nonlocal calls
        calls += 1
        await session.execute(slow_insert(0, 0))
        if calls == 1:
            pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            if how == "terminated":
                pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
            gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {int(pid)}"
            await wait_until(lambda: count(pg_server, pg_database, gone) == 0)
            raw = await (await session.connection()).get_raw_connection()
            driver = raw.driver_connection
            if isinstance(driver, asyncpg.Connection):
                await wait_until(driver.is_closed)  # asyncpg has read the close
        return "done"

    if how != "terminated" and driver == "psycopg" and psycopg_reports_25p03():
        with pytest.raises(sa.exc.DBAPIError) as info:
            await Session.run(write)
        assert rdb.sqlstate_of(info.value) == "25P03"
        assert (calls, slow_rows(pg_server, pg_database)) == (1, 0)
    else:
        assert await Session.run(write) == "done"
        assert calls == 2
        assert slow_rows(pg_server, pg_database) == 1
    assert not named(events, "commit_unknown")
    assert counters(service)["unknown_commits"] == 0


@pytest.mark.asyncio
async def test_the_mark_of_a_cancelled_task_reaches_who_awaits_it() -> None:
    """Python 3.10 raises to whoever awaits a cancelled task (``asyncio.wait_for`` among them) a
    new ``CancelledError``, the task's own (the one marked) as its context: the mark was not
    found there, and a web handler answered a plain error, not ``commit-outcome-unknown``, for
    a COMMIT the cancellation cut off. (3.11+ raise the task's own; the chain built by hand
    below is 3.10's, on any version.)"""
    started = asyncio.Event()

    async def unit() -> None:
        try:
            started.set()
            await asyncio.sleep(10)
        except asyncio.CancelledError as exc:
            mark_commit_interrupted(exc, "orders")
            raise

    task = asyncio.ensure_future(unit())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as cancelled:
        await task
    assert commit_interrupted(cancelled.value) == "orders"
    started.clear()
    with pytest.raises(asyncio.TimeoutError) as timed_out:  # (the builtin one since 3.11)
        await asyncio.wait_for(unit(), 0.05)
    assert commit_interrupted(timed_out.value) == "orders"
    problem = problem_details(timed_out.value)
    assert problem is not None
    assert problem.body["type"] == "urn:resilient-db:problem:commit-outcome-unknown"

    marked = asyncio.CancelledError()
    mark_commit_interrupted(marked, "orders")
    reraised = asyncio.CancelledError()
    reraised.__context__ = marked
    assert commit_interrupted(reraised) == "orders"


# -- a cancelled unit ------------------------------------------------------------------------------
#: how a unit is interrupted (asyncio.timeout is Python 3.11's)
INTERRUPTIONS = [
    "cancel",
    pytest.param(
        "asyncio.timeout",
        marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.11's"),
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [MARKERS, FALLBACK])
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("commit", ["cancel ends it", "commits anyway"], ids=["ended", "committed"])
@pytest.mark.parametrize("how", INTERRUPTIONS)
async def test_a_unit_cancelled_with_its_commit_in_flight(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    mode: str,
    driver: str,
    commit: str,
    how: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The cancellation goes on at once (as soon as the driver has the server's answer to its
    cancel), nothing verified or replayed, no connection left out of the pool, nothing counted
    by the breaker; and a line names the transaction whose COMMIT was in flight (its caller
    hears only the cancellation): there was none."""
    prepare(pg_server, pg_database, mode)
    engine = create_async_engine(pg_server.url(pg_database, driver=driver))
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    after = -1 if commit == "cancel ends it" else 0.3
    calls = 0

    async def write(session: AsyncSession) -> str:
        nonlocal calls
        calls += 1
        await session.execute(slow_insert(3, after))
        return "done"

    await asyncio.wait_for(
        cut_off_at_commit(pg_server, pg_database, how, lambda: Session.run(write)), 10
    )
    # at once: the COMMIT's 3 s on the server had not run out (nobody waited for its end)
    assert not slept_out(pg_server, pg_database)
    assert calls == 1
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert breaker(service)["state"] == "closed"
    assert breaker(service)["failures"] == 0
    seen = counters(service)
    # an unknown outcome, counted as one (an operator's alert on unknown commits sees it)
    assert (seen["retries"], seen["unknown_commits"], seen["verified_commits"]) == (0, 1, 0)
    [line] = named(events, "commit_interrupted")
    assert line.fields["outcome"] == "unknown"
    assert "with its COMMIT in flight" in line.message
    if mode == MARKERS:
        assert line.fields["marker"]
        assert f"marker {line.fields['marker']}" in line.message
    else:
        assert line.fields["xid"]
    assert not named(events, "commit_verified")
    assert not named(events, "commit_unknown")
    # what the server did, once the COMMIT has ended there (some asyncpg versions close the
    # connection rather than cancel the statement: the COMMIT then runs to its end)
    await wait_until(lambda: commit_ended(pg_server, pg_database))
    if after >= 0 and driver == "asyncpg":
        # the COMMIT caught the cancel and went on; but asyncpg's graceful close of the
        # connection (SQLAlchemy's terminate, as the pool drops it) cancels a statement still
        # running once more, and when that second cancel lands within the COMMIT's grace it
        # ends it too (seen on PostgreSQL 15, in the trigger's second pg_sleep): the server
        # decides, and the unit's outcome is unknown either way, as said above. Once, never
        # twice (not replayed)
        assert slow_rows(pg_server, pg_database) in (0, 1)
    elif after >= 0 or driver_cancels_the_statement(driver):
        assert slow_rows(pg_server, pg_database) == (0 if after < 0 else 1)
    assert await Session.run(quick) == 42


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_a_unit_cancelled_with_its_commit_unanswered_ends_and_closes_its_connection(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    fault_proxy: FaultProxy,
    made_async_engines: list[AsyncEngine],
    service: str,
    driver: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The COMMIT never reaches the server and no answer ever comes (the proxy holds it: a
    connection black-holed while new ones get through, so the driver's cancel request is
    delivered and answered, and cancels nothing). The cancelled unit ends all the same, the
    connection's graceful close cut off at its bound (2 s), its socket closed, and the pool's
    slot given back. asyncpg 0.30 waited, before that bound, for the cancelled COMMIT's answer:
    the cancelled unit never ended (and its socket, cut off there, stayed open)."""
    if driver == "psycopg" and psycopg.pq.version() < 170000:
        pytest.skip(
            "psycopg's cancel with a libpq older than 17 blocks holding the GIL until the "
            "server answers, and the answer comes through the fault proxy, which runs in this "
            "process: a deadlock of the test's own making"
        )
    prepare(pg_server, pg_database, MARKERS)
    engine = create_async_engine(
        fault_proxy.url(pg_database, driver=driver), connect_args=async_connect_args(driver, 2)
    )
    made_async_engines.append(engine)
    kept: list[Any] = []  # the driver's connections, referenced: no socket closed by the gc
    sa.event.listen(engine.sync_engine, "connect", lambda conn, _record: kept.append(conn))
    Session = rdb.AsyncResilientSession(engine, service=service)

    async def write(session: AsyncSession) -> None:
        await session.execute(slow_insert(0, 0))

    assert await Session.run(quick) == 42  # (the pool's connection, then held by the unit)
    assert fault_proxy.active_connections == 1
    fault_proxy.swallow_commit()
    task = asyncio.ensure_future(Session.run(write))
    try:
        await wait_until(lambda: fault_proxy.commits_swallowed == 1 or task.done())
        task.cancel()
        await asyncio.wait({task}, timeout=10)  # (the bound is 2 s: no hang passes as slow)
        assert task.done(), "the cancelled unit still waits for its COMMIT's answer"
        # its socket closed by the client (the proxy still holds the connection), not left
        # open (nor to the garbage collector: ``kept``)
        await wait_until(lambda: fault_proxy.active_connections == 0)
    finally:
        fault_proxy.release_swallowed()  # (a unit that hung ends now)
    assert task.cancelled()
    assert [line.fields["outcome"] for line in named(events, "commit_interrupted")] == ["unknown"]
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert slow_rows(pg_server, pg_database) == 0  # (the COMMIT never reached the server)
    assert await Session.run(quick) == 42


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_a_unit_cancelled_while_its_lost_answer_is_verified(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    fault_proxy: FaultProxy,
    made_async_engines: list[AsyncEngine],
    service: str,
    driver: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The connection is lost while the COMMIT runs; the claim on a new connection waits for it,
    and then the unit is cancelled: the cancellation goes on at once, the claim is withdrawn (no
    fence: the original commits), its connection is back in the pool, and a line names the
    marker. (The COMMIT is held by a lock of the test's until the end: a COMMIT that slept a
    while instead was done before a loaded machine got the claim going, and the unit ended
    verified, before its cancel.)"""
    if driver == "psycopg" and psycopg.pq.version() < 170000:
        pytest.skip(
            "psycopg's cancel with a libpq older than 17 blocks holding the GIL until the "
            "server answers, and the answer comes through the fault proxy, which runs in this "
            "process: a deadlock of the test's own making"
        )
    prepare(pg_server, pg_database, MARKERS)
    pg_server.execute(HELD_COMMIT, database=pg_database)
    engine = create_async_engine(fault_proxy.url(pg_database, driver=driver))
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)

    async def write(session: AsyncSession) -> str:
        await session.execute(sa.text("INSERT INTO held_commits DEFAULT VALUES"))
        return "done"

    def committed() -> int:
        return count(pg_server, pg_database, "SELECT count(*) FROM held_commits")

    with psycopg.connect(pg_server.conninfo(pg_database), autocommit=True) as lock:
        lock.execute("SELECT pg_advisory_lock(42)")
        task = asyncio.ensure_future(Session.run(write))
        await wait_until(lambda: held(pg_server, pg_database) or task.done())
        fault_proxy.cut_all()
        await wait_until(lambda: claiming(pg_server, pg_database) or task.done())
        assert not task.done(), task
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        # at once: the original COMMIT still waits (the claim's answer comes when it commits)
        assert held(pg_server, pg_database)
        assert committed() == 0
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        [line] = named(events, "commit_interrupted")
        assert "while its lost COMMIT answer was being verified" in line.message
        assert line.fields["outcome"] == "unknown"
        assert line.fields["marker"]
        assert breaker(service)["failures"] == 0
        assert counters(service)["unknown_commits"] == 1
        lock.execute("SELECT pg_advisory_unlock(42)")  # the original COMMIT goes on
    await wait_until(lambda: committed() == 1)  # not fenced off
    assert not claiming(pg_server, pg_database)
    assert await Session.run(quick) == 42


# -- a COMMIT the server refused -------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [MARKERS, FALLBACK])
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_a_deferred_constraint_refusing_the_commit_is_that_error(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    mode: str,
    driver: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """23505 at COMMIT (a deferred unique constraint), after the marker was written in the same
    message: the server answered, nothing committed. Raised as it is: not taken for the marker
    statement's failure, not verified, not replayed."""
    prepare(pg_server, pg_database, mode)
    engine = create_async_engine(pg_server.url(pg_database, driver=driver))
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    calls = 0

    async def duplicate(session: AsyncSession) -> str:
        nonlocal calls
        calls += 1
        await session.execute(sa.text("INSERT INTO unique_at_commit VALUES (1)"))
        await session.execute(slow_insert(0, 0))
        return "done"

    with pytest.raises(sa.exc.IntegrityError) as info:
        await Session.run(duplicate)
    assert rdb.sqlstate_of(info.value) == "23505"
    assert "unique_at_commit_id" in str(info.value)
    assert calls == 1
    assert not verdicts(events)
    assert slow_rows(pg_server, pg_database) == 0
    if mode == MARKERS:
        markers = "SELECT count(*) FROM resilient_db.commit_markers"
        assert count(pg_server, pg_database, markers) == 0
    assert breaker(service)["failures"] == 0
    assert await Session.run(quick) == 42


@pytest.mark.parametrize("commit", ["cancel ends it", "commits anyway"], ids=["ended", "committed"])
def test_psycopg_cancel_of_a_commit_is_the_servers_answer(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    commit: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """``Connection.cancel_safe()`` from another thread while the COMMIT runs: the server
    answers it, with 57014 (nothing committed: raised, not replayed, not verified) or with the
    COMMIT's success (done)."""
    prepare(pg_server, pg_database, MARKERS)
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        Session = rdb.ResilientSession(engine, service=service)
        after = -1 if commit == "cancel ends it" else 0.3
        drivers: list[psycopg.Connection[Any]] = []
        calls = 0

        def write(session: Session) -> str:
            nonlocal calls
            calls += 1
            session.execute(slow_insert(3, after))
            driver = session.connection().connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            drivers.append(driver)
            return "done"

        def cancel() -> None:
            wait_until_sync(lambda: committing(pg_server, pg_database))
            drivers[0].cancel_safe()

        canceller = threading.Thread(target=cancel, daemon=True)
        canceller.start()
        if after < 0:
            with pytest.raises(sa.exc.OperationalError) as info:
                Session.run(write)
            assert rdb.sqlstate_of(info.value) == "57014"
        else:
            assert Session.run(write) == "done"
        canceller.join(10)
        assert calls == 1
        assert not verdicts(events)
        assert slow_rows(pg_server, pg_database) == (0 if after < 0 else 1)
    finally:
        engine.dispose()


def test_an_interrupt_during_the_markers_check_of_a_new_connection_goes_on(
    pg_url: str, service: str, *, caplog: pytest.LogCaptureFixture
) -> None:
    """A Ctrl-C (or SystemExit) landing while a new connection's set-up checks for the commit
    markers, its query in flight: the interruption reaches the caller and the connection is
    closed. (The set-up's reset of autocommit was refused on the busy connection and its error
    replaced the interruption, which was then taken for a failed check: a false "markers are
    not installed" warning, and the unit ran on a connection with a command in progress.)"""
    armed = [True]

    class InterruptedCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            if armed[0] and query == _CHECK_SQL:
                armed[0] = False
                self.connection.pgconn.send_query(b"SELECT pg_sleep(0.2)")  # in flight
                raise KeyboardInterrupt
            return super().execute(query, *args, **kwargs)

    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)

    @sa.event.listens_for(engine, "connect")
    def interrupted_cursors(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.cursor_factory = InterruptedCursor

    installer = sa.create_engine(pg_url)
    try:
        rdb.install_commit_markers(installer)
    finally:
        installer.dispose()
    try:
        Sessions = rdb.ResilientSession(engine, service=service)

        def read(session: Session) -> int:
            return int(session.scalar(sa.text("SELECT 1")) or 0)

        with caplog.at_level("WARNING", logger="resilient_db"):
            with pytest.raises(KeyboardInterrupt):
                Sessions.run(read)
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            assert Sessions.run(read) == 1  # on a new connection, set up in full
        assert not [r for r in caplog.records if "not installed" in r.getMessage()]
        assert not armed[0]
    finally:
        engine.dispose()


# -- a drop-in COMMIT cut off ----------------------------------------------------------------------
#: the ways async drop-in code commits: each must answer a cut-off COMMIT alike
DROP_IN_COMMITS = ["session.commit()", "Session.begin()", "session.begin()"]


async def drop_in_write(Session: rdb.AsyncResilientSession[AsyncSession], spelling: str) -> None:
    """A slow COMMIT (3 s; a cancel ends it) of drop-in code, spelt as ``spelling``."""
    if spelling == "session.commit()":
        async with Session() as session:
            await session.execute(slow_insert(3, -1))
            await session.commit()
    elif spelling == "Session.begin()":
        async with Session.begin() as session:
            await session.execute(slow_insert(3, -1))
    else:
        async with Session() as session, session.begin():
            await session.execute(slow_insert(3, -1))


async def cut_off_at_commit(
    server: PostgresServer, database: str, how: str, work: Callable[[], Any]
) -> BaseException:
    """Run ``work()`` and interrupt it once the server shows its COMMIT running (an order, not a
    duration): its task cancelled, or the deadline of an ``asyncio.timeout`` around it
    brought forward. What it raised (it must raise)."""
    if how == "cancel":
        task = asyncio.ensure_future(work())
        await wait_until(lambda: committing(server, database) or task.done())
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        return cancelled.value
    loop = asyncio.get_running_loop()

    async def expire(deadline: Any) -> None:
        await wait_until(lambda: committing(server, database))
        deadline.reschedule(loop.time())

    watchers: list[asyncio.Future[None]] = []

    async def within_deadline() -> None:
        async with asyncio.timeout(None) as deadline:
            watchers.append(asyncio.ensure_future(expire(deadline)))
            await work()

    try:
        with pytest.raises(TimeoutError) as timed_out:
            await within_deadline()
    finally:
        for watcher in watchers:
            watcher.cancel()
    assert isinstance(timed_out.value.__cause__, asyncio.CancelledError)
    return timed_out.value


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("spelling", DROP_IN_COMMITS)
@pytest.mark.parametrize("how", INTERRUPTIONS)
async def test_a_drop_in_commit_cut_off_is_an_unknown_outcome_however_spelt(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    driver: str,
    spelling: str,
    how: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Async drop-in code whose COMMIT a cancellation or a deadline cuts off, the COMMIT in
    flight on the server: whichever way the code commits, the interruption goes on at once
    (the deadline is kept), it is marked as having cut off a COMMIT of unknown outcome (a web
    handler answers 500 ``commit-outcome-unknown``, not a plain 500 inviting a resubmit), a
    line says so and ``unknown_commits`` counts it, and no connection is left out of the pool.
    (``async with Session.begin()`` committed in a task SQLAlchemy shields from the
    cancellation: the caller's was raised unmarked, so it was the application's plain error,
    and the deadline waited for the whole COMMIT.)"""
    prepare(pg_server, pg_database, MARKERS)
    engine = create_async_engine(pg_server.url(pg_database, driver=driver))
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    raised = await cut_off_at_commit(
        pg_server, pg_database, how, lambda: drop_in_write(Session, spelling)
    )
    # the deadline kept: the COMMIT's 3 s on the server had not run out
    assert not slept_out(pg_server, pg_database)
    assert commit_interrupted(raised) == service
    if isinstance(raised, Exception):  # (what reaches a web handler: not a cancellation)
        problem = problem_details(raised)
        assert problem is not None
        assert (problem.status, problem.body["type"]) == (
            500,
            "urn:resilient-db:problem:commit-outcome-unknown",
        )
        assert problem.body["service"] == service
        assert "Retry-After" not in problem.headers
    assert counters(service)["unknown_commits"] == 1
    [line] = named(events, "commit_interrupted")
    assert line.fields["outcome"] == "unknown"
    assert "drop-in" in line.message
    assert "outcome unknown" in line.message
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await wait_until(lambda: commit_ended(pg_server, pg_database))
    if driver_cancels_the_statement(driver):
        assert slow_rows(pg_server, pg_database) == 0  # the cancel ended it
    async with Session.begin() as session:
        assert await session.scalar(sa.text("SELECT 42")) == 42


class Exiting(SystemExit):
    """The ``SystemExit`` of a signal handler (a service stopping)."""


def _exit_now(signum: int, frame: Any) -> None:
    raise Exiting(0)


@pytest.fixture
def exit_signal() -> Iterator[int]:
    """SIGUSR1 raises ``SystemExit`` while the test runs (as a service's SIGTERM handler)."""
    before = signal.signal(signal.SIGUSR1, _exit_now)
    yield signal.SIGUSR1
    signal.signal(signal.SIGUSR1, before)


def signal_at_commit(server: PostgresServer, database: str, signum: int) -> threading.Thread:
    """Send ``signum`` to the main thread (where the test runs) once the server shows a COMMIT
    running: a real signal, which interrupts the driver's wait for the COMMIT's answer."""
    main = threading.main_thread().ident
    assert threading.current_thread().ident == main

    def send() -> None:
        wait_until_sync(lambda: committing(server, database))
        signal.pthread_kill(main, signum)  # type: ignore[arg-type]

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def interruption_of(how: str, exit_signal: int) -> tuple[type[BaseException], int]:
    """What ``how`` raises, and the signal that raises it."""
    if how == "KeyboardInterrupt":
        return KeyboardInterrupt, signal.SIGINT
    return SystemExit, exit_signal


SYNC_INTERRUPTIONS = ["KeyboardInterrupt", "SystemExit"]


def sync_drop_in_write(Session: rdb.ResilientSession[Session], spelling: str) -> None:
    """The sync twin of :func:`drop_in_write`."""
    if spelling == "session.commit()":
        with Session() as session:
            session.execute(slow_insert(3, -1))
            session.commit()
    else:
        with Session.begin() as session:
            session.execute(slow_insert(3, -1))


@pytest.mark.parametrize("spelling", ["session.commit()", "Session.begin()"])
@pytest.mark.parametrize("how", SYNC_INTERRUPTIONS)
def test_a_sync_drop_in_commit_interrupted_is_an_unknown_outcome(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    spelling: str,
    how: str,
    exit_signal: int,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Sync drop-in code whose COMMIT a Ctrl-C (or a ``SystemExit`` of a signal handler)
    interrupts, the COMMIT in flight on the server: the interruption goes on, marked as having
    cut off a COMMIT of unknown outcome, said and counted, as async drop-in code's cancellation
    (it was neither said nor counted)."""
    prepare(pg_server, pg_database, MARKERS)
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        Session = rdb.ResilientSession(engine, service=service)
        kind, signum = interruption_of(how, exit_signal)
        sender = signal_at_commit(pg_server, pg_database, signum)
        with pytest.raises(kind) as raised:
            sync_drop_in_write(Session, spelling)
        sender.join(10)
        assert commit_interrupted(raised.value) == service
        assert counters(service)["unknown_commits"] == 1
        [line] = named(events, "commit_interrupted")
        assert line.fields["outcome"] == "unknown"
        assert "drop-in" in line.message
        assert "outcome unknown" in line.message
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        wait_until_sync(lambda: commit_ended(pg_server, pg_database))
        if kind is KeyboardInterrupt:
            assert slow_rows(pg_server, pg_database) == 0  # psycopg cancelled it
        with Session.begin() as session:
            assert session.scalar(sa.text("SELECT 42")) == 42
    finally:
        engine.dispose()


# -- an operation's own COMMIT cut off -------------------------------------------------------------
def assert_operation_commit_unknown(
    service: str, raised: BaseException, events: list[rdb.SelfHealEvent]
) -> None:
    """What a ``with_self_healing`` operation whose drop-in COMMIT was cut off says: its
    outcome is unknown (not "committed part of its work"), counted once, the interruption
    marked for a web answer."""
    assert commit_interrupted(raised) == service
    assert counters(service)["unknown_commits"] == 1
    [line] = named(events, "commit_interrupted")
    assert line.fields["outcome"] == "unknown"
    assert "outcome unknown" in line.message
    assert "not replayed" in line.message
    assert not [e for e in events if "committed part of its work" in e.message]
    assert not named(events, "partly_committed")
    assert counters(service)["retries"] == 0


@pytest.mark.parametrize("spelling", ["session.commit()", "Session.begin()"])
@pytest.mark.parametrize("how", SYNC_INTERRUPTIONS)
def test_an_operations_commit_interrupted_is_an_unknown_outcome(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    spelling: str,
    how: str,
    exit_signal: int,
    events: list[rdb.SelfHealEvent],
) -> None:
    """``with_self_healing`` around drop-in code whose own COMMIT a Ctrl-C (or a
    ``SystemExit``) interrupts, the COMMIT in flight on the server: not replayed, and said to
    be of unknown outcome, counted in ``unknown_commits`` (it was said to have "committed part
    of its work", and not counted)."""
    prepare(pg_server, pg_database, MARKERS)
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        Session = rdb.ResilientSession(engine, service=service)
        calls = 0

        @rdb.with_self_healing(service=service)
        def operation() -> None:
            nonlocal calls
            calls += 1
            sync_drop_in_write(Session, spelling)

        kind, signum = interruption_of(how, exit_signal)
        sender = signal_at_commit(pg_server, pg_database, signum)
        with pytest.raises(kind) as raised:
            operation()
        sender.join(10)
        assert calls == 1
        assert_operation_commit_unknown(service, raised.value, events)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        wait_until_sync(lambda: commit_ended(pg_server, pg_database))
    finally:
        engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("spelling", DROP_IN_COMMITS)
@pytest.mark.parametrize("how", INTERRUPTIONS)
async def test_an_async_operations_commit_cut_off_is_an_unknown_outcome(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    driver: str,
    spelling: str,
    how: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The async twin: a cancellation or a deadline cutting off the COMMIT of drop-in code in
    an async ``with_self_healing`` operation."""
    prepare(pg_server, pg_database, MARKERS)
    engine = create_async_engine(pg_server.url(pg_database, driver=driver))
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    calls = 0

    @rdb.with_self_healing(service=service)
    async def operation() -> None:
        nonlocal calls
        calls += 1
        await drop_in_write(Session, spelling)

    raised = await cut_off_at_commit(pg_server, pg_database, how, operation)
    assert calls == 1
    assert_operation_commit_unknown(service, raised, events)
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await wait_until(lambda: commit_ended(pg_server, pg_database))
