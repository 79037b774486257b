"""Engines and pools configured as applications configure them, against the suite's real
server: the pool classes (``NullPool``, ``StaticPool``, ``SingletonThreadPool``,
``AssertionPool``, ``QueuePool`` with a pool of one, unbounded overflow, LIFO, recycling, no
reset or a commit on return, pre-ping), an engine made by ``execution_options`` beside its
parent, and ``connect`` / ``checkout`` listeners of the application's own.

For each pool: a read unit, a writing unit with the commit markers, a unit through a backend
killed under it, a lost COMMIT answer (the fault proxy), a drop-in ``Session.begin()`` block,
the markers' prune, ``health()``; no connection kept checked out, nothing pooled broken (the
units after the faults retry nothing). The async factory's prune on a pool of one connection
ran in a task of its own beside the application's next unit, on that same connection (asyncpg:
"another operation is in progress"; ``AssertionPool``: the unit's checkout refused). A
``connect`` listener of the application's that runs ``SET`` without autocommit left each new
psycopg connection in a transaction: the markers' set-up put it off (its first unit's COMMIT
carried no marker, a lost answer there an unknown outcome), and a check of a lost COMMIT
answer on such a connection could not set ``READ COMMITTED`` (psycopg's ``ProgrammingError``:
a committed unit reported unknown; asyncpg: the listener's ``SET`` rolled back, the
connection pooled without it). Backoff zeroed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, add_expired_markers, expired_markers, install_markers
from sqlalchemy import event, pool
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

CONFIG = rdb.Config(max_retries=3, failure_threshold=1000, deadline=20)
EXPIRED = 20  # expired markers a prune test leaves for the prune

#: the pool configurations of the sync battery (ids: what they are)
SYNC_POOLS: dict[str, dict[str, Any]] = {
    "null": {"poolclass": pool.NullPool},
    "static": {"poolclass": pool.StaticPool},
    "singleton-thread": {"poolclass": pool.SingletonThreadPool},
    "assertion": {"poolclass": pool.AssertionPool},
    "queue-of-one": {"pool_size": 1, "max_overflow": 0, "pool_timeout": 5},
    "unbounded-overflow": {"pool_size": 1, "max_overflow": -1},
    "lifo": {"pool_use_lifo": True},
    # recycled at every checkout (older than 0 s): each unit, check and prune on a new
    # connection, the one it replaces closed as it is checked out
    "recycle": {"pool_recycle": 0},
    "reset-none": {"pool_reset_on_return": None},
    "reset-commit": {"pool_reset_on_return": "commit"},
    "pre-ping": {"pool_pre_ping": True},
}
#: the async ones (``SingletonThreadPool`` is refused by SQLAlchemy for asyncio engines)
ASYNC_POOLS = {k: v for k, v in SYNC_POOLS.items() if k != "singleton-thread"}


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    with pg_server.connect(pg_database) as conn:
        conn.execute("CREATE TABLE notes (note text NOT NULL)")
    install_markers(pg_server, pg_database)
    return pg_database


def _notes(server: PostgresServer, database: str, note: str) -> int:
    rows = server.execute(
        "SELECT count(*) FROM notes WHERE note = %s", params=[note], database=database
    )
    return int(rows[0][0])


def _backends(server: PostgresServer, database: str) -> int:
    """The backends of ``database`` once those whose clients closed have exited (a backend
    leaves ``pg_stat_activity`` a moment after its client's goodbye): polled, bounded."""
    count = -1
    for _ in range(500):
        rows = server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()",
            database=database,
        )
        count = int(rows[0][0])
        if count == 0:
            break
        time.sleep(0.01)  # (an order, not a duration: until they are gone, bounded)
    return count


def _counters(service: str) -> dict[str, Any]:
    counters: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return counters


def _checked_out(engine: sa.Engine) -> int:
    """Connections of ``engine``'s pool out (0 for a pool that does not count them)."""
    counted = getattr(engine.pool, "checkedout", None)
    return int(counted()) if counted is not None else 0


