"""A factory bound to a ``Connection`` that was checked out before the factory was made
(``conn = engine.connect(); ResilientSession(conn)``), or bound to one later with
``configure(bind=conn)``: that connection never passed the factory's checkout hook, so it is
prepared for the commit protocol when the factory is bound to it. Its units' lost COMMIT
answers are settled as any unit's: a read replayed, a write verified by its marker (once)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import async_connect_args, create_ledger, ledger_rows
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _unit
from resilient_db.testing import FaultProxy, PostgresServer
from resilient_db.web import problem_details

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    return create_ledger(pg_server, pg_database, markers=True)


@pytest.fixture
def proxied(fault_proxy: FaultProxy, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(fault_proxy.url(database), connect_args={"connect_timeout": 2})
    yield engine
    engine.dispose()


def bound_to_an_earlier_connection(
    engine: sa.Engine, service: str, how: str
) -> tuple[sa.Connection, rdb.ResilientSession[Session]]:
    conn = engine.connect()  # checked out before the engine had any resilient factory
    if how == "constructor":
        return conn, rdb.ResilientSession(conn, service=service)
    Sessions = rdb.ResilientSession(service=service)
    Sessions.configure(bind=conn)
    return conn, Sessions


@pytest.mark.parametrize("how", ["constructor", "configure"])
def test_a_read_on_an_earlier_connection_with_a_lost_answer_is_replayed(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, how: str
) -> None:
    conn, Sessions = bound_to_an_earlier_connection(proxied, service, how)
    calls = []

    def read(session: Session) -> int:
        calls.append(1)
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    try:
        fault_proxy.lose_commit_answer()
        assert Sessions.run(read) == 1  # not CommitOutcomeUnknownError
    finally:
        conn.close()
    assert fault_proxy.commits_lost == 1
    assert calls == [1, 1]


@pytest.mark.parametrize("how", ["constructor", "configure"])
def test_a_write_on_an_earlier_connection_with_a_lost_answer_is_verified_once(
    *,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    database: str,
    service: str,
    how: str,
) -> None:
    conn, Sessions = bound_to_an_earlier_connection(proxied, service, how)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def write(session: Session) -> str:
        calls.append(1)
        session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
        return unit

    try:
        fault_proxy.lose_commit_answer()
        assert Sessions.run(write) == unit  # verified by its marker
        # the connection's transaction, whose COMMIT failed, is ended: the next unit begins
        # (it raised InvalidRequestError, "already initialized a SQLAlchemy Transaction()")
        assert Sessions.run(lambda session: session.execute(sa.text("SELECT 7")).scalar()) == 7
    finally:
        conn.close()
    assert fault_proxy.commits_lost == 1
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


# -- async: the AsyncConnection an async factory is bound to ------------------------------------
@pytest_asyncio.fixture(params=["asyncpg", "psycopg"])
async def aproxied(
    request: pytest.FixtureRequest, fault_proxy: FaultProxy, database: str
) -> AsyncIterator[AsyncEngine]:
    driver = request.param
    engine = create_async_engine(
        fault_proxy.url(database, driver=driver), connect_args=async_connect_args(driver, 2)
    )
    yield engine
    await engine.dispose()


@pytest.mark.asyncio
async def test_an_async_read_on_an_earlier_connection_with_a_lost_answer_is_replayed(
    aproxied: AsyncEngine, fault_proxy: FaultProxy, service: str
) -> None:
    conn = await aproxied.connect()  # checked out before the engine had a resilient factory
    Sessions = rdb.AsyncResilientSession(conn, service=service)
    calls = []

    async def read(session: AsyncSession) -> int:
        calls.append(1)
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    try:
        fault_proxy.lose_commit_answer()
        assert await Sessions.run(read) == 1  # not CommitOutcomeUnknownError
    finally:
        await conn.close()
    assert fault_proxy.commits_lost == 1
    assert calls == [1, 1]


@pytest.mark.asyncio
async def test_an_async_write_on_an_earlier_connection_with_a_lost_answer_is_verified_once(
    aproxied: AsyncEngine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    database: str,
    service: str,
) -> None:
    conn = await aproxied.connect()
    Sessions = rdb.AsyncResilientSession(conn, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def write(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit})
        return unit

    async def read(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 7"))).scalar_one())

    try:
        fault_proxy.lose_commit_answer()
        assert await Sessions.run(write) == unit  # verified by its marker
        assert await Sessions.run(read) == 7  # the failed COMMIT's transaction was ended
    finally:
        await conn.close()
    assert fault_proxy.commits_lost == 1
    assert calls == [1]
    assert ledger_rows(pg_server, database, unit) == 1


# -- a Connection in its caller's transaction ----------------------------------------------------
JOIN_MODES = ["conditional_savepoint", "rollback_only", "control_fully", "create_savepoint"]
INSERT = sa.text("INSERT INTO ledger (unit) VALUES (:u)")


@pytest.fixture
def direct(pg_server: PostgresServer, database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_server.url(database))
    yield engine
    engine.dispose()


@pytest.mark.parametrize("mode", JOIN_MODES)
def test_a_unit_joining_its_callers_transaction_is_replayed_only_inside_a_savepoint(
    *,
    direct: sa.Engine,
    pg_server: PostgresServer,
    database: str,
    service: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller wrote, then runs a unit on its Connection, in its transaction; the unit's
    first attempt fails with a serialization failure. Its rollback (without a savepoint) rolled
    the caller's whole transaction back, and the replay committed a transaction of its own:
    the unit's row in the database, the caller's gone, "done". Only inside a savepoint
    (``create_savepoint``) is it replayed; otherwise the error is raised as it is, and the
    caller's rollback leaves nothing."""
    caller, unit = f"caller-{uuid.uuid4()}", f"unit-{uuid.uuid4()}"
    calls = []

    def write(session: Session) -> str:
        calls.append(1)
        session.execute(INSERT, {"u": unit})
        if len(calls) == 1:
            session.execute(sa.text("SELECT serialization_failure()"))
        return unit

    with direct.connect() as conn:
        trans = conn.begin()
        conn.execute(INSERT, {"u": caller})
        Sessions = rdb.ResilientSession(conn, service=service, join_transaction_mode=mode)
        if mode == "create_savepoint":
            assert Sessions.run(write) == unit
            assert calls == [1, 1]
            assert trans.is_active
            seen = conn.execute(sa.text("SELECT unit FROM ledger ORDER BY unit")).scalars().all()
            assert seen == [caller, unit]
        else:
            with pytest.raises(sa.exc.OperationalError) as raised:
                Sessions.run(write)
            assert rdb.sqlstate_of(raised.value) == "40001"
            assert calls == [1], "replayed outside the caller's transaction"
            assert "Not replaying" in caplog.text
            assert "join_transaction_mode='create_savepoint'" in caplog.text
            assert "Commit markers are not installed" not in caplog.text
            # nothing of it was saved (the caller's transaction is rolled back): a web answer
            # must not say part of the change was
            problem = problem_details(raised.value)
            assert problem is not None
            assert not problem.body["type"].endswith("partly-committed")
        if trans.is_active:  # (the unit's rollback ended it, as SQLAlchemy's session does)
            trans.rollback()
    assert ledger_rows(pg_server, database, caller) == 0
    assert ledger_rows(pg_server, database, unit) == 0
    # the connection, checked out before the factory and in a transaction when bound, was
    # left unprepared (psycopg refuses the set-up there), not set to the fallback for good:
    # back in the pool, it is prepared at its next checkout
    assert direct.pool.checkedout() == 0

    def mode(session: Session) -> str:
        return str(session.connection().connection.driver_connection._rdb_mode)

    assert rdb.ResilientSession(direct, service=service).run(mode) == "markers"


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_an_async_unit_joining_its_callers_transaction_is_not_replayed(
    pg_server: PostgresServer, database: str, service: str, driver: str
) -> None:
    engine = create_async_engine(pg_server.url(database, driver=driver))
    caller, unit = f"caller-{uuid.uuid4()}", f"unit-{uuid.uuid4()}"
    calls = []

    async def write(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(INSERT, {"u": unit})
        await session.execute(sa.text("SELECT serialization_failure()"))

    try:
        async with engine.connect() as conn:
            trans = await conn.begin()
            await conn.execute(INSERT, {"u": caller})
            Sessions = rdb.AsyncResilientSession(conn, service=service)  # (the default mode)
            with pytest.raises(sa.exc.DBAPIError) as raised:
                await Sessions.run(write)
            assert rdb.sqlstate_of(raised.value) == "40001"
            assert calls == [1]
            if trans.is_active:
                await trans.rollback()
    finally:
        await engine.dispose()
    assert ledger_rows(pg_server, database, caller) == 0
    assert ledger_rows(pg_server, database, unit) == 0


@pytest.mark.parametrize("mode", ["create_savepoint", "conditional_savepoint-in-a-savepoint"])
def test_a_savepoint_unit_that_committed_part_of_its_work_is_not_replayed(
    direct: sa.Engine, pg_server: PostgresServer, database: str, service: str, mode: str
) -> None:
    """Inside a savepoint, the unit's own ``session.commit()`` releases it into the caller's
    transaction (no COMMIT is sent, which is what marked a unit as having committed part of its
    work): a transient error after it replayed the unit, and its first part was in the caller's
    transaction twice, committed by the caller."""
    caller, unit = f"caller-{uuid.uuid4()}", f"unit-{uuid.uuid4()}"
    calls = []

    def write(session: Session) -> None:
        calls.append(1)
        session.execute(INSERT, {"u": unit})
        session.commit()  # releases the savepoint: part of the work is the caller's now
        session.execute(INSERT, {"u": f"{unit}-2"})
        if len(calls) == 1:
            session.execute(sa.text("SELECT serialization_failure()"))

    with direct.connect() as conn:
        trans = conn.begin()
        conn.execute(INSERT, {"u": caller})
        if mode == "create_savepoint":
            Sessions = rdb.ResilientSession(conn, service=service, join_transaction_mode=mode)
        else:
            conn.begin_nested()  # the caller's savepoint: the default mode makes one too
            Sessions = rdb.ResilientSession(conn, service=service)
        with pytest.raises(sa.exc.OperationalError):
            Sessions.run(write)
        assert calls == [1], "replayed after it released part of its work to the caller"
        trans.commit()
    assert ledger_rows(pg_server, database, unit) == 1
    assert ledger_rows(pg_server, database, caller) == 1


@pytest.mark.asyncio
async def test_an_async_savepoint_unit_that_committed_part_of_its_work_is_not_replayed(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    engine = create_async_engine(pg_server.url(database, driver="asyncpg"))
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def write(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(INSERT, {"u": unit})
        await session.commit()
        await session.execute(sa.text("SELECT serialization_failure()"))

    try:
        async with engine.connect() as conn:
            trans = await conn.begin()
            Sessions = rdb.AsyncResilientSession(
                conn, service=service, join_transaction_mode="create_savepoint"
            )
            with pytest.raises(sa.exc.DBAPIError):
                await Sessions.run(write)
            assert calls == [1]
            await trans.commit()
    finally:
        await engine.dispose()
    assert ledger_rows(pg_server, database, unit) == 1


LEDGER = sa.Table("ledger", sa.MetaData(), sa.Column("unit", sa.Text))
OTHER = sa.Table("other", sa.MetaData(), sa.Column("unit", sa.Text))


def test_session_binds_reads_what_the_session_was_given(direct: sa.Engine) -> None:
    """``_unit.session_binds`` reads SQLAlchemy's private ``Session.__binds``: this fails
    loudly if it moves (units joining their caller's transaction through ``binds=`` would
    then be replayed outside it)."""
    with direct.connect() as conn:
        session = Session(binds={LEDGER: conn, OTHER: direct})
        assert set(map(id, _unit.session_binds(session))) == {id(conn), id(direct)}
        assert list(_unit.session_binds(Session(direct))) == []


@pytest.mark.parametrize("how", ["run", "run_in", "session-binds"])
def test_a_unit_joining_its_callers_transaction_through_binds_is_not_replayed(
    direct: sa.Engine, pg_server: PostgresServer, database: str, service: str, how: str
) -> None:
    """``binds=`` holds a Connection in its caller's transaction: the factory's own, a
    ``run_in`` session of it (whose binds were not looked at: replayed, committing alone), or
    a session given them itself. A unit that writes through it is not replayed; one that
    touches only the engine's tables is (its rollback ends nothing of the caller's)."""
    pg_server.execute("CREATE TABLE other (unit text)", database=database)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def write(session: Session, table: sa.Table) -> None:
        calls.append(1)
        session.execute(sa.insert(table).values(unit=unit))
        if len(calls) == 1:
            session.execute(
                sa.text("SELECT serialization_failure()"), bind_arguments={"bind": direct}
            )

    with direct.connect() as conn:
        trans = conn.begin()
        binds = {LEDGER: conn, OTHER: direct}
        if how == "session-binds":
            Sessions = rdb.ResilientSession(direct, service=service)
            run = functools.partial(Sessions.run_in, Sessions(binds=binds), write)
        else:
            Sessions = rdb.ResilientSession(binds=binds, service=service)
            if how == "run":
                run = functools.partial(Sessions.run, write)
            else:
                run = functools.partial(Sessions.run_in, Sessions(), write)
        with pytest.raises(sa.exc.OperationalError):
            run(LEDGER)
        assert calls == [1], "replayed outside the caller's transaction"
        if trans.is_active:
            trans.rollback()
    assert ledger_rows(pg_server, database, unit) == 0
    calls.clear()
    with direct.connect() as conn:
        trans = conn.begin()
        Sessions = rdb.ResilientSession(binds={LEDGER: conn, OTHER: direct}, service=service)
        Sessions.run(write, OTHER)  # only the engine's table: replayed as any unit
        assert calls == [1, 1]
        assert trans.is_active
        trans.rollback()


def test_a_savepoint_unit_whose_connection_was_lost_raises_the_disconnect(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    """The connection a ``create_savepoint`` unit joined is cut mid-unit: the caller's
    transaction went with it. The unit was replayed (after a backoff) and raised SQLAlchemy's
    PendingRollbackError instead of the disconnect, which is what the caller needs to see."""
    calls = []

    def write(session: Session) -> None:
        calls.append(1)
        session.execute(sa.text("SELECT 1"))
        fault_proxy.cut_all()
        session.execute(sa.text("SELECT 2"))

    with proxied.connect() as conn:
        conn.begin()
        conn.execute(sa.text("SELECT 0"))
        Sessions = rdb.ResilientSession(
            conn, service=service, join_transaction_mode="create_savepoint"
        )
        with pytest.raises(sa.exc.OperationalError) as raised:
            Sessions.run(write)
        assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
        assert calls == [1]


@pytest.mark.parametrize("factory_first", [False, True])
def test_a_savepoint_unit_whose_backend_ended_before_its_commit_is_no_lost_commit(
    pg_server: PostgresServer, database: str, service: str, factory_first: bool
) -> None:
    """SQLAlchemy's test recipe (a Connection in a transaction, ``create_savepoint``), the
    unit's backend terminated after its last statement: its "COMMIT" is a RELEASE SAVEPOINT,
    which commits nothing (the caller's transaction is gone with the backend). On a
    Connection checked out before the engine had a resilient factory (not marked) this was
    taken for a lost COMMIT answer: ``CommitOutcomeUnknownError``, an ERROR line, counted
    ``unknown_commits``. Now, as on a marked one: the disconnect, not replayed."""
    engine = sa.create_engine(pg_server.url(database))
    try:
        if factory_first:
            rdb.ResilientSession(engine, service=f"{service}-other")
        unit_name = f"{service}-{factory_first}"

        def write(session: Session) -> None:
            session.execute(sa.text("INSERT INTO ledger (unit) VALUES (:u)"), {"u": unit_name})
            pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")

        with engine.connect() as conn:
            conn.begin()
            Sessions = rdb.ResilientSession(
                conn, service=service, join_transaction_mode="create_savepoint"
            )
            with pytest.raises(sa.exc.OperationalError) as raised:
                Sessions.run(write)
        assert not isinstance(raised.value, rdb.CommitOutcomeUnknownError)
        assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
        assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 0
        assert ledger_rows(pg_server, database, unit_name) == 0
    finally:
        engine.dispose()
