"""Results read through a server-side cursor (``stream_results``, ``yield_per``,
``AsyncSession.stream``), and work on the driver's own connection (psycopg's pipeline mode,
``COPY``), in a unit whose backend is lost midway (docs/units-of-work.md). Real server,
real faults: ``pg_terminate_backend`` from another connection, a server restart.

- A fault between two fetches of a stream replays the unit from its start (its code sees the
  first attempt's rows again), the breaker is told of the failure and then of the success, and
  no connection is left checked out.
- A unit that returns a streamed result is refused (``TypeError``, rolled back, not retried):
  its cursor ends with the unit's transaction, so reading it after the unit failed, far from
  the unit (psycopg: ``InvalidCursorName``; asyncpg: its own ``NoActiveSQLTransactionError``,
  not even SQLAlchemy's). A buffered result is returned as before.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pybreaker
import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, Base, Item
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

ROWS = 120
STREAMED = {"stream_results": True, "yield_per": 10}


class Told(pybreaker.CircuitBreakerListener):
    """What the unit's circuit breaker was told, in order."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.told.append("failure")

    def success(self, cb: pybreaker.CircuitBreaker) -> None:
        self.told.append("success")


@pytest.fixture
def seeded(engine: sa.Engine) -> sa.Engine:
    Base.metadata.create_all(engine)
    rdb.install_commit_markers(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Item), [{"name": f"row {i}"} for i in range(ROWS)])
    return engine


def names(engine: sa.Engine, like: str) -> int:
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(sa.func.count()).select_from(Item).where(Item.name.like(like))
        )
        return int(found.scalar_one())


# -- a stream cut between two fetches ----------------------------------------------------------


def _orm_stream(session: Session) -> Any:
    return session.execute(sa.select(Item.id), execution_options=STREAMED)


def _connection_stream(session: Session) -> Any:
    return session.connection().execution_options(**STREAMED).execute(sa.select(Item.id))


# psycopg warns of the failed attempt's server-side cursor, which SQLAlchemy leaves unclosed
# after a lost connection (plain sessionmaker alike; the server's cursor went with its
# backend): collected in the test, not later
@pytest.mark.filterwarnings("ignore:.*was deleted while still open:ResourceWarning")
@pytest.mark.parametrize("stream", [_orm_stream, _connection_stream], ids=["orm", "connection"])
def test_a_stream_whose_backend_ended_midway_replays_the_unit_from_its_start(
    seeded: sa.Engine,
    pg_server: PostgresServer,
    service: str,
    stream: Callable[[Session], Any],
) -> None:
    told = Told()
    Sessions = rdb.ResilientSession(seeded, service=service, breaker_listeners=[told])
    calls: list[int] = []
    seen: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.add(Item(name=f"written {len(calls)}"))
        session.flush()
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        read = 0
        for (item_id,) in stream(session):
            seen.append(item_id)
            read += 1
            if read == 30 and len(calls) == 1:
                pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        return read

    assert Sessions.run(unit) == ROWS + 1
    assert calls == [1, 1]
    assert len(seen) >= 30 + ROWS + 1  # its code saw the first attempt's rows, then all again
    assert told.told == ["failure", "success"]
    assert names(seeded, "written %") == 1  # the first attempt's write rolled back
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"disconnect": 1}
    assert seeded.pool.checkedout() == 0
    gc.collect()


@pytest.mark.server_control
@pytest.mark.filterwarnings("ignore:.*was deleted while still open:ResourceWarning")
def test_a_stream_cut_by_a_server_restart_replays_the_unit(
    seeded: sa.Engine, pg_server: PostgresServer, service: str
) -> None:
    told = Told()
    Sessions = rdb.ResilientSession(seeded, service=service, breaker_listeners=[told])
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        read = 0
        for _ in _orm_stream(session):
            read += 1
            if read == 30 and len(calls) == 1:
                pg_server.restart()
        return read

    assert Sessions.run(unit) == ROWS
    assert calls == [1, 1]
    assert told.told == ["failure", "success"]
    assert seeded.pool.checkedout() == 0
    gc.collect()


# -- psycopg's own connection: pipeline mode, COPY -----------------------------------------------


def _pipelined(session: Session, raw: Any, kill: Callable[[], None], first: bool) -> None:
    with raw.pipeline():
        raw.execute("INSERT INTO items (name) VALUES (%s)", ("raw piped a",))
        if first:
            kill()
        raw.execute("INSERT INTO items (name) VALUES (%s)", ("raw piped b",))


def _copied(session: Session, raw: Any, kill: Callable[[], None], first: bool) -> None:
    with raw.cursor() as cursor, cursor.copy("COPY items (name) FROM STDIN") as copy:
        for i in range(500):
            copy.write_row((f"raw copied {i}",))
            if i == 250 and first:
                kill()


