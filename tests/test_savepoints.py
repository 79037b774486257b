"""Savepoints and errors a unit's code catches, against a real server with real SQLSTATEs.

A business error caught in a savepoint (the "get or create" pattern: INSERT in a savepoint, on
23505 roll back to it and SELECT; a transition the guard refuses) and a lock timeout (55P03)
caught there leave the transaction sound: the unit commits once, as under plain SQLAlchemy,
counted as neither a failure nor a retry. A serialization failure or a deadlock (SQLSTATE class
40) caught there is another matter: PostgreSQL rolls back only the savepoint and would commit
the rest without the savepoint's work, though it asks that such a transaction be run again
whole (under REPEATABLE READ the same snapshot meets the same failure again): the unit is
replayed. So is one whose code caught such an error outside a savepoint (its transaction
failed: 25P02 at the next statement or the COMMIT, not retried before)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import ASYNC_DRIVERS, in_no_transaction, set_read_only_database
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

CONFIG = rdb.Config(max_retries=3)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sp_items"
    name: Mapped[str] = mapped_column(primary_key=True)
    qty: Mapped[int]


class Job(Base):
    __tablename__ = "sp_jobs"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    note: Mapped[str] = mapped_column(default="")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(rdb.transition_trigger_sql(Job)))
        conn.exec_driver_sql("CREATE TABLE sp_ledger (id bigserial PRIMARY KEY, note text)")
        conn.execute(sa.insert(Item), [{"name": "a", "qty": 1}, {"name": "b", "qty": 2}])
    yield engine
    engine.dispose()


def ledger(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT note FROM sp_ledger ORDER BY id")))


def qty(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {r.name: r.qty for r in conn.execute(sa.select(Item.name, Item.qty))}


def note(session: Session, text: str) -> None:
    session.execute(sa.text("INSERT INTO sp_ledger (note) VALUES (:n)"), {"n": text})


def counters(service: str) -> dict[str, Any]:
    return dict(rdb.health()["services"][service]["counters"])


def failures(service: str) -> int:
    return int(rdb.health()["services"][service]["breaker"]["failures"])


def waits_for_a_lock(engine: sa.Engine, pid: int) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.scalar(
                sa.text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p"),
                {"p": pid},
            )
        )


def in_thread(work: Callable[[], None]) -> None:
    """``work`` on a thread of its own (outside the unit's attempt: not the unit's work)."""
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()


# -- get or create: 23505 caught in a savepoint -------------------------------------------------
def _with_block(session: Session) -> None:
    with session.begin_nested():
        session.execute(sa.insert(Item).values(name="a", qty=10))


def _nested_object(session: Session) -> None:
    nested = session.begin_nested()
    try:
        session.execute(sa.insert(Item).values(name="a", qty=10))
    except Exception:
        nested.rollback()
        raise
    nested.commit()


def _raw_savepoint(session: Session) -> None:
    session.execute(sa.text("SAVEPOINT get_or_create"))
    try:
        session.execute(sa.insert(Item).values(name="a", qty=10))
    except Exception:
        session.execute(sa.text("ROLLBACK TO SAVEPOINT get_or_create"))
        raise
    session.execute(sa.text("RELEASE SAVEPOINT get_or_create"))


def _connection_nested(session: Session) -> None:
    connection = session.connection()
    with connection.begin_nested():
        connection.execute(sa.insert(Item).values(name="a", qty=10))


def _orm_flush(session: Session) -> None:
    with session.begin_nested():
        session.add(Item(name="a", qty=10))


def _three_deep(session: Session) -> None:
    with session.begin_nested():
        note(session, "level 1")
        with session.begin_nested():
            note(session, "level 2")
            try:
                with session.begin_nested():
                    note(session, "level 3")
                    session.execute(sa.insert(Item).values(name="a", qty=10))
            finally:
                note(session, "level 2 again")


GET_OR_CREATE: dict[str, Callable[[Session], None]] = {
    "with begin_nested()": _with_block,
    "begin_nested() then rollback()": _nested_object,
    "SAVEPOINT through text()": _raw_savepoint,
    "Connection.begin_nested()": _connection_nested,
    "ORM flush in begin_nested()": _orm_flush,
    "three savepoints deep": _three_deep,
}


@contextlib.contextmanager
def row_b_locked(engine: sa.Engine) -> Iterator[Callable[[], None]]:
    """Another connection holds row ``b`` FOR UPDATE until the block ends, or until the
    callable it yields lets it go."""
    locked, release = threading.Event(), threading.Event()

    def holder() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT * FROM sp_items WHERE name = 'b' FOR UPDATE"))
            locked.set()
            release.wait(20)

    thread = threading.Thread(target=holder)
    thread.start()

    def let_go() -> None:
        release.set()
        thread.join(20)

    try:
        assert locked.wait(20)
        yield let_go
    finally:
        let_go()


@pytest.mark.parametrize("form", list(GET_OR_CREATE))
def test_get_or_create_commits_once_as_plain_sqlalchemy_does(
    engine: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
    form: str,
) -> None:
    caplog.set_level(logging.DEBUG, "resilient_db")
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    Plain = sa.orm.sessionmaker(engine)
    calls: list[int] = []
    caught: list[str | None] = []

    def unit(session: Session) -> int:
        calls.append(1)
        try:
            GET_OR_CREATE[form](session)
        except sa.exc.IntegrityError as exc:
            caught.append(getattr(exc.orig, "sqlstate", None))
        note(session, "after")
        return int(session.scalar(sa.select(Item.qty).where(Item.name == "a")) or 0)

    with Plain.begin() as session:  # (the same code as plain SQLAlchemy runs it)
        assert unit(session) == 1
    assert caught == ["23505"]
    expected = ledger(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE sp_ledger")
    calls.clear()

    assert Sessions.run(unit) == 1
    assert calls == [1]
    assert caught == ["23505", "23505"]
    assert ledger(engine) == expected
    assert qty(engine) == {"a": 1, "b": 2}
    seen = counters(service)
    assert (seen["attempts"], seen["retries"], seen["gave_up"]) == (1, 0, 0)
    assert failures(service) == 0
    assert [e.name for e in events if e.name != "commit_markers_missing"] == []
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


@pytest.mark.asyncio
@pytest.mark.parametrize("orm", [False, True], ids=["statement", "ORM flush"])
async def test_async_get_or_create_commits_once(
    engine: sa.Engine, pg_async_url: str, service: str, orm: bool
) -> None:
    aengine = create_async_engine(pg_async_url)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        try:
            async with session.begin_nested():
                if orm:
                    session.add(Item(name="a", qty=10))
                else:
                    await session.execute(sa.insert(Item).values(name="a", qty=10))
        except sa.exc.IntegrityError:
            pass
        await session.execute(sa.text("INSERT INTO sp_ledger (note) VALUES ('after')"))
        return int(await session.scalar(sa.select(Item.qty).where(Item.name == "a")) or 0)

    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
        assert await Sessions.run(unit) == 1
    finally:
        await aengine.dispose()
    assert calls == [1]
    assert ledger(engine) == ["after"]
    assert counters(service)["retries"] == 0
    assert failures(service) == 0


# -- a guarded status change refused in a savepoint ---------------------------------------------
@pytest.mark.parametrize("via", ["flush", "db"])
def test_a_refused_transition_caught_in_a_savepoint_commits_the_rest(
    engine: sa.Engine, service: str, via: str
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(Job), [{"id": 1}, {"id": 2}])
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []
    refused: list[str] = []

    def unit(session: Session) -> None:
        calls.append(1)
        job = session.get(Job, 1)
        assert job is not None
        job.note = "touched"
        other = session.get(Job, 2)
        assert other is not None
        other.status = "running"
        try:
            with session.begin_nested():
                if via == "flush":
                    job.status = "done"
                    session.flush()
                else:
                    session.execute(sa.text("UPDATE sp_jobs SET status = 'done' WHERE id = 1"))
        except rdb.IllegalTransitionError as exc:
            refused.append(exc.via)

    Sessions.run(unit)
    assert calls == [1]
    assert refused == [via]
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, status, note FROM sp_jobs ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [(1, "pending", "touched"), (2, "running", "")]
    assert counters(service)["retries"] == 0
    assert failures(service) == 0


# -- a lock timeout caught in a savepoint: the rest commits -------------------------------------
@pytest.mark.parametrize("how", ["lock_timeout", "NOWAIT"])
def test_a_lock_timeout_caught_in_a_savepoint_commits_once(
    engine: sa.Engine, service: str, how: str
) -> None:
    """(55P03 is retried when it leaves the unit; caught in a savepoint, it is the code's way
    to skip a row another transaction holds: the unit commits, not replayed.)"""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []
    caught: list[str | None] = []

    def unit(session: Session) -> None:
        calls.append(1)
        note(session, "before")
        if how == "lock_timeout":
            session.execute(sa.text("SET LOCAL lock_timeout = '50ms'"))
        lock = "SELECT * FROM sp_items WHERE name = 'b' FOR UPDATE"
        try:
            with session.begin_nested():
                session.execute(sa.text(lock + (" NOWAIT" if how == "NOWAIT" else "")))
                note(session, "locked")
        except sa.exc.OperationalError as exc:
            caught.append(getattr(exc.orig, "sqlstate", None))
        note(session, "after")

    with row_b_locked(engine):
        Sessions.run(unit)
    assert calls == [1]
    assert caught == ["55P03"]
    assert ledger(engine) == ["before", "after"]
    assert counters(service)["retries"] == 0


# -- serialization failures and deadlocks caught: the unit is replayed --------------------------
def _concurrent_update(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE sp_items SET qty = qty + 100 WHERE name = 'b'"))


def test_a_serialization_failure_caught_in_a_savepoint_replays_the_unit(
    engine: sa.Engine, service: str
) -> None:
    """REPEATABLE READ: another transaction updates the row after the unit's snapshot; the
    unit's UPDATE of it, in a savepoint, fails (40001), and the code catches it. Plain
    SQLAlchemy commits the rest, without the savepoint's work; the unit is replayed on a new
    snapshot, and its savepoint's work is done."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []
    caught: list[str | None] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        session.scalar(sa.text("SELECT sum(qty) FROM sp_items"))  # (the snapshot)
        if len(calls) == 1:
            in_thread(lambda: _concurrent_update(engine))
        note(session, "before")
        try:
            with session.begin_nested():
                session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'b'"))
                note(session, "in savepoint")
        except sa.exc.OperationalError as exc:
            caught.append(getattr(exc.orig, "sqlstate", None))
        note(session, "after")
        return len(calls)

    assert Sessions.run(unit) == 2
    assert caught == ["40001"]
    assert ledger(engine) == ["before", "in savepoint", "after"]
    assert qty(engine) == {"a": 1, "b": 103}
    assert counters(service)["retries_by_class"] == {"conflict": 1}


