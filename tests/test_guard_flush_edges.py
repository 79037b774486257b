"""The flush guard's rarer paths, each met the way an application meets it: a status column not
loaded when it is set, on a row another client deleted meanwhile; an application's
``before_cursor_execute`` listener that rewrites the SQL sent (a query comment, as
sqlcommenter-style instrumentation adds); two guarded columns of one model moved in one
executemany on asyncpg; an ``Enum`` state no rule declares; a status that is part of a
composite primary key; an executemany that fails for a reason of its own; a flush that also
updates a table without rules; a status that is the mapper's ``version_id_col`` (refused when
SQLAlchemy counts it, guarded when the application sets it); a status whose ``onupdate`` is a
SQL expression, sent in SQL an application's listener rewrote, or written for a row a
``before_flush`` listener of the application's edits during the flush.

Each checks the guard's answer: an illegal or stale move refused with the row named, a legal one
written once, nothing half-written. Real server, real concurrent transactions (another
connection commits between the load and the flush); psycopg and asyncpg."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sent import Sent
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, defer, mapped_column, registry

import resilient_db as rdb
from resilient_db import TransitionRulesError
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "edge_tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"todo": {"doing"}, "doing": {"done"}},
        initial={"todo"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(10))
    note: Mapped[str] = mapped_column(default="")


class Order(Base):
    """Two guarded columns."""

    __tablename__ = "edge_orders"
    __transitions__ = (
        rdb.TransitionRules(
            column="payment", transitions={"due": {"paid"}, "paid": {"refunded"}}, initial={"due"}
        ),
        rdb.TransitionRules(
            column="shipping", transitions={"wait": {"sent"}, "sent": {"back"}}, initial={"wait"}
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    payment: Mapped[str] = mapped_column(sa.String(10))
    shipping: Mapped[str] = mapped_column(sa.String(10))


class Light(enum.Enum):
    red = "R"
    green = "G"
    amber = "A"  # no rule names it: only an admin's repair writes it


class Lamp(Base):
    __tablename__ = "edge_lamps"
    __transitions__ = rdb.TransitionRules(
        column="light", transitions={Light.red: {Light.green}}, initial={Light.red}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    light: Mapped[Light] = mapped_column(sa.Enum(Light, name="edge_light"))


class Slot(Base):
    """The status is part of the primary key."""

    __tablename__ = "edge_slots"
    __transitions__ = rdb.TransitionRules(
        column="state", transitions={"free": {"held"}, "held": {"taken"}}, initial={"free"}
    )
    board: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(10), primary_key=True)


class Tag(Base):
    """No rules; unique names."""

    __tablename__ = "edge_tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


SEED = [
    "INSERT INTO edge_tasks (id, status, note) VALUES (1, 'todo', ''), (2, 'todo', ''), "
    "(3, 'todo', '')",
    "INSERT INTO edge_orders VALUES (1, 'due', 'wait'), (2, 'due', 'wait'), (3, 'due', 'wait')",
    "INSERT INTO edge_lamps VALUES (1, 'red'), (2, 'red'), (3, 'red')",
    "INSERT INTO edge_slots VALUES (1, 'free'), (2, 'free')",
    "INSERT INTO edge_tags VALUES (1, 'a'), (2, 'b'), (3, 'c')",
]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        for statement in SEED:
            conn.exec_driver_sql(statement)
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def aengine(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str
) -> AsyncIterator[AsyncEngine]:
    """asyncpg: an executemany reports no row count (the guard's raising form)."""
    eng = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    yield eng
    await eng.dispose()


def other_client(engine: sa.Engine, statement: str) -> None:
    """Another client's transaction, committed before the flush."""
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)


def rows(engine: sa.Engine, query: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(query)]


# -- a status not loaded, on a row deleted meanwhile --------------------------------------------


