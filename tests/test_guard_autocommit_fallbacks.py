"""The flush guard's paths that checked rows under lock and then sent the flush's UPDATE without
the compare-and-set, on a connection in AUTOCOMMIT mode, racing another transaction that moves
a row between the check and the UPDATE. In AUTOCOMMIT mode the check's locks end with the
check's statement: a row the check found legal, moved meanwhile into a state it may not leave
for the one written (``completed`` -> ``pending``), was written all the same, unlogged (without
the trigger, which is not installed here). The paths: a status set by a mapper's ``before_update``
listener on a row the flush has no expectation of (the way every row of a sharded session's
flush went, ``connection_callable``), and a ``schema_translate_map`` (the SQL sent is not the
compiled UPDATE). Each now sends the compare-and-set, so such a row raises
:class:`StaleTransitionError` and is left as the other transaction wrote it, as on the flush's
usual path; a sharded session's rows carry the state they were loaded in, as a plain one's, and
no lock is taken for them. An UPDATE of the status that is not the flush's own (a listener's,
not by primary key) is checked under lock before it runs; the flush's own UPDATE still carries
the compare-and-set after it (that path was sound).

Deterministic: the other transaction is an autocommit statement on a second engine, run just
before the first UPDATE is handed to the driver (see :func:`move_before_the_update`): after the
guard's check, wherever that is. Real server; psycopg, and each async driver."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, seeded_engine, statuses_by_id
from sent import Sent
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={
            "pending": {"in_progress"},
            "in_progress": {"completed", "pending", "paused"},
            "paused": {"pending"},
        },
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(20), default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


class Note(Base):
    """A status the server computes on every UPDATE of the row (an ``onupdate`` SQL
    expression): judged from what the UPDATE wrote."""

    __tablename__ = "notes"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"in_progress"}, "in_progress": {"completed", "pending"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(20), default="")
    status: Mapped[str] = mapped_column(
        sa.String(20), default="pending", onupdate=sa.text("'pending'")
    )


SEED = "INSERT INTO tasks VALUES (1, '', 'in_progress'), (2, 'other', 'in_progress')"


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(pg_url, Base, SEED)


@pytest.fixture
def other(pg_url: str) -> Iterator[sa.Engine]:
    """Another client, committing each statement."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield eng
    eng.dispose()


def move_before_the_update(
    monkeypatch: pytest.MonkeyPatch, sync_engine: sa.Engine, other: sa.Engine, sql: str
) -> list[str]:
    """Run ``sql`` on ``other`` once, just before the first UPDATE that ``sync_engine`` hands to
    its driver: after the guard's check, whether that is a ``SELECT ... FOR UPDATE`` before the
    flush, one in the guard's own ``do_execute`` listener, or none (the compare-and-set). The
    dialect's own ``do_execute`` / ``do_executemany`` (what SQLAlchemy and the guard call to
    send a statement) run it first; the server and the driver are real."""
    fired: list[str] = []
    dialect = sync_engine.dialect

    def hooked(name: str) -> None:
        send = getattr(dialect, name)

        def first_moving(cursor: Any, statement: str, *args: Any) -> Any:
            if not fired and statement.startswith("UPDATE"):
                fired.append(statement)
                with other.connect() as c:
                    c.exec_driver_sql(sql)
            return send(cursor, statement, *args)

        monkeypatch.setattr(dialect, name, first_moving)

    hooked("do_execute")
    hooked("do_executemany")
    return fired


COMPLETE_1 = "UPDATE {schema}tasks SET status = 'completed' WHERE id = 1"


def reopen(mapper: Any, connection: Any, target: Task) -> None:
    """A mapper ``before_update`` listener: a task renamed "reopen" goes back to pending."""
    if target.title == "reopen":
        target.status = "pending"


@pytest.fixture
def reopening() -> Iterator[None]:
    event.listen(Task, "before_update", reopen)
    yield
    event.remove(Task, "before_update", reopen)


@pytest.mark.usefixtures("reopening")
def test_a_status_set_by_a_before_update_listener(
    monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, other: sa.Engine, service: str
) -> None:
    """The flush has no expectation of row 1 (only its title changed); the listener sets
    in_progress -> pending, legal from what the check reads under lock; the row goes
    completed just after: the UPDATE no longer matches it."""
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    Sessions = rdb.ResilientSession(auto, service=service)
    fired = move_before_the_update(monkeypatch, engine, other, COMPLETE_1.format(schema=""))

    def unit(session: Session) -> None:
        session.get_one(Task, 1).title = "reopen"

    with pytest.raises(rdb.StaleTransitionError, match="now holds 'completed'"):
        Sessions.run(unit)
    assert fired
    assert statuses_by_id(engine) == {1: "completed", 2: "in_progress"}