def _note(note: str) -> Callable[[Session], None]:
    def write(session: Session) -> None:
        session.execute(sa.text("INSERT INTO notes (note) VALUES (:n)"), {"n": note})

    return write


# -- the sync battery ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", list(SYNC_POOLS.values()), ids=list(SYNC_POOLS))
def test_sync_units_through_faults_on_each_pool(
    pg_server: PostgresServer,
    database: str,
    fault_proxy: FaultProxy,
    service: str,
    options: dict[str, Any],
) -> None:
    engine = sa.create_engine(fault_proxy.url(database), **options)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        assert Sessions.run(lambda s: s.scalar(sa.text("SELECT 1"))) == 1
        Sessions.run(_note("write"))
        assert _notes(pg_server, database, "write") == 1

        # a backend killed under the unit: replayed once, on a new connection
        calls: list[int] = []

        def killed(session: Session) -> None:
            calls.append(1)
            pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
            if len(calls) == 1:
                pg_server.execute("SELECT pg_terminate_backend(%s)", params=[pid])
            session.execute(sa.text("INSERT INTO notes (note) VALUES ('killed')"))

        Sessions.run(killed)
        assert len(calls) == 2
        assert _notes(pg_server, database, "killed") == 1

        # the pooled connections killed while idle (found dead at checkout, or replaced once
        # their first statement fails: through the proxy, the end may not have reached the
        # client's socket by then)
        pg_server.terminate_backends(database=database)
        Sessions.run(_note("after-idle-kill"))
        assert _notes(pg_server, database, "after-idle-kill") == 1

        # a lost COMMIT answer: verified committed by its marker, not replayed
        lost: list[int] = []

        def lose(session: Session) -> None:
            lost.append(1)
            _note("lost")(session)
            fault_proxy.lose_commit_answer()

        Sessions.run(lose)
        assert (lost, fault_proxy.commits_lost) == ([1], 1)
        assert _notes(pg_server, database, "lost") == 1

        # drop-in use
        with Sessions.begin() as session:
            _note("drop-in")(session)
        assert _notes(pg_server, database, "drop-in") == 1

        # the prune
        add_expired_markers(pg_server, database, EXPIRED)
        Sessions._hooks.commit._next_prune = 0.0
        Sessions.run(_note("prune"))
        assert expired_markers(pg_server, database) == 0

        counters = _counters(service)
        assert counters["verified_commits"] == 1
        assert counters["unknown_commits"] == counters["gave_up"] == 0
        assert counters["pool_timeouts"] == 0
        assert _checked_out(engine) == 0
        retries = counters["retries"]
        assert Sessions.run(lambda s: s.scalar(sa.text("SELECT 1"))) == 1
        assert _counters(service)["retries"] == retries  # nothing pooled broken
    finally:
        engine.dispose()
    assert _backends(pg_server, database) == 0


@pytest.mark.server_control
@pytest.mark.parametrize("options", list(SYNC_POOLS.values()), ids=list(SYNC_POOLS))
def test_sync_units_through_a_server_restart_on_each_pool(
    pg_server: PostgresServer, database: str, service: str, options: dict[str, Any]
) -> None:
    engine = sa.create_engine(pg_server.url(database), **options)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        Sessions.run(_note("before"))
        pg_server.restart()
        Sessions.run(_note("after"))
        assert _notes(pg_server, database, "after") == 1
        assert _checked_out(engine) == 0
        assert _counters(service)["gave_up"] == 0
    finally:
        engine.dispose()