def test_a_status_set_unloaded_on_a_row_deleted_meanwhile_is_stale(
    engine: sa.Engine, service: str
) -> None:
    """A row loaded without its status (deferred) is read first to judge the move; a row
    another client deleted meanwhile is named, not written, and the flush's other rows stay
    as they were."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        tasks = session.scalars(
            sa.select(Task).options(defer(Task.status)).where(Task.id.in_([1, 2])).order_by(Task.id)
        ).all()
        other_client(engine, "DELETE FROM edge_tasks WHERE id = 2")
        for task in tasks:
            task.status = "doing"
        with pytest.raises(rdb.StaleTransitionError, match="no longer exists") as stale:
            session.flush()
    assert (stale.value.pk, stale.value.to_state, stale.value.via) == (2, "doing", "flush")
    assert rows(engine, "SELECT id, status FROM edge_tasks ORDER BY id") == [
        (1, "todo"),
        (3, "todo"),
    ]


# -- the SQL rewritten by a before_cursor_execute listener --------------------------------------


def commented(engine: Any) -> None:
    """A listener adding a query comment to every statement (as sqlcommenter-style
    instrumentation does): the UPDATE sent is not the one SQLAlchemy compiled."""
    sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    def comment(*args: Any) -> tuple[str, Any]:  # (conn, cursor, statement, params, ...)
        return f"{args[2]} /* app='edges' */", args[3]

    event.listen(sync, "before_cursor_execute", comment, retval=True)


def test_a_rewritten_update_is_checked_under_lock(engine: sa.Engine, service: str) -> None:
    """The compare-and-set can't be added to SQL rewritten by the application: the rows are
    read under lock first, a stale one refused, and the UPDATE sent as the listener made it.
    One row and several, a legal move written once."""
    commented(engine)
    Sessions = rdb.ResilientSession(engine, service=service)
    for keys in ([1], [1, 2, 3]):
        with Sessions() as session:
            tasks = [session.get_one(Task, key) for key in keys]
            other_client(engine, "UPDATE edge_tasks SET status = 'doing' WHERE id = 1")
            for task in tasks:
                task.status = "doing"
            with pytest.raises(rdb.StaleTransitionError, match="now holds 'doing'") as stale:
                session.flush()
        assert (stale.value.pk, stale.value.from_state) == (1, "todo")
        other_client(engine, "UPDATE edge_tasks SET status = 'todo'")
    sent = Sent(engine)
    try:
        with Sessions.begin() as session:
            for key in (1, 2):
                session.get_one(Task, key).status = "doing"
    finally:
        sent.stop()
    updates = [s for s in sent.sql if s.startswith("UPDATE edge_tasks")]
    assert updates, sent.sql
    assert all(s.endswith("::INTEGER /* app='edges' */") for s in updates), sent.sql
    assert any(s.startswith("SELECT") and "FOR UPDATE" in s for s in sent.sql), sent.sql
    assert rows(engine, "SELECT id, status FROM edge_tasks ORDER BY id") == [
        (1, "doing"),
        (2, "doing"),
        (3, "todo"),
    ]


@pytest.mark.asyncio
async def test_async_a_rewritten_update_is_checked_under_lock(
    engine: sa.Engine, aengine: AsyncEngine, service: str
) -> None:
    """The async twin (asyncpg: the several rows' executemany, whose raising form can't be
    added either)."""
    commented(aengine)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    for keys in ([1], [1, 2, 3]):
        async with Sessions() as session:
            tasks = [await session.get_one(Task, key) for key in keys]
            other_client(engine, "UPDATE edge_tasks SET status = 'doing' WHERE id = 1")
            for task in tasks:
                task.status = "doing"
            with pytest.raises(rdb.StaleTransitionError, match="now holds 'doing'") as stale:
                await session.flush()
        assert (stale.value.pk, stale.value.from_state) == (1, "todo")
        other_client(engine, "UPDATE edge_tasks SET status = 'todo'")
    async with Sessions.begin() as session:
        for key in (1, 2):
            (await session.get_one(Task, key)).status = "doing"
    assert rows(engine, "SELECT id, status FROM edge_tasks ORDER BY id") == [
        (1, "doing"),
        (2, "doing"),
        (3, "todo"),
    ]


# -- two guarded columns, one executemany on asyncpg --------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("column", ["payment", "shipping"])
async def test_async_two_guarded_columns_name_the_column_that_moved(
    engine: sa.Engine, aengine: AsyncEngine, service: str, column: str
) -> None:
    """Both columns of three rows set in one flush (one executemany, no row count on
    asyncpg; its raising form can't carry two columns' conditions in the driver's parameter
    order, so the rows are checked under lock first): the row another client moved in either
    column is named with that column and what it holds; nothing is written."""
    moved = {"payment": "refunded", "shipping": "back"}[column]
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    async with Sessions() as session:
        orders = [await session.get_one(Order, key) for key in (1, 2, 3)]
        other_client(engine, f"UPDATE edge_orders SET {column} = '{moved}' WHERE id = 2")
        for order in orders:
            order.payment, order.shipping = "paid", "sent"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            await session.flush()
    err = stale.value
    assert (err.pk, err.column) == (2, column)
    assert f"now holds '{moved}'" in (err.reason or ""), err.reason
    assert (
        rows(engine, "SELECT payment, shipping FROM edge_orders WHERE id <> 2")
        == [("due", "wait")] * 2
    )
    other_client(engine, "UPDATE edge_orders SET payment = 'due', shipping = 'wait'")
    async with Sessions.begin() as session:
        for key in (1, 2, 3):
            order = await session.get_one(Order, key)
            order.payment, order.shipping = "paid", "sent"
    assert (
        rows(engine, "SELECT payment, shipping FROM edge_orders ORDER BY id")
        == [("paid", "sent")] * 3
    )


# -- an Enum state no rule declares --------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_an_enum_state_no_rule_declares_is_named_as_its_member(
    engine: sa.Engine, aengine: AsyncEngine, service: str
) -> None:
    """asyncpg's raising form carries the column's text; a label no rule declares is named as
    the Enum's member."""
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    async with Sessions() as session:
        lamps = [await session.get_one(Lamp, key) for key in (1, 2, 3)]
        other_client(engine, "UPDATE edge_lamps SET light = 'amber' WHERE id = 2")
        for lamp in lamps:
            lamp.light = Light.green
        with pytest.raises(rdb.StaleTransitionError) as stale:
            await session.flush()
    err = stale.value
    assert (err.pk, err.from_state, err.to_state) == (2, Light.red, Light.green)
    # (shown by its value, as the guard shows declared states: 'R' -> 'G')
    assert "now holds 'A';" in (err.reason or ""), err.reason
    assert rows(engine, "SELECT light::text FROM edge_lamps ORDER BY id") == [
        ("red",),
        ("amber",),
        ("red",),
    ]