@pytest.mark.asyncio
@pytest.mark.usefixtures("reopening")
async def test_async_a_status_set_by_a_before_update_listener(
    monkeypatch: pytest.MonkeyPatch,
    engine: sa.Engine,
    other: sa.Engine,
    pg_async_url: str,
    service: str,
) -> None:
    """As above through ``AsyncResilientSession``, on each async driver."""
    aengine = create_async_engine(pg_async_url, isolation_level="AUTOCOMMIT")
    try:
        fired = move_before_the_update(
            monkeypatch, aengine.sync_engine, other, COMPLETE_1.format(schema="")
        )
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        async with Sessions() as session:
            (await session.get_one(Task, 1)).title = "reopen"
            with pytest.raises(rdb.StaleTransitionError, match="now holds 'completed'"):
                await session.commit()
    finally:
        await aengine.dispose()
    assert fired
    assert statuses_by_id(engine) == {1: "completed", 2: "in_progress"}


@pytest.mark.usefixtures("reopening")
def test_a_before_update_listener_in_a_transaction_writes_a_legal_move(
    engine: sa.Engine, service: str
) -> None:
    """The same listener, no race, in an ordinary transaction: the move is written (row 1), and
    one from a state it may not leave is refused (row 2, completed first)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET status = 'completed' WHERE id = 2")

    def unit(session: Session, key: int) -> None:
        session.get_one(Task, key).title = "reopen"

    Sessions.run(unit, 1)
    with pytest.raises(rdb.IllegalTransitionError, match="'completed' -> 'pending'"):
        Sessions.run(unit, 2)
    assert statuses_by_id(engine) == {1: "pending", 2: "completed"}


def test_an_update_of_the_status_not_the_flushs_own(
    monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, other: sa.Engine, service: str
) -> None:
    """A ``before_update`` listener's UPDATE of the status by title (not by primary key): the
    rows the flush moves are checked under lock before it; row 1 goes completed just after that
    check, and the flush's own UPDATE, sent after the listener's, does not match it (the
    listener's statement, not the guard's to judge, is written: AUTOCOMMIT)."""
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    Sessions = rdb.ResilientSession(auto, service=service)
    table = Task.__table__

    def cancel_others(mapper: Any, connection: Any, target: Task) -> None:
        connection.execute(
            table.update().where(table.c.title == sa.bindparam("other")),  # type: ignore[attr-defined]
            {"other": "other", "status": "pending"},
        )

    fired = move_before_the_update(monkeypatch, engine, other, COMPLETE_1.format(schema=""))
    event.listen(Task, "before_update", cancel_others)
    try:
        with pytest.raises(rdb.StaleTransitionError, match="now holds 'completed'"):
            Sessions.run(lambda s: setattr(s.get_one(Task, 1), "status", "pending"))
    finally:
        event.remove(Task, "before_update", cancel_others)
    assert fired
    assert statuses_by_id(engine) == {1: "completed", 2: "pending"}


# A sharded session --------------------------------------------------------------------------------


def _shard_of(key: int) -> str:
    return "even" if key % 2 == 0 else "odd"


@pytest.fixture
def shards(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str
) -> Iterator[dict[str, sa.Engine]]:
    """Odd ids in the test's database (its ``engine``'s), even ids in a second one."""
    second = f"t_shards_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(second)
    engines = {
        "odd": sa.create_engine(pg_server.url(pg_database)),
        "even": sa.create_engine(pg_server.url(second)),
    }
    try:
        Base.metadata.create_all(engines["even"])
        with engines["even"].begin() as conn:
            conn.exec_driver_sql("INSERT INTO tasks VALUES (2, '', 'in_progress')")
        with engines["odd"].begin() as conn:
            conn.exec_driver_sql("DELETE FROM tasks WHERE id %% 2 = 0")
        yield engines
    finally:
        for eng in engines.values():
            eng.dispose()
        pg_server.drop_database(second)


def sharded(shards: dict[str, sa.Engine], service: str, **options: Any) -> Any:
    return rdb.ResilientSession(
        class_=ShardedSession,
        service=service,
        shards={name: eng.execution_options(**options) for name, eng in shards.items()},
        shard_chooser=lambda mapper, instance, clause=None: (
            "odd" if instance is None else _shard_of(instance.id)
        ),
        identity_chooser=lambda mapper, primary_key, **kw: [_shard_of(primary_key[0])],
        execute_chooser=lambda context: ["odd", "even"],
    )


@pytest.mark.parametrize("key", [1, 2])
def test_a_sharded_session(
    monkeypatch: pytest.MonkeyPatch, shards: dict[str, sa.Engine], key: int, service: str
) -> None:
    """Row ``key`` in_progress -> pending on its shard (1: the test's database, 2: the second
    one); it goes completed on its shard just after the check."""
    shard = shards[_shard_of(key)]
    mover = sa.create_engine(shard.url, isolation_level="AUTOCOMMIT")
    try:
        fired = move_before_the_update(
            monkeypatch, shard, mover, f"UPDATE tasks SET status = 'completed' WHERE id = {key}"
        )
        Sessions = sharded(shards, service, isolation_level="AUTOCOMMIT")

        def unit(session: Session) -> None:
            session.get_one(Task, key).status = "pending"

        with pytest.raises(rdb.StaleTransitionError, match="now holds 'completed'"):
            Sessions.run(unit)
    finally:
        mover.dispose()
    assert fired
    assert statuses_by_id(shard)[key] == "completed"


def test_a_sharded_session_of_both_shards_in_a_transaction(
    shards: dict[str, sa.Engine], service: str
) -> None:
    """No race, in an ordinary transaction: rows on both shards moved in one flush, each
    written on its own shard by its compare-and-set (no lock before it); an illegal move
    refused before anything is sent."""
    Sessions = sharded(shards, service)
    sent = {name: Sent(eng) for name, eng in shards.items()}

    def unit(session: Session, state: str) -> None:
        for task in [session.get_one(Task, 1), session.get_one(Task, 2)]:
            task.status = state

    with pytest.raises(rdb.IllegalTransitionError):
        Sessions.run(unit, "bogus")
    Sessions.run(unit, "pending")
    for recorder in sent.values():
        recorder.stop()
        assert not [q for q in recorder.sql if q.endswith("FOR UPDATE")], recorder.sql
        [update] = recorder.matching("UPDATE")
        assert " AND tasks.status = " in update
    assert statuses_by_id(shards["odd"]) == {1: "pending"}
    assert statuses_by_id(shards["even"]) == {2: "pending"}


# A translated schema ------------------------------------------------------------------------------


@pytest.fixture
def translated(engine: sa.Engine) -> Iterator[dict[str | None, str]]:
    """The model's table in a schema of its own, which ``schema_translate_map`` names."""
    schema = f"tr_{uuid.uuid4().hex[:8]}"
    translate: dict[str | None, str] = {None: schema}
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        Base.metadata.create_all(conn.execution_options(schema_translate_map=translate))
        conn.exec_driver_sql(SEED.replace("tasks", f"{schema}.tasks"))
        conn.exec_driver_sql(f"INSERT INTO {schema}.notes VALUES (1, '', 'in_progress')")
    yield translate
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def translated_statuses(engine: sa.Engine, translate: dict[str | None, str]) -> dict[int, str]:
    return statuses_by_id(engine, f"{translate[None]}.tasks")