# -- the async battery --------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("options", list(ASYNC_POOLS.values()), ids=list(ASYNC_POOLS))
async def test_async_units_through_faults_on_each_pool(
    pg_server: PostgresServer,
    database: str,
    fault_proxy: FaultProxy,
    service: str,
    *,
    driver: str,
    options: dict[str, Any],
) -> None:
    engine = create_async_engine(fault_proxy.url(database, driver=driver), **options)
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)

    async def note(session: AsyncSession, text: str) -> None:
        await session.execute(sa.text("INSERT INTO notes (note) VALUES (:n)"), {"n": text})

    try:
        assert await Sessions.run(lambda s: s.scalar(sa.text("SELECT 1"))) == 1
        await Sessions.run(note, "write")
        assert _notes(pg_server, database, "write") == 1

        calls: list[int] = []

        async def killed(session: AsyncSession) -> None:
            calls.append(1)
            pid = await session.scalar(sa.text("SELECT pg_backend_pid()"))
            if len(calls) == 1:
                await asyncio.to_thread(
                    pg_server.execute, "SELECT pg_terminate_backend(%s)", params=[pid]
                )
            await note(session, "killed")

        await Sessions.run(killed)
        assert len(calls) == 2
        assert _notes(pg_server, database, "killed") == 1

        await asyncio.to_thread(pg_server.terminate_backends, database=database)
        await Sessions.run(note, "after-idle-kill")
        assert _notes(pg_server, database, "after-idle-kill") == 1

        lost: list[int] = []

        async def lose(session: AsyncSession) -> None:
            lost.append(1)
            await note(session, "lost")
            fault_proxy.lose_commit_answer()

        await Sessions.run(lose)
        assert (lost, fault_proxy.commits_lost) == ([1], 1)
        assert _notes(pg_server, database, "lost") == 1

        async with Sessions.begin() as session:
            await note(session, "drop-in")
        assert _notes(pg_server, database, "drop-in") == 1

        add_expired_markers(pg_server, database, EXPIRED)
        Sessions._hooks.commit._next_prune = 0.0
        await Sessions.run(note, "prune")
        pruning = Sessions._hooks.commit.pruning
        if pruning is not None:  # (in a task of its own, on a pool of several connections)
            await asyncio.wait_for(pruning, 10)
        assert expired_markers(pg_server, database) == 0

        counters = _counters(service)
        assert counters["verified_commits"] == 1
        assert counters["unknown_commits"] == counters["gave_up"] == 0
        assert _checked_out(engine.sync_engine) == 0
        retries = counters["retries"]
        assert await Sessions.run(lambda s: s.scalar(sa.text("SELECT 1"))) == 1
        assert _counters(service)["retries"] == retries
    finally:
        await engine.dispose()
    assert _backends(pg_server, database) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize(
    "poolclass", [pool.StaticPool, pool.AssertionPool], ids=["static", "assertion"]
)
@pytest.mark.parametrize("then", ["unit", "drop-in"])
async def test_async_prune_on_a_pool_of_one_connection_leaves_it_to_the_next_unit(
    pg_server: PostgresServer,
    database: str,
    service: str,
    *,
    driver: str,
    poolclass: type[pool.Pool],
    then: str,
) -> None:
    """A unit whose prune is due, then at once (the loop turned once) another unit or a drop-in
    session: before, the prune ran in a task of its own on the pool's one connection while the
    next one used it (``InterfaceError``: another operation is in progress, a connection
    invalidated, a retry; ``AssertionPool``: the checkout refused with ``AssertionError``).
    Now it runs before the unit returns, as the sync factory's does, and prunes."""
    engine = create_async_engine(pg_server.url(database, driver=driver), poolclass=poolclass)
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)

    async def note(session: AsyncSession) -> None:
        await session.execute(sa.text("INSERT INTO notes (note) VALUES ('x')"))

    async def slow_read(session: AsyncSession) -> Any:
        return await session.scalar(sa.text("SELECT 1 FROM pg_sleep(0.05)"))

    try:
        await Sessions.run(note)
        add_expired_markers(pg_server, database, EXPIRED)
        Sessions._hooks.commit._next_prune = 0.0
        await Sessions.run(note)
        await asyncio.sleep(0)  # (a prune's task would take the connection now)
        if then == "unit":
            assert await Sessions.run(slow_read) == 1
        else:
            async with Sessions() as session:
                assert await slow_read(session) == 1
        assert Sessions._hooks.commit.pruning is None
        assert expired_markers(pg_server, database) == 0
        counters = _counters(service)
        assert counters["retries"] == counters["dead_pooled_connections"] == 0
    finally:
        await engine.dispose()