# -- the status in a composite primary key -------------------------------------------------------


def test_a_keyed_status_moved_meanwhile_names_what_the_rest_of_its_key_holds(
    engine: sa.Engine, service: str
) -> None:
    """A row whose key holds its status, moved by another client (its key with it): not found
    by the key it was loaded with; the states the rows sharing the rest of its key hold now
    are named."""
    other_client(engine, "INSERT INTO edge_slots VALUES (1, 'taken')")
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        slot = session.get_one(Slot, (1, "free"))
        other_client(
            engine, "UPDATE edge_slots SET state = 'held' WHERE board = 1 AND state = 'free'"
        )
        slot.state = "held"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.flush()
    err = stale.value
    assert (err.pk, err.from_state, err.to_state) == ((1, "free"), "free", "held")
    assert "the rows with the rest of its key now hold 'held', 'taken'" in (err.reason or "")
    assert rows(engine, "SELECT board, state FROM edge_slots ORDER BY board, state") == [
        (1, "held"),
        (1, "taken"),
        (2, "free"),
    ]


# -- an executemany failing for a reason of its own ----------------------------------------------


@pytest.mark.asyncio
async def test_async_an_executemanys_own_error_is_raised_as_it_is(
    engine: sa.Engine, aengine: AsyncEngine, service: str
) -> None:
    """The raising form's error is told apart from another one of the same UPDATE (a unique
    violation): that is raised as the driver's, not taken for a stale row."""
    other_client(engine, "UPDATE edge_tasks SET note = id::text")
    other_client(engine, "ALTER TABLE edge_tasks ADD CONSTRAINT edge_tasks_note UNIQUE (note)")
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    async with Sessions() as session:
        tasks = [await session.get_one(Task, key) for key in (1, 2, 3)]
        for task in tasks:
            task.status, task.note = "doing", "same"
        with pytest.raises(sa.exc.IntegrityError) as refused:
            await session.flush()
    assert not isinstance(refused.value, rdb.IllegalTransitionError)
    assert rows(engine, "SELECT status FROM edge_tasks ORDER BY id") == [("todo",)] * 3


