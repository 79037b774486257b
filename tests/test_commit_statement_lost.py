"""A COMMIT sent as a statement (``text("COMMIT")``, ``exec_driver_sql("COMMIT")``) whose answer
is lost, and the error of a unit that committed part of its work before it failed.

Either may have left part of the work committed: the error is never transient
(``is_transient`` False) and the web layer never answers it with a 503 that invites a client to
resubmit (and write the committed part twice). A lost COMMIT statement is an unknown outcome, as
``session.commit()``'s is: counted and said for drop-in use. A unit's own plain ``COMMIT`` on
psycopg (sync or async) goes out as the connection's ``commit()``, with the marker a unit's own
COMMIT midway carries: its lost answer is settled by it (committed here: partly committed, not
unknown); on asyncpg, where SQLAlchemy sends it as a prepared statement, it carries none and
stays unknown. Real server, real faults (the fault proxy loses the COMMIT's answer; a backend
terminated after the unit's own COMMIT).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import assert_unknown_outcome, held_and_released
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy
from resilient_db.web import problem_details

pytestmark = pytest.mark.usefixtures("no_backoff")

NOTES = sa.table("lost_notes", sa.column("who", sa.Text))

COMMIT_STATEMENTS: dict[str, Callable[[Session], Any]] = {
    "text": lambda session: session.execute(sa.text("COMMIT")),
    "exec_driver_sql": lambda session: session.connection().exec_driver_sql("COMMIT"),
}


@pytest.fixture
def proxied(engine: sa.Engine, pg_database: str, fault_proxy: FaultProxy) -> Iterator[sa.Engine]:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE lost_notes (who text NOT NULL)"))
    rdb.install_commit_markers(engine)
    through_proxy = sa.create_engine(fault_proxy.url(pg_database))
    yield through_proxy
    through_proxy.dispose()


async def _exec_driver_commit(session: AsyncSession) -> Any:
    return await (await session.connection()).exec_driver_sql("COMMIT")


ASYNC_COMMIT_STATEMENTS: dict[str, Callable[[AsyncSession], Awaitable[Any]]] = {
    "text": lambda session: session.execute(sa.text("COMMIT")),
    "exec_driver_sql": _exec_driver_commit,
}


@pytest.fixture(params=["asyncpg", "psycopg_async"])
def async_driver(request: pytest.FixtureRequest) -> str:
    """asyncpg sends a COMMIT statement through the extended protocol (prepared), psycopg as a
    simple query: the fault proxy loses either's answer."""
    return str(request.param)


@pytest_asyncio.fixture
async def async_proxied(
    proxied: sa.Engine, pg_database: str, fault_proxy: FaultProxy, async_driver: str
) -> AsyncIterator[AsyncEngine]:
    through_proxy = create_async_engine(fault_proxy.url(pg_database, driver=async_driver))
    yield through_proxy
    await through_proxy.dispose()


def written(engine: sa.Engine, who: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).where(NOTES.c.who == who)) or 0)


def unknown_commits(service: str) -> int:
    return int(rdb.health()["services"][service]["counters"]["unknown_commits"])


def assert_settled_committed(exc: BaseException) -> None:
    """``exc`` is the lost connection of a unit whose own COMMIT midway was proven committed by
    its marker: not transient, not unknown, the web layer's partly-committed answer."""
    assert rdb.classify(exc) is rdb.Outcome.DISCONNECT
    assert not rdb.is_transient(exc)
    problem = problem_details(exc)
    assert problem is not None
    assert problem.body["type"] == "urn:resilient-db:problem:partly-committed"


@pytest.mark.parametrize("how", list(COMMIT_STATEMENTS))
def test_a_units_commit_statement_whose_answer_is_lost_is_settled_by_its_marker(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, how: str
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.insert(NOTES).values(who=how))
        fault_proxy.lose_commit_answer()
        COMMIT_STATEMENTS[how](session)

    with pytest.raises(sa.exc.DBAPIError) as raised:
        Sessions.run(unit)
    assert fault_proxy.commits_lost == 1
    assert calls == [1]  # not replayed
    assert written(proxied, how) == 1  # it committed: proven, never "retry"
    assert_settled_committed(raised.value)
    assert unknown_commits(service) == 0