@pytest.mark.parametrize("work", [_pipelined, _copied], ids=["pipeline", "copy"])
def test_driver_work_cut_midway_replays_the_unit_once_written(
    seeded: sa.Engine,
    pg_server: PostgresServer,
    service: str,
    work: Callable[[Session, Any, Callable[[], None], bool], None],
) -> None:
    """psycopg's pipeline mode and ``COPY ... FROM STDIN`` on the unit's driver connection,
    its backend ended midway: the unit is replayed, and what it wrote is there once."""
    told = Told()
    Sessions = rdb.ResilientSession(seeded, service=service, breaker_listeners=[told])
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        raw = session.connection().connection.driver_connection
        pid = raw.info.backend_pid

        def kill() -> None:
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")

        work(session, raw, kill, len(calls) == 1)

    Sessions.run(unit)
    assert calls == [1, 1]
    assert told.told == ["failure", "success"]
    expected = 2 if work is _pipelined else 500
    assert names(seeded, "raw %") == expected
    assert seeded.pool.checkedout() == 0


# -- a streamed result returned out of a unit ----------------------------------------------------


def _written(stream: Callable[[Session], Any]) -> Callable[[Session], Any]:
    """A unit that writes, then returns ``stream(session)``."""

    def unit(session: Session) -> Any:
        session.add(Item(name="returned"))
        return stream(session)

    return unit


@pytest.mark.parametrize(
    "unit",
    [
        _written(_orm_stream),
        _written(_connection_stream),
        _written(lambda s: _orm_stream(s).scalars()),
        _written(lambda s: _orm_stream(s).mappings()),
        _written(lambda s: s.scalars(sa.select(Item.id), execution_options=STREAMED)),
    ],
    ids=["orm", "connection", "scalars", "mappings", "session-scalars"],
)
def test_a_unit_returning_a_streamed_result_is_refused(
    seeded: sa.Engine, service: str, unit: Callable[[Session], Any]
) -> None:
    """Before: returned, and reading it after the unit raised psycopg's InvalidCursorName
    (the unit's COMMIT had closed its cursor), the unit's write committed."""
    Sessions = rdb.ResilientSession(seeded, service=service)
    with pytest.raises(TypeError, match=r"returned \w+Result, whose rows come from a server-sid"):
        Sessions.run(unit)
    assert names(seeded, "returned") == 0  # rolled back
    assert rdb.health()["services"][service]["counters"]["attempts"] == 1
    assert seeded.pool.checkedout() == 0


def test_a_unit_returning_a_buffered_result_returns_it(seeded: sa.Engine, service: str) -> None:
    """A result of a client-side cursor holds its rows: returned, readable after the unit, as
    after a plain ``Session.begin()`` block."""
    Sessions = rdb.ResilientSession(seeded, service=service)
    assert len(Sessions.run(lambda s: s.execute(sa.select(Item.id))).all()) == ROWS
    assert len(Sessions.run(lambda s: s.scalars(sa.select(Item.id))).all()) == ROWS
    assert len(Sessions.run(lambda s: s.connection().execute(sa.select(Item.id))).all()) == ROWS


# -- async, both drivers ---------------------------------------------------------------------


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def aseeded(seeded: sa.Engine, pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_async_engine(pg_async_url)
    yield made
    await made.dispose()


async def _astream(session: AsyncSession) -> Any:
    session.add(Item(name="returned"))
    return await session.stream(sa.select(Item.id))


async def _astream_scalars(session: AsyncSession) -> Any:
    session.add(Item(name="returned"))
    return await session.stream_scalars(sa.select(Item.id))


async def _astream_mappings(session: AsyncSession) -> Any:
    return (await _astream(session)).mappings()


async def _aconnection_stream(session: AsyncSession) -> Any:
    session.add(Item(name="returned"))
    await session.flush()
    return await (await session.connection()).stream(sa.select(Item.id))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "unit",
    [_astream, _astream_scalars, _astream_mappings, _aconnection_stream],
    ids=["stream", "stream_scalars", "mappings", "connection"],
)
async def test_an_async_unit_returning_a_streamed_result_is_refused(
    aseeded: AsyncEngine, seeded: sa.Engine, service: str, unit: Callable[..., Any]
) -> None:
    """Before: returned, and reading it after the unit raised asyncpg's own
    NoActiveSQLTransactionError (psycopg: InvalidCursorName), the unit's write committed."""
    Sessions = rdb.AsyncResilientSession(aseeded, service=service)
    with pytest.raises(TypeError, match=r"returned Async\w*Result, whose rows come from a server"):
        await Sessions.run(unit)
    assert names(seeded, "returned") == 0  # rolled back
    assert rdb.health()["services"][service]["counters"]["attempts"] == 1
    assert aseeded.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.asyncio
@pytest.mark.server_control
@pytest.mark.filterwarnings("ignore:.*was deleted while still open:ResourceWarning")
async def test_an_async_stream_cut_by_a_server_restart_replays_the_unit(
    aseeded: AsyncEngine, pg_server: PostgresServer, service: str
) -> None:
    told = Told()
    Sessions = rdb.AsyncResilientSession(aseeded, service=service, breaker_listeners=[told])
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        read = 0
        stream = await session.stream_scalars(sa.select(Item.id).execution_options(yield_per=10))
        async for _ in stream:
            read += 1
            if read == 30 and len(calls) == 1:
                await asyncio.to_thread(pg_server.restart)
        return read

    assert await Sessions.run(unit) == ROWS
    assert calls == [1, 1]
    assert told.told == ["failure", "success"]
    assert aseeded.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    gc.collect()