# -- engines made by execution_options ----------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"isolation_level": "SERIALIZABLE"},
        {"isolation_level": "REPEATABLE READ"},
        {"isolation_level": "SERIALIZABLE", "postgresql_deferrable": True},
    ],
    ids=["serializable", "repeatable-read", "deferrable"],
)
def test_a_factory_on_an_execution_options_engine_beside_one_on_its_parent(
    pg_server: PostgresServer,
    database: str,
    fault_proxy: FaultProxy,
    service: str,
    options: dict[str, Any],
) -> None:
    """Same pool, same dialect, each factory's units at its engine's level; a lost COMMIT
    answer is verified by its marker for both (the check reads in READ COMMITTED whatever the
    level), and both prune."""
    parent = sa.create_engine(fault_proxy.url(database), pool_size=2, max_overflow=0)
    child = parent.execution_options(**options)
    Parent = rdb.ResilientSession(parent, service=service, config=CONFIG)
    Child = rdb.ResilientSession(child, service=service + "-child", config=CONFIG)
    level = options["isolation_level"].lower()

    def isolation(session: Session) -> Any:
        return session.scalar(sa.text("SHOW transaction_isolation"))

    try:
        assert Child.run(isolation) == level
        assert Parent.run(isolation) == "read committed"
        for factory, name in ((Child, "child"), (Parent, "parent")):
            calls: list[int] = []

            def lose(session: Session, name: str = name, calls: list[int] = calls) -> None:
                calls.append(1)
                _note(name)(session)
                fault_proxy.lose_commit_answer()

            factory.run(lose)
            assert calls == [1]
            assert _notes(pg_server, database, name) == 1
            add_expired_markers(pg_server, database, EXPIRED)
            factory._hooks.commit._next_prune = 0.0
            factory.run(_note(name + "-prune"))
            assert expired_markers(pg_server, database) == 0
        assert Parent.run(isolation) == "read committed"  # the child's level left nothing
        assert parent.pool.checkedout() == 0
        for name in (service, service + "-child"):
            assert _counters(name)["verified_commits"] == 1
            assert _counters(name)["unknown_commits"] == 0
    finally:
        parent.dispose()


def test_a_factory_on_an_autocommit_engine_commits_each_statement_and_replays_none_after_one(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    """``execution_options(isolation_level="AUTOCOMMIT")``: each statement commits on its own,
    so a unit that wrote and then lost its connection is not replayed (the write would be made
    twice): its error is raised, marked partly committed. A read before the loss leaves it
    replayable. The parent's factory is unaffected."""
    parent = sa.create_engine(pg_server.url(database), pool_size=2, max_overflow=0)
    Auto = rdb.ResilientSession(
        parent.execution_options(isolation_level="AUTOCOMMIT"), service=service, config=CONFIG
    )
    Parent = rdb.ResilientSession(parent, service=service + "-parent", config=CONFIG)

    def killed_after(first: str) -> Callable[[Session], None]:
        calls: list[int] = []

        def unit(session: Session) -> None:
            calls.append(1)
            session.execute(sa.text(first))
            pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
            if len(calls) == 1:
                pg_server.execute("SELECT pg_terminate_backend(%s)", params=[pid])
            session.execute(sa.text("SELECT 1"))

        unit.calls = calls  # type: ignore[attr-defined]
        return unit

    try:
        Auto.run(_note("auto"))
        assert _notes(pg_server, database, "auto") == 1
        reading = killed_after("SELECT 1")
        Auto.run(reading)
        assert reading.calls == [1, 1]  # type: ignore[attr-defined]
        writing = killed_after("INSERT INTO notes (note) VALUES ('once')")
        with pytest.raises(sa.exc.OperationalError) as raised:
            Auto.run(writing)
        assert writing.calls == [1]  # type: ignore[attr-defined]
        assert not rdb.is_transient(raised.value)
        assert _notes(pg_server, database, "once") == 1
        Parent.run(_note("parent"))
        assert _notes(pg_server, database, "parent") == 1
        assert parent.pool.checkedout() == 0
    finally:
        parent.dispose()


# -- listeners of the application's own ---------------------------------------------------------


def _set_on_connect(engine: sa.Engine, seen: list[str]) -> None:
    """A ``connect`` listener as many applications write it: ``SET`` through a cursor, no
    autocommit (it leaves the new connection in a transaction), beside checkout, checkin and
    reset listeners."""

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection: Any, record: Any) -> None:
        seen.append("connect")
        cursor = dbapi_connection.cursor()
        cursor.execute("SET application_name = 'mine'")
        cursor.close()

    for name in ("checkout", "checkin", "reset"):
        event.listen(engine, name, lambda *args, name=name: seen.append(name))