def test_a_deadlock_caught_in_a_savepoint_replays_the_unit(engine: sa.Engine, service: str) -> None:
    """A real deadlock: the other transaction holds row b and waits for row a, which the unit
    holds; the unit's UPDATE of b, in a savepoint, closes the cycle and is its victim (the
    shorter ``deadlock_timeout``). The code catches 40P01: the unit is replayed.

    The replay waits for the other transaction to end before it takes row a: the rollback of
    the first attempt wakes the other, whose UPDATE of a has yet to run, and PostgreSQL gives
    that row to whichever asks first (the aborted updater's row is free, and the waiter's tuple
    lock stops only those that find a live one): a replay that ran first (the other's backend
    not yet on a CPU, under load) would hold a while the other, holding b, waited for it, and
    its UPDATE of b would be a second deadlock's victim (three attempts)."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    other_locked, go = threading.Event(), threading.Event()
    other_pid: list[int] = []

    def other() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '10s'"))  # the unit is the victim
            conn.execute(sa.text("UPDATE sp_items SET qty = qty + 100 WHERE name = 'b'"))
            other_pid.append(int(conn.scalar(sa.text("SELECT pg_backend_pid()")) or 0))
            other_locked.set()
            go.wait(20)
            conn.execute(sa.text("UPDATE sp_items SET qty = qty + 100 WHERE name = 'a'"))

    thread = threading.Thread(target=other)
    calls: list[int] = []
    caught: list[str | None] = []

    def unit(session: Session) -> int:
        calls.append(1)
        if len(calls) > 1:  # (the replay: the other's transaction ends first, see above)
            wait_for(lambda: in_no_transaction(engine, other_pid[0]), "the other's end", 20)
        session.execute(sa.text("SET LOCAL deadlock_timeout = '20ms'"))
        session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'a'"))
        if len(calls) == 1:
            thread.start()
            assert other_locked.wait(20)
            go.set()
            wait_for(lambda: waits_for_a_lock(engine, other_pid[0]), "the other's wait", 20)
        try:
            with session.begin_nested():
                session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'b'"))
                note(session, "in savepoint")
        except sa.exc.OperationalError as exc:
            caught.append(getattr(exc.orig, "sqlstate", None))
        note(session, "after")
        return len(calls)

    try:
        assert Sessions.run(unit) == 2
    finally:
        go.set()
        thread.join(20)
    assert caught == ["40P01"]
    assert ledger(engine) == ["in savepoint", "after"]
    assert qty(engine) == {"a": 102, "b": 103}


@pytest.mark.asyncio
async def test_an_async_serialization_failure_caught_in_a_savepoint_replays_the_unit(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    aengine = create_async_engine(pg_async_url)
    calls: list[int] = []
    caught: list[bool] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        await session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        await session.scalar(sa.text("SELECT sum(qty) FROM sp_items"))
        if len(calls) == 1:
            in_thread(lambda: _concurrent_update(engine))
        try:
            async with session.begin_nested():
                await session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'b'"))
        except sa.exc.DBAPIError as exc:
            caught.append(rdb.classify(exc) is rdb.Outcome.CONFLICT)
        await session.execute(sa.text("INSERT INTO sp_ledger (note) VALUES ('after')"))
        return len(calls)

    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
        assert await Sessions.run(unit) == 2
    finally:
        await aengine.dispose()
    assert caught == [True]
    assert ledger(engine) == ["after"]
    assert qty(engine) == {"a": 1, "b": 103}


def _write_skew(engine: sa.Engine) -> None:
    """Another SERIALIZABLE transaction, on a thread of its own, reads row a and writes row b,
    and commits: a unit that read b and then writes a closes a cycle of read/write
    dependencies, which the server fails (40001) at that write."""

    def other() -> None:
        with engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
            conn.execute(sa.text("SELECT qty FROM sp_items WHERE name = 'a'"))
            conn.execute(sa.text("UPDATE sp_items SET qty = qty + 100 WHERE name = 'b'"))
            conn.commit()

    in_thread(other)


def test_a_serializable_conflict_caught_in_a_savepoint_replays_the_unit(
    engine: sa.Engine, service: str
) -> None:
    """Two SERIALIZABLE transactions for real (no concurrent update of one row: a write skew,
    which SSI fails as the unit writes what the other read): caught in a savepoint, the rest
    would commit; the unit is replayed once and writes once."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []
    caught: list[str | None] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
        session.execute(sa.text("SELECT qty FROM sp_items WHERE name = 'b'"))
        if len(calls) == 1:
            _write_skew(engine)
        try:
            with session.begin_nested():
                session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'a'"))
                note(session, "in savepoint")
        except sa.exc.OperationalError as exc:
            caught.append(rdb.sqlstate_of(exc))
        note(session, "after")
        return len(calls)

    assert Sessions.run(unit) == 2
    assert caught == ["40001"]
    assert ledger(engine) == ["in savepoint", "after"]
    assert qty(engine) == {"a": 2, "b": 102}
    assert counters(service)["retries_by_class"] == {"conflict": 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("async_driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("conflict", ["40001", "40P01"])
async def test_an_async_conflict_caught_in_a_savepoint_replays_the_unit(
    engine: sa.Engine, pg_async_url: str, service: str, *, async_driver: str, conflict: str
) -> None:
    """On both async drivers, a real conflict in ``async with session.begin_nested():``
    caught by the unit's code: a serialization failure of two SERIALIZABLE transactions
    (above), or a deadlock whose victim is the unit (the sync deadlock test's, whose notes say
    why the replay waits for the other's end). Replayed once, written once."""
    aengine = create_async_engine(pg_async_url)
    other_locked, go = threading.Event(), threading.Event()
    other_pid: list[int] = []

    def other() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '10s'"))  # the unit is the victim
            conn.execute(sa.text("UPDATE sp_items SET qty = qty + 100 WHERE name = 'b'"))
            other_pid.append(int(conn.scalar(sa.text("SELECT pg_backend_pid()")) or 0))
            other_locked.set()
            go.wait(20)
            conn.execute(sa.text("UPDATE sp_items SET qty = qty + 100 WHERE name = 'a'"))

    thread = threading.Thread(target=other)
    calls: list[int] = []
    caught: list[str | None] = []

    async def deadlock_first(session: AsyncSession) -> str:
        """The unit holds a; the other holds b and waits for a: the unit's write of b (the
        row returned) will close the cycle. The replay waits for the other's end first."""
        if len(calls) > 1:
            wait_for(lambda: in_no_transaction(engine, other_pid[0]), "the other's end", 20)
        await session.execute(sa.text("SET LOCAL deadlock_timeout = '20ms'"))
        await session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'a'"))
        if len(calls) == 1:
            thread.start()
            assert other_locked.wait(20)
            go.set()
            wait_for(lambda: waits_for_a_lock(engine, other_pid[0]), "the other's wait", 20)
        return "b"

    async def write_skew_first(session: AsyncSession) -> str:
        await session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
        await session.execute(sa.text("SELECT qty FROM sp_items WHERE name = 'b'"))
        if len(calls) == 1:
            _write_skew(engine)
        return "a"

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        row = await (deadlock_first if conflict == "40P01" else write_skew_first)(session)
        try:
            async with session.begin_nested():
                await session.execute(
                    sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = :n"), {"n": row}
                )
                await session.execute(sa.text("INSERT INTO sp_ledger (note) VALUES ('in')"))
        except sa.exc.DBAPIError as exc:
            caught.append(rdb.sqlstate_of(exc))
        await session.execute(sa.text("INSERT INTO sp_ledger (note) VALUES ('after')"))
        return len(calls)

    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
        assert await Sessions.run(unit) == 2
    finally:
        go.set()
        if thread.is_alive():
            thread.join(20)
        await aengine.dispose()
    assert caught == [conflict]
    assert ledger(engine) == ["in", "after"]
    assert qty(engine) == ({"a": 102, "b": 103} if conflict == "40P01" else {"a": 2, "b": 102})
    assert counters(service)["retries_by_class"] == {"conflict": 1}


# -- a write refused by a server that takes none (25006), caught in a savepoint ------------------
# The refusal means a wrong server (a standby, a primary fenced read-only for a cut-over): a
# lost server, as outside a savepoint. Here the database is read-only by default for the
# sessions that start while it is (what such a server looks like to a client), and writable
# again for those after, as a failover ends: the unit's code catches the refusal in its
# savepoint and would commit the rest, its write lost.
@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg-sync", *ASYNC_DRIVERS])
async def test_a_write_refused_by_a_read_only_server_caught_in_a_savepoint_replays_the_unit(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str, driver: str
) -> None:
    """As a refusal outside the savepoint: the pool's connections replaced, the unit replayed
    once (on a new connection, to the server that takes writes now), its write made once."""
    calls: list[int] = []
    caught: list[str | None] = []

    def first_attempt_refused() -> None:
        calls.append(1)
        if len(calls) == 1:  # (the unit's connection was made read-only: the next will not)
            set_read_only_database(pg_server, pg_database, False)

    def unit(session: Session) -> int:
        session.execute(sa.text("SELECT 1"))
        first_attempt_refused()
        try:
            with session.begin_nested():
                note(session, "in savepoint")
        except sa.exc.DBAPIError as exc:
            caught.append(rdb.sqlstate_of(exc))
        return len(calls)

    async def aunit(session: AsyncSession) -> int:
        await session.execute(sa.text("SELECT 1"))
        first_attempt_refused()
        try:
            async with session.begin_nested():
                await session.execute(
                    sa.text("INSERT INTO sp_ledger (note) VALUES ('in savepoint')")
                )
        except sa.exc.DBAPIError as exc:
            caught.append(rdb.sqlstate_of(exc))
        return len(calls)

    set_read_only_database(pg_server, pg_database, True)
    try:
        if driver == "psycopg-sync":
            refused = sa.create_engine(pg_server.url(pg_database))
            try:
                Sessions = rdb.ResilientSession(refused, service=service, config=CONFIG)
                assert Sessions.run(unit) == 2
            finally:
                refused.dispose()
        else:
            arefused = create_async_engine(pg_server.url(pg_database, driver=driver))
            try:
                ASessions = rdb.AsyncResilientSession(arefused, service=service, config=CONFIG)
                assert await ASessions.run(aunit) == 2
            finally:
                await arefused.dispose()
    finally:
        set_read_only_database(pg_server, pg_database, False)
    assert caught == ["25006"]
    assert ledger(engine) == ["in savepoint"]
    assert counters(service)["retries_by_class"] == {"disconnect": 1}
    assert counters(service)["pool_invalidations"] == 1


@pytest.mark.parametrize("then", ["returns", "goes on"])
def test_a_conflict_caught_outside_a_savepoint_replays_the_unit(
    engine: sa.Engine, service: str, then: str
) -> None:
    """Its transaction failed: the COMMIT, or the next statement, meets 25P02, which was
    raised after one attempt (not transient), though a replay heals it."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        session.scalar(sa.text("SELECT sum(qty) FROM sp_items"))
        if len(calls) == 1:
            in_thread(lambda: _concurrent_update(engine))
        note(session, "before")
        with contextlib.suppress(sa.exc.OperationalError):
            session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'b'"))
        if then == "goes on":
            note(session, "after")
        return len(calls)

    assert Sessions.run(unit) == 2
    assert ledger(engine) == (["before", "after"] if then == "goes on" else ["before"])
    assert qty(engine) == {"a": 1, "b": 103}


def test_a_lock_timeout_caught_outside_a_savepoint_replays_the_unit(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []
    with row_b_locked(engine) as let_go:

        def unit(session: Session) -> int:
            calls.append(1)
            note(session, "before")
            try:
                session.execute(
                    sa.text("SELECT * FROM sp_items WHERE name = 'b' FOR UPDATE NOWAIT")
                )
            except sa.exc.OperationalError:
                let_go()
            note(session, "after")
            return len(calls)

        assert Sessions.run(unit) == 2
    assert ledger(engine) == ["before", "after"]


def test_a_conflict_caught_then_rolled_back_by_the_unit_commits_what_follows(
    engine: sa.Engine, service: str
) -> None:
    """The unit's code rolls its transaction back itself (``session.rollback()``) and goes
    on: the failed transaction is gone, what follows is a new one, committed once."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        session.scalar(sa.text("SELECT sum(qty) FROM sp_items"))
        in_thread(lambda: _concurrent_update(engine))
        note(session, "rolled back")
        try:
            with session.begin_nested():
                session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'b'"))
        except sa.exc.OperationalError:
            session.rollback()
        note(session, "after")
        return len(calls)

    assert Sessions.run(unit) == 1
    assert ledger(engine) == ["after"]
    assert qty(engine) == {"a": 1, "b": 102}


def test_with_retry_off_a_conflict_caught_in_a_savepoint_commits_as_plain_sqlalchemy(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG.replace(retry=False))
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        session.scalar(sa.text("SELECT sum(qty) FROM sp_items"))
        in_thread(lambda: _concurrent_update(engine))
        try:
            with session.begin_nested():
                session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'b'"))
        except sa.exc.OperationalError:
            pass
        note(session, "after")
        return len(calls)

    assert Sessions.run(unit) == 1
    assert ledger(engine) == ["after"]
    assert qty(engine) == {"a": 1, "b": 102}


def test_an_operation_whose_drop_in_block_caught_a_conflict_is_replayed(
    engine: sa.Engine, service: str
) -> None:
    """Caught outside a savepoint in a ``with_self_healing`` operation's drop-in block: its
    COMMIT meets 25P02, and the operation is replayed as for the conflict."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=CONFIG)
    def operation() -> int:
        calls.append(1)
        with Sessions.begin() as session:
            session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            session.scalar(sa.text("SELECT sum(qty) FROM sp_items"))
            if len(calls) == 1:
                in_thread(lambda: _concurrent_update(engine))
            with contextlib.suppress(sa.exc.OperationalError):
                session.execute(sa.text("UPDATE sp_items SET qty = qty + 1 WHERE name = 'b'"))
            note(session, "after")
        return len(calls)

    assert operation() == 2
    assert ledger(engine) == ["after"]
    assert qty(engine) == {"a": 1, "b": 103}


# -- a savepoint released, then the connection lost before COMMIT -------------------------------
@pytest.mark.parametrize("markers", [False, True], ids=["xid", "markers"])
def test_a_released_savepoint_then_a_killed_backend_replays_the_unit_once(
    engine: sa.Engine, pg_server: PostgresServer, service: str, markers: bool
) -> None:
    if markers:
        rdb.install_commit_markers(engine)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        with session.begin_nested():
            note(session, "in savepoint")
        if len(calls) == 1:
            pid = int(session.scalar(sa.text("SELECT pg_backend_pid()")) or 0)
            pg_server.execute(f"SELECT pg_terminate_backend({pid})")
        return len(calls)

    assert Sessions.run(unit) == 2
    assert ledger(engine) == ["in savepoint"]