@pytest.mark.parametrize("rows", [1, 2])
def test_a_translated_schema(
    *,  # (fixtures)
    monkeypatch: pytest.MonkeyPatch,
    engine: sa.Engine,
    other: sa.Engine,
    translated: dict[str | None, str],
    service: str,
    rows: int,
) -> None:
    """Rows in_progress -> pending (legal); row 1 goes completed just before the UPDATE (one
    row: an execute; two: an executemany)."""
    auto = engine.execution_options(isolation_level="AUTOCOMMIT", schema_translate_map=translated)
    Sessions = rdb.ResilientSession(auto, service=service)
    fired = move_before_the_update(
        monkeypatch, engine, other, COMPLETE_1.format(schema=translated[None] + ".")
    )

    def unit(session: Session) -> None:
        for task in [session.get_one(Task, key) for key in range(1, rows + 1)]:
            task.status = "pending"  # (loaded first: a get autoflushes)

    with pytest.raises(rdb.StaleTransitionError, match="now holds 'completed'"):
        Sessions.run(unit)
    assert fired
    stored = translated_statuses(engine, translated)
    assert stored[1] == "completed"
    assert stored[2] == ("pending" if rows == 2 else "in_progress")  # see the async test


def test_a_translated_schema_with_a_status_the_server_computes(
    monkeypatch: pytest.MonkeyPatch,
    engine: sa.Engine,
    other: sa.Engine,
    translated: dict[str | None, str],
    service: str,
) -> None:
    """A note renamed: its UPDATE sets the status to its onupdate SQL expression (pending,
    legal from in_progress); the row goes completed just before the UPDATE."""
    auto = engine.execution_options(isolation_level="AUTOCOMMIT", schema_translate_map=translated)
    Sessions = rdb.ResilientSession(auto, service=service)
    schema = translated[None]
    fired = move_before_the_update(
        monkeypatch, engine, other, f"UPDATE {schema}.notes SET status = 'completed' WHERE id = 1"
    )

    def unit(session: Session) -> None:
        session.get_one(Note, 1).title = "renamed"

    with pytest.raises(rdb.StaleTransitionError, match="now holds 'completed'"):
        Sessions.run(unit)
    assert fired
    assert statuses_by_id(engine, f"{schema}.notes") == {1: "completed"}