# -- a table without rules in the same flush -----------------------------------------------------


@pytest.mark.asyncio
async def test_a_flush_updating_a_table_without_rules_too(
    engine: sa.Engine, aengine: AsyncEngine, service: str
) -> None:
    """The flush's UPDATE of a table without rules is sent as it is, on either driver; the
    guarded rows of the same flush still carry their compare-and-set."""

    def unit(session: Session) -> None:
        tasks = [session.get_one(Task, key) for key in (1, 2)]
        tags = [session.get_one(Tag, key) for key in (1, 2)]
        for task, tag in zip(tasks, tags, strict=True):
            task.status = "doing"
            tag.name += "-x"

    rdb.ResilientSession(engine, service=service).run(unit)

    async def async_unit(session: AsyncSession) -> None:
        await session.run_sync(unit)

    other_client(engine, "UPDATE edge_tasks SET status = 'todo'")
    other_client(engine, "UPDATE edge_tags SET name = left(name, 1)")
    sessions = rdb.AsyncResilientSession(aengine, service=service)
    await sessions.run(async_unit)
    assert rows(engine, "SELECT id, status FROM edge_tasks ORDER BY id") == [
        (1, "doing"),
        (2, "doing"),
        (3, "todo"),
    ]
    assert rows(engine, "SELECT name FROM edge_tags ORDER BY id") == [("a-x",), ("b-x",), ("c",)]
    async with sessions() as session:
        task = await session.get_one(Task, 3)
        tag = await session.get_one(Tag, 3)
        other_client(engine, "UPDATE edge_tasks SET status = 'done' WHERE id = 3")
        task.status, tag.name = "doing", "c-x"
        with pytest.raises(rdb.StaleTransitionError, match="now holds 'done'"):
            await session.flush()
    assert rows(engine, "SELECT name FROM edge_tags WHERE id = 3") == [("c",)]


# -- a status that is the mapper's version_id_col ------------------------------------------------


def _versioned_by_status(generator: Any) -> type[Any]:
    """A model whose ``version_id_col`` is its status column (``generator``: the mapper's
    ``version_id_generator``; None: SQLAlchemy's counter)."""
    reg = registry()

    class Counted(reg.generate_base()):  # type: ignore[misc]
        __tablename__ = "edge_counted"
        __transitions__ = rdb.TransitionRules(
            column="stage", transitions={0: {1}, 1: {2}}, initial={0}
        )
        id = sa.Column(sa.Integer, primary_key=True)
        stage = sa.Column(sa.Integer, nullable=False)
        note = sa.Column(sa.Text, nullable=False, default="")
        __mapper_args__: ClassVar[dict[str, Any]] = {"version_id_col": stage}
        if generator is not None:
            __mapper_args__["version_id_generator"] = generator

    return Counted


@pytest.mark.parametrize("generator", [None, lambda version: (version or 0) + 2])
def test_a_status_counted_as_the_version_is_refused_at_mapping(generator: Any) -> None:
    """SQLAlchemy writes a ``version_id_col``'s counter into every row it inserts (over the
    state it was given) and every UPDATE of it: a status counted so started outside its
    initial states unchecked (0 given, 1 inserted) and moved on each edit of any column. The
    rules are refused when the model is mapped, naming the version_id_col."""
    model = _versioned_by_status(generator)
    registry_of = model.registry
    try:
        with pytest.raises(TransitionRulesError) as info:
            registry_of.configure()
        said = str(info.value)
        assert "Counted.__transitions__ (column 'stage')" in said, said
        assert "version_id_col" in said, said
        assert "version_id_generator=False" in said, said
    finally:
        registry_of.dispose()


