"""25006 (read_only_sql_transaction) is two different failures, told apart by what the server
reported to the driver at connect (PostgreSQL 14+: ``in_hot_standby``,
``default_transaction_read_only``), never by the message.

- From a server that takes writes (both off), the transaction was read-only by the
  application's doing (``SET TRANSACTION READ ONLY``, ``postgresql_readonly``): a bug of the
  unit, raised after one attempt, the pool kept, nothing for the breaker. Before, it was a lost
  server: the unit was retried, the pool emptied, and two such calls opened the breaker for
  every unit of the service.
- From a server that takes no writes (read-only by default here, made so for real with
  ``ALTER DATABASE``; a hot standby in test_standby_mistake.py and test_failover.py), it is a
  server lost to a failover: the pool's connections are replaced and the unit is replayed, and
  it succeeds once the server it reaches takes writes. This replaces the 25006 of the
  ``RAISE ... USING ERRCODE`` table (scenarios.TRANSIENT), which a server that takes writes
  raised.

Real server, real drivers (psycopg; asyncpg and psycopg's async connection), exact SQLSTATEs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator

import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import (
    ASYNC_DRIVERS,
    Base,
    assert_breaker_untouched,
    metadata_engine,
    set_read_only_database,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._classify import server_takes_writes
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

WRITE = sa.text("INSERT INTO items (name) VALUES (:name)")
PID = sa.text("SELECT pg_backend_pid()")
COUNT = sa.text("SELECT count(*) FROM items")
#: a breaker that two counted failures open: one retried unit would open it
CONFIG = rdb.Config(failure_threshold=2, reset_timeout=60.0)
UNITS = 10


def _set_transaction_read_only(session: Session) -> None:
    session.execute(sa.text("SET TRANSACTION READ ONLY"))


def _postgresql_readonly(session: Session) -> None:
    session.connection(execution_options={"postgresql_readonly": True})


#: how a unit makes its own transaction read-only
READ_ONLY_WAYS: dict[str, Callable[[Session], None]] = {
    "set-transaction-read-only": _set_transaction_read_only,
    "postgresql_readonly": _postgresql_readonly,
}


# -- sync (psycopg) --------------------------------------------------------------------------------
@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from metadata_engine(pg_url, Base)


def _pooled_pids(engine: sa.Engine) -> set[int]:
    """The backends of the pool's first two connections (made now if the pool has none)."""
    with engine.connect() as a, engine.connect() as b:
        return {int(a.execute(PID).scalar_one()), int(b.execute(PID).scalar_one())}


@pytest.mark.parametrize("way", sorted(READ_ONLY_WAYS))
def test_writes_in_read_only_transactions_on_a_primary_raise_at_once(
    engine: sa.Engine, service: str, way: str
) -> None:
    _raise_at_once(engine, service, way)


@pytest.mark.parametrize(
    ("driver", "way"),
    [
        ("psycopg2", "set-transaction-read-only"),
        ("psycopg2", "postgresql_readonly"),
        # (pg8000's postgresql_readonly sets the session's default_transaction_read_only,
        # which the server then reports on: a read-only server as far as can be told)
        ("pg8000", "set-transaction-read-only"),
    ],
)
def test_writes_in_read_only_transactions_raise_at_once_on_the_other_drivers(
    pg_server: PostgresServer, pg_database: str, service: str, driver: str, way: str
) -> None:
    """The server's reported parameters were read from psycopg 3 and asyncpg only: on psycopg2
    and pg8000 such a write was a lost server (pool replaced, the unit replayed, each attempt
    a failure for the breaker, which a few buggy requests opened)."""
    other = pg_server.url(pg_database).replace("+psycopg:", f"+{driver}:")
    for engine in metadata_engine(other, Base):
        _raise_at_once(engine, service, way)