@pytest.fixture(params=["listener-first", "factory-first"])
def order(request: pytest.FixtureRequest) -> str:
    """Whether the application's listeners are registered before the factory is made."""
    param: str = request.param
    return param


@pytest.mark.parametrize("options", [{"poolclass": pool.NullPool}, {}], ids=["null", "queue"])
def test_sync_a_connect_listener_that_sets_leaves_lost_answers_verified(
    pg_server: PostgresServer,
    database: str,
    fault_proxy: FaultProxy,
    service: str,
    *,
    order: str,
    options: dict[str, Any],
) -> None:
    """Each unit's COMMIT on a new connection carries its marker, and its lost answer is
    verified on a new connection (before: "a COMMIT that carried no marker", or the check's
    ``ProgrammingError``: ``CommitOutcomeUnknownError`` for a committed unit); the listener's
    ``SET`` holds on every connection the pool keeps."""
    engine = sa.create_engine(fault_proxy.url(database), **options)
    seen: list[str] = []
    if order == "listener-first":
        _set_on_connect(engine, seen)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    if order == "factory-first":
        _set_on_connect(engine, seen)
    calls: list[int] = []

    def lose(session: Session) -> Any:
        calls.append(1)
        name = session.scalar(sa.text("SHOW application_name"))  # (connected: its SET done)
        _note("lost")(session)
        fault_proxy.lose_commit_answer()
        return name

    try:
        assert Sessions.run(lose) == "mine"
        assert calls == [1]
        assert _notes(pg_server, database, "lost") == 1
        for _ in range(3):
            name = Sessions.run(lambda s: s.scalar(sa.text("SHOW application_name")))
            assert name == "mine"
        assert _counters(service)["verified_commits"] == 1
        assert _counters(service)["unknown_commits"] == 0
        assert {"connect", "checkout", "checkin", "reset"} <= set(seen)
        assert _checked_out(engine) == 0
    finally:
        engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("options", [{"poolclass": pool.NullPool}, {}], ids=["null", "queue"])
async def test_async_a_connect_listener_that_sets_leaves_lost_answers_verified(
    pg_server: PostgresServer,
    database: str,
    fault_proxy: FaultProxy,
    service: str,
    *,
    driver: str,
    order: str,
    options: dict[str, Any],
) -> None:
    """As the sync test; asyncpg's check no longer rolls the listener's ``SET`` back on the
    connection it then leaves in the pool."""
    engine = create_async_engine(fault_proxy.url(database, driver=driver), **options)
    seen: list[str] = []
    if order == "listener-first":
        _set_on_connect(engine.sync_engine, seen)
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    if order == "factory-first":
        _set_on_connect(engine.sync_engine, seen)
    calls: list[int] = []

    async def lose(session: AsyncSession) -> Any:
        calls.append(1)
        name = await session.scalar(sa.text("SHOW application_name"))
        await session.execute(sa.text("INSERT INTO notes (note) VALUES ('lost')"))
        fault_proxy.lose_commit_answer()
        return name

    try:
        assert await Sessions.run(lose) == "mine"
        assert calls == [1]
        assert _notes(pg_server, database, "lost") == 1
        for _ in range(3):
            name = await Sessions.run(lambda s: s.scalar(sa.text("SHOW application_name")))
            assert name == "mine"
        assert _counters(service)["verified_commits"] == 1
        assert _counters(service)["unknown_commits"] == 0
        assert {"connect", "checkout", "checkin", "reset"} <= set(seen)
        assert _checked_out(engine.sync_engine) == 0
    finally:
        await engine.dispose()