def test_a_status_the_application_sets_as_the_version_is_guarded(pg_url: str, service: str) -> None:
    """``version_id_generator=False``: the application sets the status, SQLAlchemy compares
    it in the UPDATE as the guard does. A legal move is written once; a row another client
    moved meanwhile is a StaleTransitionError naming what it holds; an illegal move is
    refused before anything is sent."""
    model = _versioned_by_status(False)
    engine = sa.create_engine(pg_url)
    try:
        model.metadata.create_all(engine)
        other_client(engine, "INSERT INTO edge_counted VALUES (1, 0, ''), (2, 0, '')")
        Sessions = rdb.ResilientSession(engine, service=service)
        with Sessions.begin() as session:
            session.get_one(model, 1).stage = 1
        with Sessions() as session:
            row = session.get_one(model, 2)
            other_client(engine, "UPDATE edge_counted SET stage = 1 WHERE id = 2")
            row.stage = 1
            with pytest.raises(rdb.StaleTransitionError, match="now holds 1") as stale:
                session.flush()
        assert (stale.value.pk, stale.value.from_state, stale.value.to_state) == (2, 0, 1)
        with Sessions() as session:
            session.get_one(model, 1).stage = 0
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                session.flush()
        assert (refused.value.pk, refused.value.from_state, refused.value.to_state) == (1, 1, 0)
        assert rows(engine, "SELECT id, stage FROM edge_counted ORDER BY id") == [(1, 1), (2, 1)]
    finally:
        model.registry.dispose()
        engine.dispose()


# -- a status whose onupdate is a SQL expression --------------------------------------------------


class Doc(Base):
    """An edit sends a document back to draft, computed by the server: legal from review,
    not from published."""

    __tablename__ = "edge_docs"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"draft": {"review"}, "review": {"draft", "published"}},
        initial={"draft"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), onupdate=sa.text("'draft'"))


def _seed_docs(engine: sa.Engine) -> None:
    other_client(engine, "DELETE FROM edge_docs")
    other_client(
        engine,
        "INSERT INTO edge_docs VALUES (1, '', 'review'), (2, '', 'review'), (3, '', 'published')",
    )


def _docs(engine: sa.Engine) -> list[tuple[Any, ...]]:
    return rows(engine, "SELECT id, body, status FROM edge_docs ORDER BY id")


def test_a_rewritten_update_writing_an_onupdate_expression_is_judged(
    engine: sa.Engine, service: str
) -> None:
    """SQL rewritten by the application's listener, the status written by its onupdate SQL
    expression: the rows are checked under lock, the UPDATE sent as rewritten, what it wrote
    read back and judged. An illegal move (published -> draft) is refused and nothing of the
    flush stays; a legal one (review -> draft) is written once."""
    commented(engine)
    Sessions = rdb.ResilientSession(engine, service=service)
    for keys in ([3], [1, 3]):
        _seed_docs(engine)
        with Sessions() as session:
            for key in keys:
                session.get_one(Doc, key).body = "edited"
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                session.commit()
        err = refused.value
        assert (err.pk, err.from_state, err.to_state) == (3, "published", "draft")
        assert _docs(engine) == [(1, "", "review"), (2, "", "review"), (3, "", "published")]
    with Sessions.begin() as session:
        for key in (1, 2):
            session.get_one(Doc, key).body = "edited"
    assert _docs(engine) == [(1, "edited", "draft"), (2, "edited", "draft"), (3, "", "published")]


@pytest.mark.asyncio
async def test_async_a_rewritten_update_writing_an_onupdate_expression_is_judged(
    engine: sa.Engine, aengine: AsyncEngine, service: str
) -> None:
    """The async twin (asyncpg: several rows are one executemany)."""
    commented(aengine)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    for keys in ([3], [1, 3]):
        _seed_docs(engine)
        async with Sessions() as session:
            for key in keys:
                (await session.get_one(Doc, key)).body = "edited"
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                await session.commit()
        assert (refused.value.pk, refused.value.to_state) == (3, "draft")
        assert _docs(engine) == [(1, "", "review"), (2, "", "review"), (3, "", "published")]
    async with Sessions.begin() as session:
        for key in (1, 2):
            (await session.get_one(Doc, key)).body = "edited"
    assert _docs(engine) == [(1, "edited", "draft"), (2, "edited", "draft"), (3, "", "published")]