def _raise_at_once(engine: sa.Engine, service: str, way: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    before = _pooled_pids(engine)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        READ_ONLY_WAYS[way](session)
        session.execute(WRITE, {"name": f"ro-{len(calls)}"})

    for n in range(1, UNITS + 1):
        with pytest.raises(sa_exc.DBAPIError) as info:
            Sessions.run(unit)
        assert rdb.sqlstate_of(info.value) == "25006"  # the server's own refusal
        assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
        assert not rdb.is_transient(info.value)
        assert not info.value.connection_invalidated
        assert len(calls) == n  # one attempt each
    assert_breaker_untouched(service)
    assert _pooled_pids(engine) == before  # the pool's connections survived
    Sessions.run(lambda s: s.execute(WRITE, {"name": "after"}))
    with engine.connect() as conn:
        assert conn.execute(COUNT).scalar_one() == 1


def test_a_server_that_takes_no_writes_is_lost_and_the_unit_resumes_where_writes_are_taken(
    engine: sa.Engine,
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failover seen from the client: the server the pool's connections reach takes no
    writes (it reports ``default_transaction_read_only`` on at connect), then one does. The
    pool's connections replaced say so (SQLAlchemy does not take 25006 for a lost connection:
    replacing them is resilient_db's doing)."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    set_read_only_database(pg_server, pg_database, True)
    engine.dispose()  # connections made from now on are read-only by default
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    before = _pooled_pids(engine)
    seen: list[BaseException] = []

    def unit(session: Session) -> int:
        try:
            session.execute(WRITE, {"name": "resumed"})
        except sa_exc.DBAPIError as exc:
            seen.append(exc)
            set_read_only_database(pg_server, pg_database, False)  # writes are taken again
            raise
        return len(seen)

    assert Sessions.run(unit) == 1
    assert rdb.sqlstate_of(seen[0]) == "25006"
    assert rdb.classify(seen[0]) is rdb.Outcome.DISCONNECT
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"disconnect": 1}
    assert not before & _pooled_pids(engine), "connections made before the 25006 were reused"
    with engine.connect() as conn:
        assert conn.execute(COUNT).scalar_one() == 1
    lines = [r.getMessage() for r in caplog.records if "Replacing the pooled" in r.getMessage()]
    assert len(lines) == 1
    assert f"service={service} database {pg_database} answered SQLSTATE 25006" in lines[0]


# -- async (asyncpg, psycopg) ----------------------------------------------------------------------
@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def aengine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    async with eng.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield eng
    await eng.dispose()


async def _apooled_pids(engine: AsyncEngine) -> set[int]:
    async with engine.connect() as a, engine.connect() as b:
        return {int((await a.execute(PID)).scalar_one()), int((await b.execute(PID)).scalar_one())}


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(COUNT)).scalar_one())


@pytest.mark.asyncio
@pytest.mark.parametrize("way", sorted(READ_ONLY_WAYS))
async def test_async_writes_in_read_only_transactions_on_a_primary_raise_at_once(
    aengine: AsyncEngine, service: str, way: str
) -> None:
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    before = await _apooled_pids(aengine)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> None:
        calls.append(1)
        if way == "postgresql_readonly":
            await session.connection(execution_options={"postgresql_readonly": True})
        else:
            await session.execute(sa.text("SET TRANSACTION READ ONLY"))
        await session.execute(WRITE, {"name": f"ro-{len(calls)}"})

    for n in range(1, UNITS + 1):
        with pytest.raises(sa_exc.DBAPIError) as info:
            await Sessions.run(unit)
        assert rdb.sqlstate_of(info.value) == "25006"
        assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
        assert not info.value.connection_invalidated
        assert len(calls) == n
    assert_breaker_untouched(service)
    assert await _apooled_pids(aengine) == before

    async def write(session: AsyncSession) -> None:
        await session.execute(WRITE, {"name": "after"})

    await Sessions.run(write)
    assert await _count(aengine) == 1


@pytest.mark.asyncio
async def test_async_a_server_that_takes_no_writes_is_lost_and_the_unit_resumes(
    aengine: AsyncEngine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    set_read_only_database(pg_server, pg_database, True)
    await aengine.dispose()
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    before = await _apooled_pids(aengine)
    seen: list[BaseException] = []

    async def unit(session: AsyncSession) -> int:
        try:
            await session.execute(WRITE, {"name": "resumed"})
        except sa_exc.DBAPIError as exc:
            seen.append(exc)
            set_read_only_database(pg_server, pg_database, False)
            raise
        return len(seen)

    assert await Sessions.run(unit) == 1
    assert rdb.sqlstate_of(seen[0]) == "25006"
    assert rdb.classify(seen[0]) is rdb.Outcome.DISCONNECT
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"disconnect": 1}
    assert not before & await _apooled_pids(aengine)
    assert await _count(aengine) == 1


def test_the_server_reports_what_tells_the_two_apart(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str
) -> None:
    """What the classification reads: the driver's copy of the server's report."""
    with engine.connect() as conn:
        assert server_takes_writes(conn.connection.driver_connection)
    set_read_only_database(pg_server, pg_database, True)
    engine.dispose()
    with engine.connect() as conn:
        assert not server_takes_writes(conn.connection.driver_connection)


# -- errors SQLAlchemy's handle_error did not see -------------------------------------------------
def _plain_write(engine: sa.Engine, *, read_only: bool) -> None:
    with engine.begin() as conn:
        if read_only:
            conn.execute(sa.text("SET TRANSACTION READ ONLY"))
        conn.execute(WRITE, {"name": "plain"})