@pytest.mark.parametrize("how", list(COMMIT_STATEMENTS))
def test_a_drop_in_commit_statement_whose_answer_is_lost_is_an_unknown_outcome(
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    with caplog.at_level(logging.WARNING, logger="resilient_db"), Sessions() as session:
        session.execute(sa.insert(NOTES).values(who=how))
        fault_proxy.lose_commit_answer()
        with pytest.raises(sa.exc.DBAPIError) as raised:
            COMMIT_STATEMENTS[how](session)
    assert fault_proxy.commits_lost == 1
    assert written(proxied, how) == 1
    assert_unknown_outcome(raised.value)
    assert unknown_commits(service) == 1
    said = [r.getMessage() for r in caplog.records if "Commit outcome unknown" in r.getMessage()]
    assert len(said) == 1
    assert "drop-in use" in said[0]


@pytest.mark.asyncio
@pytest.mark.parametrize("how", list(ASYNC_COMMIT_STATEMENTS))
async def test_an_async_units_commit_statement_whose_answer_is_lost_is_settled_or_unknown(
    *,
    async_proxied: AsyncEngine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    async_driver: str,
) -> None:
    """Settled by its marker on psycopg; unknown on asyncpg (a prepared statement: no marker)."""
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(sa.insert(NOTES).values(who=how))
        fault_proxy.lose_commit_answer()
        await ASYNC_COMMIT_STATEMENTS[how](session)

    with pytest.raises(sa.exc.DBAPIError) as raised:
        await Sessions.run(unit)
    assert fault_proxy.commits_lost == 1
    assert calls == [1]  # not replayed
    assert written(proxied, how) == 1
    if async_driver == "psycopg_async":
        assert_settled_committed(raised.value)
        assert unknown_commits(service) == 0
    else:
        assert_unknown_outcome(raised.value)
        assert unknown_commits(service) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("how", list(ASYNC_COMMIT_STATEMENTS))
async def test_an_async_drop_in_commit_statement_whose_answer_is_lost_is_an_unknown_outcome(
    async_proxied: AsyncEngine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
) -> None:
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service)
    async with Sessions() as session:
        await session.execute(sa.insert(NOTES).values(who=how))
        fault_proxy.lose_commit_answer()
        with pytest.raises(sa.exc.DBAPIError) as raised:
            await ASYNC_COMMIT_STATEMENTS[how](session)
    assert fault_proxy.commits_lost == 1
    assert written(proxied, how) == 1
    assert_unknown_outcome(raised.value)
    assert unknown_commits(service) == 1


def counted(service: str) -> int:
    """``unknown_commits`` of ``service`` (0 for a service ``health()`` does not list)."""
    services = rdb.health()["services"]
    return int(services.get(service, {}).get("counters", {}).get("unknown_commits", 0))


def _begin_block(factory: Any, who: str) -> None:
    with factory.begin() as session:
        session.execute(sa.insert(NOTES).values(who=who))


def _commit_call(factory: Any, who: str) -> None:
    session = factory()
    try:
        session.execute(sa.insert(NOTES).values(who=who))
        session.commit()
    finally:
        session.close()


DROP_IN_COMMITS: dict[str, Callable[[Any, str], None]] = {
    "begin": _begin_block,
    "commit": _commit_call,
}


