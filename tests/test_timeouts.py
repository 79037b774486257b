"""Timeouts through the real drivers: a statement that runs too long is the application's
problem (not replayed, not an outage for the breaker), a connect that times out is an outage.

asyncpg's ``command_timeout`` raises ``asyncio.TimeoutError`` (since Python 3.11 the builtin
``TimeoutError``, an ``OSError``) from the driver's own
code, the client-side twin of psycopg's server-side ``statement_timeout`` (SQLSTATE 57014).
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from scenarios import quick, set_up_database
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("no_backoff")]

#: how each async driver is told to stop a statement after 200 ms, and to give up a connect
STATEMENT_TIMEOUT: dict[str, dict[str, Any]] = {
    "asyncpg": {"command_timeout": 0.2},
    "psycopg": {"options": "-c statement_timeout=200"},
}
CONNECT_TIMEOUT: dict[str, dict[str, Any]] = {
    "asyncpg": {"timeout": 0.3},
    "psycopg": {"connect_timeout": 1},
}


@pytest.fixture(params=["asyncpg", "psycopg"])
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _counters(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return found


async def test_a_statement_timeout_is_not_replayed_nor_an_outage(
    pg_server: PostgresServer,
    pg_database: str,
    async_driver: str,
    made_async_engines: list[AsyncEngine],
    service: str,
) -> None:
    url = pg_server.url(pg_database, driver=async_driver)
    engine = create_async_engine(url, connect_args=STATEMENT_TIMEOUT[async_driver])
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=1)
    )
    calls = 0

    async def slow(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(sa.text("SELECT pg_sleep(2)"))

    with pytest.raises(Exception) as info:  # noqa: PT011 (TimeoutError or 57014, by driver)
        await Session.run(slow)
    assert not rdb.is_transient(info.value)
    assert calls == 1
    counters = _counters(service)
    assert (counters["attempts"], counters["retries"], counters["breaker_opens"]) == (1, 0, 0)
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"

    assert await Session.run(quick) == 42  # the connection (or its replacement) still serves


async def test_a_connect_that_times_out_is_an_outage(
    pg_database: str,
    fault_proxy: FaultProxy,
    async_driver: str,
    made_async_engines: list[AsyncEngine],
    service: str,
) -> None:
    url = fault_proxy.url(pg_database, driver=async_driver)
    engine = create_async_engine(url, connect_args=CONNECT_TIMEOUT[async_driver])
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(max_retries=1, failure_threshold=10)
    )
    fault_proxy.blackhole()

    async def one(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    with pytest.raises(Exception) as info:  # noqa: PT011 (TimeoutError or OperationalError)
        await Session.run(one)
    assert rdb.is_transient(info.value)
    assert _counters(service)["retries"] == 1


# A COMMIT that takes its time on the server: a deferred constraint trigger that sleeps at
# COMMIT, which either lets asyncpg's cancel (sent when command_timeout fires) end the COMMIT
# with an error (nothing committed) or ignores it and commits (as a COMMIT waiting for a
# synchronous standby does: cancelled, it stays committed locally).
SLOW_COMMIT = """
CREATE TABLE slow_commits (id serial PRIMARY KEY, note text NOT NULL);
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.note = 'ignores the cancel' THEN
        BEGIN
            PERFORM pg_sleep(1);
        EXCEPTION WHEN query_canceled THEN
            NULL;
        END;
    ELSE
        PERFORM pg_sleep(1);
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "fallback"])
@pytest.mark.parametrize("cancelled", [True, False], ids=["cancelled", "committed anyway"])
async def test_a_commit_that_times_out_is_verified_not_reported_failed(
    *,
    markers: bool,
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    cancelled: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncpg's ``command_timeout`` also bounds the COMMIT: its TimeoutError leaves the outcome
    open (the COMMIT may be applied after the client gave up, as one waiting for a synchronous
    standby is). Like a lost answer, it is settled by the commit marker (or, without the
    markers, the transaction id): reported done when it committed, raised (not replayed: a
    timeout) when it provably did not."""
    set_up_database(pg_server, pg_database, SLOW_COMMIT, markers=markers)
    url = pg_server.url(pg_database, driver="asyncpg")
    engine = create_async_engine(url, connect_args={"command_timeout": 0.3})
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    note = "cancelled" if cancelled else "ignores the cancel"
    calls = 0

    async def write(session: AsyncSession) -> str:
        nonlocal calls
        calls += 1
        await session.execute(
            sa.text("INSERT INTO slow_commits (note) VALUES (:note)"), {"note": note}
        )
        return "done"

    # the pool's connection made, and its set-up at connect done, before the unit: under load
    # that set-up (its statements bound by the same 0.3 s) may time out, a lost connection
    # retried, and the unit under test would count that attempt too
    await Session.run(lambda session: session.execute(sa.text("SELECT 1")))
    outcome: object
    with caplog.at_level("WARNING", logger="resilient_db"):
        try:
            outcome = await Session.run(write)
        except (asyncio.TimeoutError, rdb.CommitOutcomeUnknownError) as exc:
            outcome = exc
    assert calls == 1  # never replayed
    # what the server did, once the COMMIT the client stopped waiting for has ended there
    with pg_server.connect(pg_database) as conn:
        for _ in range(200):
            busy = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            ).fetchone()
            if busy is not None and busy[0] == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the COMMIT still ran on the server 10 s later")
        rows = conn.execute("SELECT count(*) FROM slow_commits").fetchone()
    assert rows is not None
    verdicts = [
        r.getMessage() for r in caplog.records if "Commit outcome verified" in r.getMessage()
    ]
    # What the unit reports is what the server did: done only when committed, the timeout only
    # when provably not; unknown only without the markers (the transaction id's status can't
    # tell a COMMIT still running from one that will never end, once the checks run out).
    # Whether asyncpg's cancel reaches the COMMIT in time depends on its version (some close
    # the connection instead, and the server's COMMIT goes on): the case the trigger makes
    # ignore the cancel always commits.
    if outcome == "done":
        assert rows[0] == 1
        assert verdicts == [
            v for v in verdicts if "committed after the client stopped waiting" in v
        ]
        assert len(verdicts) == 1
        assert _counters(service)["verified_commits"] == 1
    elif isinstance(outcome, asyncio.TimeoutError):
        assert rows[0] == 0
        assert len(verdicts) == 1
        assert "did not commit" in verdicts[0]
    else:
        assert isinstance(outcome, rdb.CommitOutcomeUnknownError)
        assert not markers, "with the commit markers the outcome is always known"
    if markers and not cancelled:
        assert outcome == "done"  # committed after asyncpg gave up: reported done

    assert await Session.run(quick) == 42  # the engine's connections still serve


async def test_a_lost_commits_check_cut_off_by_command_timeout_is_checked_again(
    pg_database: str,
    pg_server: PostgresServer,
    fault_proxy: FaultProxy,
    made_async_engines: list[AsyncEngine],
    service: str,
) -> None:
    """The server stalls just as the check of a lost COMMIT answer has connected (a paused VM,
    a stalled host: TCP accepted, nothing answered), and asyncpg's ``command_timeout`` (which
    docs/units-of-work.md has bound every statement) cuts the check's statement off. The server did
    not answer that check: it is made again within the deadline, as a check whose connect timed out
    is, and the next one finds the unit committed. It used to end the verification at
    once: ``CommitOutcomeUnknownError``, "the check on a new connection failed: TimeoutError",
    with retries and deadline left."""
    set_up_database(pg_server, pg_database, "CREATE TABLE ledger (id int)", markers=True)
    url = fault_proxy.url(pg_database, driver="asyncpg")
    engine = create_async_engine(url, connect_args={"command_timeout": 0.2, "timeout": 2})
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(engine, service=service)
    stage: list[str] = []

    @sa.event.listens_for(engine.sync_engine, "checkout")
    def stall(*_: Any) -> None:
        if stage == ["lost"]:  # the check's connection: the server stalls under it
            stage.append("stalled")
            fault_proxy.blackhole()

    @sa.event.listens_for(engine.sync_engine, "do_connect")
    def resume(*_: Any) -> None:
        if stage == ["lost", "stalled"]:  # the next check connects: the server is back
            stage.append("resumed")
            fault_proxy.restore()

    calls = 0

    async def write(session: AsyncSession) -> str:
        nonlocal calls
        calls += 1
        await session.execute(sa.text("INSERT INTO ledger VALUES (1)"))
        fault_proxy.lose_commit_answer()
        stage.append("lost")
        return "done"

    assert await Session.run(write) == "done"
    assert stage == ["lost", "stalled", "resumed"]
    assert calls == 1  # verified committed, never replayed
    assert _counters(service)["verified_commits"] == 1
    with pg_server.connect(pg_database) as conn:
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (1,)


async def test_a_transaction_the_server_ended_for_idling_is_the_units_doing(
    pg_server: PostgresServer,
    pg_database: str,
    async_driver: str,
    made_async_engines: list[AsyncEngine],
    service: str,
) -> None:
    """``idle_in_transaction_session_timeout`` ends the session of a unit that waited too long
    between statements: psycopg hears SQLSTATE 25P03, which is the unit's doing (as a statement
    timeout is), raised at once and not a failure for the breaker. asyncpg reports no code for
    it (the server's message arrives while no statement waits), nor does psycopg before 3.3: a
    lost connection, replayed."""
    url = pg_server.url(pg_database, driver=async_driver)
    engine = create_async_engine(url)
    made_async_engines.append(engine)
    Session = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(max_retries=1, failure_threshold=10)
    )
    calls = 0

    async def idles(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(sa.text("SET LOCAL idle_in_transaction_session_timeout = 50"))
        pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        # the unit's own wait (an HTTP call, say), until the server has ended its session
        with pg_server.connect(pg_database) as conn:
            for _ in range(200):
                found = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
                if found is not None and found[0] == 0:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the server did not end the idle session in 10 s")
        await session.execute(sa.text("SELECT 2"))

    with pytest.raises(Exception) as info:  # noqa: PT011 (OperationalError or a lost connection)
        await Session.run(idles)
    counters = _counters(service)
    breaker = rdb.health()["services"][service]["breaker"]
    if rdb.sqlstate_of(info.value) == "25P03":  # psycopg (3.2.1 reports no code either)
        assert not rdb.is_transient(info.value)
        # asyncpg hears the code when the server's message comes while a statement waits (a
        # loaded machine: the replay's): an attempt before it, without the code, was a lost
        # connection and replayed; the one with it is raised at once, not a breaker failure
        replays = calls - 1
        assert replays == 0 or (async_driver == "asyncpg" and replays == 1)
        assert (counters["retries"], breaker["failures"]) == (replays, replays)
    else:
        older = tuple(int(n) for n in psycopg.__version__.split(".")[:2]) < (3, 3)
        assert async_driver == "asyncpg" or older
        assert rdb.is_transient(info.value)
        assert (calls, counters["retries_by_class"]) == (2, {"disconnect": 1})

    assert await Session.run(quick) == 42  # the dead connection was replaced