def edit_during_flush(doc: Doc) -> Any:
    """A ``before_flush`` listener added after the guard's that edits ``doc`` (loaded) as the
    flush runs: a row the guard saw no change of, whose UPDATE the onupdate expression
    moves."""

    def listener(session: Session, flush_context: Any, instances: Any) -> None:
        doc.body = "by the listener"

    return listener


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_row_edited_during_the_flush_is_judged_from_what_it_holds(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str, driver: str
) -> None:
    """The flush edits document 1 (review -> draft, legal); a listener edits document 3 as it
    runs: its state is read under lock as its UPDATE is sent, and the onupdate's draft is
    refused from published; the same listener editing document 2 is written. A document the
    listener edits that another client deleted meanwhile is named as gone."""

    def run(key: int, *, deleted: bool = False) -> BaseException | None:
        _seed_docs(engine)

        def unit(session: Session) -> None:
            doc = session.get_one(Doc, key)
            if deleted:
                other_client(engine, f"DELETE FROM edge_docs WHERE id = {key}")
            event.listen(session, "before_flush", edit_during_flush(doc))  # after the guard's
            session.get_one(Doc, 1).body = "edited"

        try:
            if driver == "psycopg":
                rdb.ResilientSession(engine, service=service).run(unit)
            else:

                async def async_unit(session: AsyncSession) -> None:
                    await session.run_sync(unit)

                async def async_run() -> None:
                    async_engine = create_async_engine(pg_server.url(pg_database, driver=driver))
                    try:
                        await rdb.AsyncResilientSession(async_engine, service=service).run(
                            async_unit
                        )
                    finally:
                        await async_engine.dispose()

                asyncio.run(async_run())
        except rdb.IllegalTransitionError as exc:
            return exc
        return None

    refused = run(3)
    assert isinstance(refused, rdb.IllegalTransitionError), refused
    assert not isinstance(refused, rdb.StaleTransitionError)
    assert (refused.pk, refused.from_state, refused.to_state) == (3, "published", "draft")
    assert _docs(engine) == [(1, "", "review"), (2, "", "review"), (3, "", "published")]
    assert run(2) is None
    assert _docs(engine) == [
        (1, "edited", "draft"),
        (2, "by the listener", "draft"),
        (3, "", "published"),
    ]
    gone = run(2, deleted=True)
    assert isinstance(gone, rdb.StaleTransitionError), gone
    assert gone.pk == 2
    assert "no longer exists" in (gone.reason or ""), gone.reason
    assert _docs(engine) == [(1, "", "review"), (3, "", "published")]


def test_a_unit_that_committed_part_of_its_work_still_compares_and_sets(
    engine: sa.Engine, service: str
) -> None:
    """A unit that commits part of its work and goes on (its session's next transaction, which
    its next flush begins: objects are not expired at commit): the flush does not take the
    connection of the transaction that ended for its own; a row another client moved meanwhile
    is a StaleTransitionError, the first part stays."""

    def unit(session: Session) -> None:
        first, second = session.get_one(Task, 1), session.get_one(Task, 2)
        first.status = "doing"
        session.commit()
        other_client(engine, "UPDATE edge_tasks SET status = 'done' WHERE id = 2")
        second.status = "doing"
        session.flush()

    factory = rdb.ResilientSession(engine, service=service, expire_on_commit=False)
    with pytest.raises(rdb.StaleTransitionError, match="now holds 'done'") as stale:
        factory.run(unit)
    assert (stale.value.pk, stale.value.from_state) == (2, "todo")
    assert rows(engine, "SELECT id, status FROM edge_tasks ORDER BY id") == [
        (1, "doing"),
        (2, "done"),
        (3, "todo"),
    ]