@pytest.mark.parametrize("how", list(DROP_IN_COMMITS))
def test_a_drop_in_commit_lost_is_counted_under_the_factory_that_made_the_session(
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two factories on one engine, one per service: a drop-in session's COMMIT whose answer
    is lost (``Session.begin()``'s, ``session.commit()``) was counted in ``unknown_commits``,
    and said, under the engine's latest factory's service, not the one that made the session."""
    first, latest = f"{service}-orders", f"{service}-billing"
    Orders = rdb.ResilientSession(proxied, service=first)
    rdb.ResilientSession(proxied, service=latest)  # made last: the engine's "latest" factory
    DROP_IN_COMMITS[how](Orders, "warm")  # (connected, the markers looked for)
    fault_proxy.lose_commit_answer()
    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError) as raised,
    ):
        DROP_IN_COMMITS[how](Orders, how)
    assert fault_proxy.commits_lost == 1
    assert written(proxied, how) == 1
    assert_unknown_outcome(raised.value)
    assert (counted(first), counted(latest)) == (1, 0)
    said = [r.getMessage() for r in caplog.records if "Commit outcome unknown" in r.getMessage()]
    assert len(said) == 1
    assert f"service={first} " in said[0]


async def _async_begin_block(factory: Any, who: str) -> None:
    async with factory.begin() as session:
        await session.execute(sa.insert(NOTES).values(who=who))


async def _async_commit_call(factory: Any, who: str) -> None:
    async with factory() as session:
        await session.execute(sa.insert(NOTES).values(who=who))
        await session.commit()


ASYNC_DROP_IN_COMMITS: dict[str, Callable[[Any, str], Awaitable[None]]] = {
    "begin": _async_begin_block,
    "commit": _async_commit_call,
}


@pytest.mark.asyncio
@pytest.mark.parametrize("how", list(ASYNC_DROP_IN_COMMITS))
async def test_an_async_drop_in_commit_lost_is_counted_under_the_factory_that_made_it(
    async_proxied: AsyncEngine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
) -> None:
    """As for a sync factory's drop-in session: counted under its own factory's service."""
    first, latest = f"{service}-orders", f"{service}-billing"
    Orders = rdb.AsyncResilientSession(async_proxied, service=first)
    rdb.AsyncResilientSession(async_proxied, service=latest)
    await ASYNC_DROP_IN_COMMITS[how](Orders, "warm")
    fault_proxy.lose_commit_answer()
    with pytest.raises(sa.exc.DBAPIError) as raised:
        await ASYNC_DROP_IN_COMMITS[how](Orders, how)
    assert fault_proxy.commits_lost == 1
    assert written(proxied, how) == 1
    assert_unknown_outcome(raised.value)
    assert (counted(first), counted(latest)) == (1, 0)


def test_a_unit_that_committed_part_of_its_work_is_never_answered_retry(
    engine: sa.Engine, service: str
) -> None:
    """The unit commits its first part itself, then its connection is lost: not replayed (the
    first part would be written twice), and neither ``is_transient`` nor the web layer says
    to try again (a 503 with Retry-After did)."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE lost_notes (who text NOT NULL)"))
    Sessions = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.insert(NOTES).values(who="first part"))
        session.commit()
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        session.execute(sa.insert(NOTES).values(who="second part"))

    with pytest.raises(sa.exc.DBAPIError) as raised:
        Sessions.run(unit)
    assert calls == [1]
    assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT  # what the error is
    assert not rdb.is_transient(raised.value)  # what a replay would do
    problem = problem_details(raised.value)
    assert problem is not None
    assert (problem.status, problem.body["type"]) == (
        500,
        "urn:resilient-db:problem:partly-committed",
    )
    assert "Retry-After" not in problem.headers
    assert written(engine, "first part") == 1
    assert written(engine, "second part") == 0