def test_the_drivers_own_connection_and_an_engine_without_a_factory_are_told_apart_too(
    pg_url: str, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """No resilient factory on the engine (``with_self_healing`` around plain SQLAlchemy code),
    or a statement sent on psycopg's own connection inside a unit: the classifier reads the
    server's report from the connection that raised the error."""
    plain = sa.create_engine(pg_url)
    hooked = sa.create_engine(pg_url)
    Base.metadata.create_all(plain)
    calls: list[int] = []

    def handler() -> None:
        calls.append(1)
        _plain_write(plain, read_only=True)

    def raw(session: Session) -> None:
        calls.append(1)
        driver = session.connection().connection.driver_connection
        driver.execute("SET TRANSACTION READ ONLY")
        driver.execute("INSERT INTO items (name) VALUES ('raw')")

    try:
        with pytest.raises(sa_exc.DBAPIError) as info:
            rdb.with_self_healing(handler, service=f"{service}-plain", config=CONFIG)
        assert rdb.sqlstate_of(info.value) == "25006"
        assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
        assert calls == [1]
        assert_breaker_untouched(f"{service}-plain")

        Sessions = rdb.ResilientSession(hooked, service=service, config=CONFIG)
        calls.clear()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as raw_info:  # unwrapped
            Sessions.run(raw)
        assert rdb.classify(raw_info.value) is rdb.Outcome.NOT_TRANSIENT
        assert calls == [1]
        assert_breaker_untouched(service)

        # a server that takes no writes: the same error is a lost server
        set_read_only_database(pg_server, pg_database, True)
        plain.dispose()
        with pytest.raises(sa_exc.DBAPIError) as info:
            _plain_write(plain, read_only=False)
        assert rdb.sqlstate_of(info.value) == "25006"
        assert rdb.classify(info.value) is rdb.Outcome.DISCONNECT
    finally:
        plain.dispose()
        hooked.dispose()


@pytest.mark.asyncio
async def test_async_an_engine_without_a_factory_is_told_apart_too(
    pg_async_url: str, pg_server: PostgresServer, pg_database: str
) -> None:
    plain = create_async_engine(pg_async_url)

    async def write(*, read_only: bool) -> None:
        async with plain.begin() as conn:
            if read_only:
                await conn.execute(sa.text("SET TRANSACTION READ ONLY"))
            await conn.execute(WRITE, {"name": "plain"})

    try:
        async with plain.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        with pytest.raises(sa_exc.DBAPIError) as info:
            await write(read_only=True)
        assert rdb.sqlstate_of(info.value) == "25006"
        assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
        set_read_only_database(pg_server, pg_database, True)
        await plain.dispose()
        with pytest.raises(sa_exc.DBAPIError) as info:
            await write(read_only=False)
        assert rdb.sqlstate_of(info.value) == "25006"
        assert rdb.classify(info.value) is rdb.Outcome.DISCONNECT
    finally:
        await plain.dispose()


# -- the transaction the refusal failed stays failed -----------------------------------------------
FAILED_TRANSACTION = "25P02"  # in_failed_sql_transaction: what PostgreSQL answers next


def test_a_write_refused_read_only_leaves_its_transaction_failed(
    engine: sa.Engine, service: str
) -> None:
    """The server, asked whether it takes writes (its failed transaction rolled back first),
    leaves the application's transaction failed as PostgreSQL would: a statement sent next on
    the same connection, before a rollback, is refused (25P02), not run in a new transaction
    that a commit would keep without what came before the refusal; a unit that swallows the
    error commits nothing either."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    with engine.connect() as conn:  # drop-in
        conn.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa_exc.DBAPIError) as refused:
            conn.execute(WRITE, {"name": "refused"})
        assert rdb.sqlstate_of(refused.value) == "25006"
        with pytest.raises(sa_exc.DBAPIError) as after:
            conn.execute(WRITE, {"name": "after"})
        assert rdb.sqlstate_of(after.value) == FAILED_TRANSACTION
        conn.rollback()

    def unit(session: Session) -> None:
        session.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa_exc.DBAPIError) as refused:  # (swallowed by the unit)
            session.execute(WRITE, {"name": "refused"})
        assert rdb.sqlstate_of(refused.value) == "25006"
        session.execute(WRITE, {"name": "after"})

    with pytest.raises(sa_exc.DBAPIError) as info:
        Sessions.run(unit)
    assert rdb.sqlstate_of(info.value) == FAILED_TRANSACTION
    with engine.connect() as conn:
        assert conn.execute(COUNT).scalar_one() == 0


@pytest.mark.asyncio
async def test_async_a_write_refused_read_only_leaves_its_transaction_failed(
    aengine: AsyncEngine, service: str
) -> None:
    rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    async with aengine.connect() as conn:  # drop-in
        await conn.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa_exc.DBAPIError) as refused:
            await conn.execute(WRITE, {"name": "refused"})
        assert rdb.sqlstate_of(refused.value) == "25006"
        with pytest.raises(sa_exc.DBAPIError) as after:
            await conn.execute(WRITE, {"name": "after"})
        assert rdb.sqlstate_of(after.value) == FAILED_TRANSACTION
        await conn.rollback()
    assert await _count(aengine) == 0