@pytest.mark.parametrize("rows", [1, 2])
def test_a_translated_schema_in_a_transaction(
    engine: sa.Engine, translated: dict[str | None, str], service: str, rows: int
) -> None:
    """No race, in an ordinary transaction: the legal moves are written in the translated
    schema (the compare-and-set sent there), an illegal one refused before anything is sent."""
    Sessions = rdb.ResilientSession(
        engine.execution_options(schema_translate_map=translated), service=service
    )
    sent: list[str] = []

    @event.listens_for(engine, "after_cursor_execute")
    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    def unit(session: Session, state: str) -> None:
        for task in [session.get_one(Task, key) for key in range(1, rows + 1)]:
            task.status = state

    with pytest.raises(rdb.IllegalTransitionError):
        Sessions.run(unit, "bogus")
    Sessions.run(unit, "pending")
    assert [s for s in sent if s.startswith("UPDATE")] == [
        s for s in sent if s.startswith(f"UPDATE {translated[None]}.tasks")
    ]
    expected = {1: "pending", 2: "pending" if rows == 2 else "in_progress"}
    assert translated_statuses(engine, translated) == expected
    assert statuses_by_id(engine) == {1: "in_progress", 2: "in_progress"}  # untouched


@pytest.mark.asyncio
async def test_async_a_translated_schema(
    *,  # (fixtures)
    monkeypatch: pytest.MonkeyPatch,
    engine: sa.Engine,
    other: sa.Engine,
    translated: dict[str | None, str],
    pg_async_url: str,
    async_driver: str,
    service: str,
) -> None:
    """As above through ``AsyncResilientSession``, two rows (asyncpg's executemany reports no
    row count: the raising form), on each async driver."""
    aengine = create_async_engine(
        pg_async_url,
        isolation_level="AUTOCOMMIT",
        execution_options={"schema_translate_map": translated},
    )
    try:
        fired = move_before_the_update(
            monkeypatch,
            aengine.sync_engine,
            other,
            COMPLETE_1.format(schema=translated[None] + "."),
        )
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        async with Sessions() as session:
            tasks = [await session.get_one(Task, key) for key in (1, 2)]
            for task in tasks:  # (loaded first: a get autoflushes)
                task.status = "pending"
            with pytest.raises(rdb.StaleTransitionError, match="now holds 'completed'"):
                await session.commit()
    finally:
        await aengine.dispose()
    assert fired
    stored = translated_statuses(engine, translated)
    assert stored[1] == "completed"
    # row 2's legal move: psycopg's executemany commits each row's statement in AUTOCOMMIT
    # mode, as on the flush's usual path; asyncpg's fails as one when row 1's condition raises
    assert stored[2] == ("in_progress" if async_driver == "asyncpg" else "pending")


@pytest.mark.parametrize("how", ["sharded", "plain"])
def test_a_row_moved_after_the_flush_was_judged(
    shards: dict[str, sa.Engine], engine: sa.Engine, how: str, service: str
) -> None:
    """Row 1 in_progress -> pending, judged from the state it was loaded in; it goes paused
    (from which pending is legal too) just after the guard's ``before_flush`` (by a
    ``before_flush`` listener of the session's, which runs after the guard's). The UPDATE
    still carries the loaded state, so the row is not written from a state no one judged, in a
    sharded session as in a plain one (a sharded flush's rows were checked under lock in
    ``before_flush``, and then, their UPDATE carrying no expectation, read again as it was
    sent and judged from what they held then: written)."""
    if how == "sharded":
        Sessions = sharded(shards, service, isolation_level="AUTOCOMMIT")
    else:
        Sessions = rdb.ResilientSession(
            engine.execution_options(isolation_level="AUTOCOMMIT"), service=service
        )
    mover = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT")
    moved: list[bool] = []

    def pause(session: Session, *_: Any) -> None:
        if not moved:
            moved.append(True)
            with mover.connect() as c:
                c.exec_driver_sql("UPDATE tasks SET status = 'paused' WHERE id = 1")

    def unit(session: Session) -> None:
        event.listen(session, "before_flush", pause)
        session.get_one(Task, 1).status = "pending"

    try:
        with pytest.raises(rdb.StaleTransitionError, match="now holds 'paused'"):
            Sessions.run(unit)
    finally:
        mover.dispose()
    assert moved
    assert statuses_by_id(engine)[1] == "paused"