def test_a_commit_sent_on_the_drivers_own_connection_outside_a_unit_is_an_unknown_outcome(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    """Drop-in use, the COMMIT sent on psycopg's own connection (SQLAlchemy never sees it):
    its lost answer is an unknown outcome too, not a transient error."""
    Sessions = rdb.ResilientSession(proxied, service=service)
    with Sessions() as session:
        session.execute(sa.insert(NOTES).values(who="raw"))
        driver = session.connection().connection.driver_connection
        assert driver is not None
        fault_proxy.lose_commit_answer()
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's own error
            driver.execute("COMMIT")
        session.invalidate()
    assert fault_proxy.commits_lost == 1
    assert written(proxied, "raw") == 1
    assert rdb.classify(raised.value) is rdb.Outcome.COMMIT_UNKNOWN
    assert not rdb.is_transient(raised.value)


def verified(service: str, what: str) -> int:
    return int(rdb.health()["services"][service]["counters"][what])


def assert_partly_committed_not_unknown(exc: BaseException) -> None:
    """``exc`` is a lost connection of an attempt known to have committed part of its work:
    not an unknown outcome, not transient, answered 500 ``partly-committed``."""
    assert rdb.classify(exc) is rdb.Outcome.DISCONNECT
    assert not rdb.is_transient(exc)
    problem = problem_details(exc)
    assert problem is not None
    assert (problem.status, problem.body["type"]) == (
        500,
        "urn:resilient-db:problem:partly-committed",
    )


def test_a_units_own_commit_midway_whose_answer_is_lost_and_committed_is_partly_committed(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    """The unit's own ``session.commit()`` midway loses its answer; it committed. It was an
    unknown outcome (``COMMIT_UNKNOWN``, counted) although its marker's claim can tell: now
    the check finds it committed, and the error is the partly committed attempt's (outcome
    known), never replayed."""
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.insert(NOTES).values(who="first part"))
        fault_proxy.lose_commit_answer()
        session.commit()
        session.execute(sa.insert(NOTES).values(who="second part"))

    with pytest.raises(sa.exc.DBAPIError) as raised:
        Sessions.run(unit)
    assert fault_proxy.commits_lost == 1
    assert calls == [1]
    assert written(proxied, "first part") == 1
    assert written(proxied, "second part") == 0
    assert_partly_committed_not_unknown(raised.value)
    assert unknown_commits(service) == 0
    assert verified(service, "verified_commits") == 1


def test_a_units_own_commit_midway_whose_answer_is_lost_and_not_committed_is_replayed(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    """The unit's own ``session.commit()`` midway, the first thing it commits, never reaches
    the server (the proxy swallows it; the server rolls it back when the connection is cut).
    It was an unknown outcome; now the marker's claim proves it not committed (its fence goes
    in), and the whole unit is replayed, once: done, every row written once."""
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.insert(NOTES).values(who="first part"))
        if len(calls) == 1:
            fault_proxy.swallow_commit()
            releaser = held_and_released(fault_proxy)
            try:
                session.commit()
            finally:
                releaser.join(15)
        else:
            session.commit()
        session.execute(sa.insert(NOTES).values(who="second part"))

    Sessions.run(unit)
    assert fault_proxy.commits_swallowed == 1
    assert calls == [1, 1]
    assert written(proxied, "first part") == 1
    assert written(proxied, "second part") == 1
    assert unknown_commits(service) == 0
    assert verified(service, "verified_not_committed") == 1


@pytest.mark.asyncio
async def test_an_async_units_own_commit_midway_whose_answer_is_lost_is_settled(
    async_proxied: AsyncEngine, proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    """Both cases of the two tests above on the async drivers: a lost answer of a committed
    own COMMIT midway is partly committed (known), one that never reached the server is
    replayed."""
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service)
    calls: list[str] = []

    async def committed(session: AsyncSession) -> None:
        calls.append("committed")
        await session.execute(sa.insert(NOTES).values(who="committed"))
        fault_proxy.lose_commit_answer()
        await session.commit()
        await session.execute(sa.insert(NOTES).values(who="after committed"))

    with pytest.raises(sa.exc.DBAPIError) as raised:
        await Sessions.run(committed)
    assert calls == ["committed"]
    assert written(proxied, "committed") == 1
    assert written(proxied, "after committed") == 0
    assert_partly_committed_not_unknown(raised.value)

    async def swallowed(session: AsyncSession) -> None:
        calls.append("swallowed")
        await session.execute(sa.insert(NOTES).values(who="swallowed"))
        if calls.count("swallowed") == 1:
            fault_proxy.swallow_commit()
            releaser = held_and_released(fault_proxy)
            await session.commit()
            releaser.join(15)
        else:
            await session.commit()
        await session.execute(sa.insert(NOTES).values(who="after swallowed"))

    await Sessions.run(swallowed)
    assert calls.count("swallowed") == 2
    assert written(proxied, "swallowed") == 1
    assert written(proxied, "after swallowed") == 1
    assert unknown_commits(service) == 0
    assert verified(service, "verified_commits") == 1
    assert verified(service, "verified_not_committed") == 1


#: pools that hand a thread (StaticPool: everyone) the connection it already holds
ONE_CONNECTION_POOLS = {
    "StaticPool": sa.pool.StaticPool,
    "SingletonThreadPool": sa.pool.SingletonThreadPool,
}


def checked_out(engine: sa.Engine) -> list[int]:
    """Checkouts less checkins of ``engine``'s pool from now on, as its events count them."""
    held = [0]
    sa.event.listen(engine, "checkout", lambda *_: held.__setitem__(0, held[0] + 1))
    sa.event.listen(engine, "checkin", lambda *_: held.__setitem__(0, held[0] - 1))
    return held


@pytest.mark.parametrize("pool", sorted(ONE_CONNECTION_POOLS))
def test_a_lost_own_commit_midway_on_a_one_connection_pool_is_an_unknown_outcome(
    proxied: sa.Engine, pg_database: str, fault_proxy: FaultProxy, service: str, pool: str
) -> None:
    """The check of a lost own COMMIT needs a second connection while the unit holds its own;
    a pool of one connection (per thread) handed the check the unit's own, dead one. The check
    invalidated it under the unit: SQLAlchemy then raised ``AttributeError: 'NoneType' object
    has no attribute 'closed'`` (SingletonThreadPool), or left the pool counting a connection
    checked out for good (StaticPool). Now no check is made: the outcome is unknown, said as
    such, and the pool serves the next unit."""
    engine = sa.create_engine(fault_proxy.url(pg_database), poolclass=ONE_CONNECTION_POOLS[pool])
    held = checked_out(engine)
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Session) -> None:
        session.execute(sa.insert(NOTES).values(who="first part"))
        fault_proxy.lose_commit_answer()
        session.commit()
        session.execute(sa.insert(NOTES).values(who="second part"))

    try:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            Sessions.run(unit)
        assert fault_proxy.commits_lost == 1
        assert_unknown_outcome(raised.value)
        assert unknown_commits(service) == 1
        assert held == [0]
        assert Sessions.run(lambda s: s.scalar(sa.select(sa.func.count()).select_from(NOTES))) == 1
        assert held == [0]
    finally:
        engine.dispose()
    assert written(proxied, "first part") == 1
    assert written(proxied, "second part") == 0


@pytest.mark.asyncio
async def test_a_lost_own_commit_midway_on_an_async_static_pool_is_an_unknown_outcome(
    proxied: sa.Engine, pg_database: str, fault_proxy: FaultProxy, service: str, async_driver: str
) -> None:
    """The async factory's twin of the test above (StaticPool: the one pool of one connection
    an async engine takes)."""
    engine = create_async_engine(
        fault_proxy.url(pg_database, driver=async_driver), poolclass=sa.pool.StaticPool
    )
    held = checked_out(engine.sync_engine)
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.insert(NOTES).values(who="first part"))
        fault_proxy.lose_commit_answer()
        await session.commit()
        await session.execute(sa.insert(NOTES).values(who="second part"))

    async def count(session: AsyncSession) -> Any:
        return await session.scalar(sa.select(sa.func.count()).select_from(NOTES))

    try:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            await Sessions.run(unit)
        assert fault_proxy.commits_lost == 1
        assert_unknown_outcome(raised.value)
        assert unknown_commits(service) == 1
        assert held == [0]
        assert await Sessions.run(count) == 1
        assert held == [0]
    finally:
        await engine.dispose()
    assert written(proxied, "first part") == 1
    assert written(proxied, "second part") == 0
