"""Bulk and unusual write paths against the status-transition guard, as an application writes
them: each illegal move is refused with the documented error (``IllegalTransitionError``: via
``orm-update`` for the ORM bulk-UPDATE guard, ``db`` for the trigger), a legal one goes through,
and nothing is half-written (a refused statement's unit leaves every row as it was, and is not
replayed).

The paths docs/transition-guard.md leaves to the trigger (Core and raw SQL, ``MERGE``, a
data-modifying ``WITH``, an upsert's UPDATE half, ``insert().from_select()``,
``bulk_update_mappings``, ``exec_driver_sql`` with one or many parameter sets, a function the
application calls, a
deferred trigger of the application's moving a status at COMMIT, a statement on the driver's
own connection) run with the trigger installed; the ORM ``update(Model)`` forms (each
``synchronize_session``, ``RETURNING``, ``UPDATE ... FROM``, by primary key) run without it, so
that the session guard alone is seen. Every model shape: a plain one, a status attribute
named otherwise than its column in a schema of its own, and quoted mixed-case schema, table and
column names. Real server; psycopg, and asyncpg for the async units."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db._config import Config

RULES: dict[str, Any] = {
    "transitions": {"pending": {"running"}, "running": {"done"}},
    "initial": {"pending"},
}


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(column="status", **RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(server_default="t")
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


class Job(Base):
    """The status attribute (``state``) maps a column of another name, in a schema."""

    __tablename__ = "jobs"
    __table_args__ = {"schema": "ops"}  # noqa: RUF012
    __transitions__ = rdb.TransitionRules(column="state", **RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(server_default="t")
    state: Mapped[str] = mapped_column("job_status", sa.String(20), default="pending")


class Item(Base):
    """Quoted mixed-case names everywhere: schema, table, key and status columns."""

    __tablename__ = "Work Items"
    __table_args__ = {"schema": "Ops Data"}  # noqa: RUF012
    __transitions__ = rdb.TransitionRules(column="cur", **RULES)
    id: Mapped[int] = mapped_column("ID", primary_key=True)
    title: Mapped[str] = mapped_column("Title", server_default="t")
    cur: Mapped[str] = mapped_column("Cur State", sa.String(20), default="pending")


class Link(Base):
    """Another table, joined by ``UPDATE ... FROM`` and moving statuses from a trigger."""

    __tablename__ = "links"
    id: Mapped[int] = mapped_column(primary_key=True)
    ref: Mapped[int]
    flag: Mapped[str]


MODELS = (Task, Job, Item)


def _attr(model: Any) -> str:
    return str(model.__transitions__.column)


def _key(model: Any) -> sa.Column[Any]:
    column: sa.Column[Any] = model.__mapper__.attrs["id"].columns[0]
    return column


def _status(model: Any) -> sa.Column[Any]:
    column: sa.Column[Any] = model.__mapper__.attrs[_attr(model)].columns[0]
    return column


def _names(model: Any, conn: Any) -> dict[str, str]:
    """The table, status column and key column as SQL text, quoted as needed."""
    prep = conn.dialect.identifier_preparer
    return {
        "t": prep.format_table(model.__table__),
        "c": prep.quote(_status(model).name),
        "id": prep.quote(_key(model).name),
    }


def _sql(model: Any, conn: Any, text: str) -> str:
    return text.format(**_names(model, conn))


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA ops")
        conn.exec_driver_sql('CREATE SCHEMA "Ops Data"')
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def triggered(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        for model in MODELS:
            rdb.install_transition_trigger(conn, model)
    return engine


def reset(engine: sa.Engine, model: Any) -> None:
    """Row 1 pending, row 2 done (written past the trigger, as a fixture may); links 1 -> 1,
    2 -> 2."""
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        conn.exec_driver_sql("DELETE FROM links")
        conn.exec_driver_sql("INSERT INTO links VALUES (1, 1, 'x'), (2, 2, 'x')")
        conn.exec_driver_sql(_sql(model, conn, "DELETE FROM {t}"))
        conn.exec_driver_sql(
            _sql(model, conn, "INSERT INTO {t} ({id}, {c}) VALUES (1, 'pending'), (2, 'done')")
        )


def stored(engine: sa.Engine, model: Any) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text(_sql(model, conn, "SELECT {c} FROM {t} ORDER BY {id}"))))


#: a statement moving the rows ``ids`` to ``to``, run in a session
Move = Callable[[Session, Any, str, list[int]], object]


def _merge(s: Session, m: Any, to: str, ids: list[int]) -> object:
    sql = _sql(
        m,
        s.connection(),
        "MERGE INTO {t} AS x USING (SELECT unnest(CAST(:ids AS int[])) AS k) AS src "
        "ON x.{id} = src.k WHEN MATCHED THEN UPDATE SET {c} = :to",
    )
    return s.execute(sa.text(sql), {"to": to, "ids": ids})


def _text_cte(s: Session, m: Any, to: str, ids: list[int]) -> object:
    sql = _sql(
        m,
        s.connection(),
        "WITH moved AS (UPDATE {t} SET {c} = :to WHERE {id} = ANY(:ids) RETURNING {id}) "
        "SELECT * FROM moved",
    )
    return s.execute(sa.text(sql), {"to": to, "ids": ids}).all()


def _core_cte(s: Session, m: Any, to: str, ids: list[int]) -> object:
    table, key, status = m.__table__, _key(m), _status(m)
    moved = sa.update(table).where(key.in_(ids)).values({status: to}).returning(key).cte()
    return s.execute(sa.select(moved.c[0])).all()


def _orm_cte(s: Session, m: Any, to: str, ids: list[int]) -> object:
    moved = sa.update(m).where(m.id.in_(ids)).values({_attr(m): to}).returning(m.id).cte()
    return s.execute(sa.select(moved.c[0])).all()


def _upsert(s: Session, m: Any, to: str, ids: list[int]) -> object:
    table, key, status = m.__table__, _key(m), _status(m)
    rows = [{key.key: i, status.key: "pending"} for i in ids]
    stmt = pg_insert(table).values(rows)
    return s.execute(stmt.on_conflict_do_update(index_elements=[key], set_={status.key: to}))


def _upsert_excluded(s: Session, m: Any, to: str, ids: list[int]) -> object:
    key, status = _key(m), _status(m)
    stmt = pg_insert(m).values([{"id": i, _attr(m): to} for i in ids])
    return s.execute(
        stmt.on_conflict_do_update(
            index_elements=[key], set_={status.key: stmt.excluded[status.key]}
        )
    )


def _core_update_from(s: Session, m: Any, to: str, ids: list[int]) -> object:
    table, key, status = m.__table__, _key(m), _status(m)
    links = Link.__table__.c
    stmt = sa.update(table).where(key == links.ref, links.ref.in_(ids)).values({status: to})
    return s.execute(stmt)


def _driver_sql(s: Session, m: Any, to: str, ids: list[int]) -> object:
    sql = _sql(m, s.connection(), "UPDATE {t} SET {c} = %(to)s WHERE {id} = %(id)s")
    return s.connection().exec_driver_sql(sql, {"to": to, "id": ids[-1]})


def _driver_sql_many(s: Session, m: Any, to: str, ids: list[int]) -> object:
    sql = _sql(m, s.connection(), "UPDATE {t} SET {c} = %(to)s WHERE {id} = %(id)s")
    return s.connection().exec_driver_sql(sql, [{"to": to, "id": i} for i in ids])


def _text_many(s: Session, m: Any, to: str, ids: list[int]) -> object:
    sql = _sql(m, s.connection(), "UPDATE {t} SET {c} = :to WHERE {id} = :id")
    return s.execute(sa.text(sql), [{"to": to, "id": i} for i in ids])


def _function(s: Session, m: Any, to: str, ids: list[int]) -> object:
    body = "UPDATE {t} SET {c} = t WHERE {id} = ANY(k) RETURNING 1"
    s.execute(
        sa.text(
            "CREATE FUNCTION pg_temp.move_rows(t text, k int[]) RETURNS int LANGUAGE sql "
            f"AS $fn$ {_sql(m, s.connection(), body)} $fn$"
        )
    )
    return s.execute(sa.text("SELECT pg_temp.move_rows(:to, :ids)"), {"to": to, "ids": ids}).all()


def _bulk_update_mappings(s: Session, m: Any, to: str, ids: list[int]) -> object:
    s.bulk_update_mappings(m, [{"id": i, _attr(m): to} for i in ids])
    return None


def _raw_executemany(s: Session, m: Any, to: str, ids: list[int]) -> object:
    """The driver's own connection (psycopg), past SQLAlchemy."""
    sql = _sql(m, s.connection(), "UPDATE {t} SET {c} = %s WHERE {id} = %s")
    driver = s.connection().connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor:
        cursor.executemany(sql, [(to, i) for i in ids])
    return None


TRIGGER_PATHS: dict[str, Move] = {
    "merge": _merge,
    "text-cte": _text_cte,
    "core-cte": _core_cte,
    "orm-cte": _orm_cte,
    "upsert": _upsert,
    "upsert-excluded": _upsert_excluded,
    "core-update-from": _core_update_from,
    "exec_driver_sql": _driver_sql,
    "exec_driver_sql-many": _driver_sql_many,
    "text-many": _text_many,
    "function": _function,
    "bulk_update_mappings": _bulk_update_mappings,
    "raw-executemany": _raw_executemany,
}


def _unit(engine: sa.Engine, service: str, move: Callable[[Session], object]) -> tuple[int, Any]:
    """Run ``move`` as a unit: how many times it ran, and what it raised."""
    calls = 0

    def unit(session: Session) -> None:
        nonlocal calls
        calls += 1
        move(session)

    try:
        rdb.ResilientSession(engine, service=service).run(unit)
    except Exception as exc:
        return calls, exc
    return calls, None


def _assert_blocked(err: Any, model: Any, from_state: str, to_state: str) -> None:
    assert isinstance(err, rdb.IllegalTransitionError), repr(err)
    assert (err.via, err.model, err.column, err.pk) == ("db", model.__name__, _attr(model), 2)
    assert (err.from_state, err.to_state) == (from_state, to_state)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("path", list(TRIGGER_PATHS))
def test_the_trigger_refuses_an_illegal_move_on_every_path(
    triggered: sa.Engine, service: str, model: Any, path: str
) -> None:
    """done -> pending is refused as an IllegalTransitionError(via="db") naming the model's
    attribute and the row; pending -> running goes through; a statement moving a legal row and
    an illegal one leaves both as they were; no unit is replayed."""
    move = TRIGGER_PATHS[path]
    reset(triggered, model)
    calls, err = _unit(triggered, service, lambda s: move(s, model, "pending", [2]))
    assert calls == 1
    _assert_blocked(err, model, "done", "pending")
    assert stored(triggered, model) == ["pending", "done"]

    calls, err = _unit(triggered, service, lambda s: move(s, model, "running", [1, 2]))
    assert calls == 1
    _assert_blocked(err, model, "done", "running")
    assert stored(triggered, model) == ["pending", "done"]  # row 1 not moved either

    calls, err = _unit(triggered, service, lambda s: move(s, model, "running", [1]))
    assert (calls, err) == (1, None)
    assert stored(triggered, model) == ["running", "done"]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_insert_from_select_must_start_in_an_initial_state(
    triggered: sa.Engine, service: str, model: Any
) -> None:
    reset(triggered, model)
    key, status = _key(model), _status(model)

    def copy(state: str) -> Callable[[Session], object]:
        rows = sa.select((Link.id + 100).label("k"), sa.literal(state).label("s"))
        return lambda s: s.execute(sa.insert(model.__table__).from_select([key, status], rows))

    calls, err = _unit(triggered, service, copy("done"))
    assert calls == 1
    assert isinstance(err, rdb.IllegalTransitionError), repr(err)
    assert (err.via, err.inserted, err.column, err.to_state) == ("db", True, _attr(model), "done")
    assert stored(triggered, model) == ["pending", "done"]
    assert _unit(triggered, service, copy("pending")) == (1, None)
    assert stored(triggered, model) == ["pending", "done", "pending", "pending"]


DEFERRED_MOVE = """
CREATE FUNCTION move_linked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE tasks SET status = NEW.flag WHERE id = NEW.ref; RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER links_move AFTER INSERT ON links DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW EXECUTE FUNCTION move_linked();
"""


@pytest.mark.parametrize("markers", [False, True], ids=["no-markers", "markers"])
def test_a_status_moved_by_a_deferred_trigger_at_commit(
    triggered: sa.Engine, service: str, markers: bool
) -> None:
    """An application's deferred trigger moving a status when the unit commits: the COMMIT
    is refused with the trigger's error, mapped; not an unknown outcome, not replayed."""
    with triggered.begin() as conn:
        conn.exec_driver_sql(DEFERRED_MOVE)
    if markers:
        rdb.install_commit_markers(triggered)
    reset(triggered, Task)
    calls, err = _unit(triggered, service, lambda s: s.add(Link(id=10, ref=2, flag="pending")))
    assert calls == 1
    _assert_blocked(err, Task, "done", "pending")
    with triggered.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM links WHERE id = 10")) == 0
    assert _unit(triggered, service, lambda s: s.add(Link(id=11, ref=1, flag="running"))) == (
        1,
        None,
    )
    assert stored(triggered, Task) == ["running", "done"]


def test_a_status_changed_by_the_applications_before_trigger(
    triggered: sa.Engine, service: str
) -> None:
    """An UPDATE that leaves the status alone, whose BEFORE trigger (the application's)
    moves it: the flush guard does not see it, the trigger judges the row as stored."""
    with triggered.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION reopen() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN NEW.status := 'pending'; RETURN NEW; END $$; "
            "CREATE TRIGGER reopen BEFORE UPDATE OF title ON tasks "
            "FOR EACH ROW EXECUTE FUNCTION reopen()"
        )
    reset(triggered, Task)

    def retitle(task_id: int) -> Callable[[Session], object]:
        return lambda s: setattr(s.get_one(Task, task_id), "title", "new")

    calls, err = _unit(triggered, service, retitle(2))
    assert calls == 1
    _assert_blocked(err, Task, "done", "pending")
    assert _unit(triggered, service, retitle(1)) == (1, None)  # pending -> pending: no move
    assert stored(triggered, Task) == ["pending", "done"]


# ------------------------------------------------------------------------------------------------
# the ORM bulk-UPDATE guard alone (no trigger)
# ------------------------------------------------------------------------------------------------

#: ORM UPDATEs moving rows 1 (pending: legal) and 2 (done: illegal) to running; each returns
#: the keys it reports as moved (RETURNING), or None
OrmMove = Callable[[Session, Any], "list[int] | None"]


def _orm_update(sync: Any, returning: bool) -> OrmMove:
    def move(s: Session, m: Any) -> list[int] | None:
        stmt = sa.update(m).where(m.id.in_([1, 2])).values({_attr(m): "running"})
        stmt = stmt.execution_options(synchronize_session=sync)
        if returning:
            return sorted(s.scalars(stmt.returning(m.id)))
        s.execute(stmt)
        return None

    return move


def _orm_update_from(s: Session, m: Any) -> list[int] | None:
    stmt = sa.update(m).where(m.id == Link.ref, Link.flag == "x").values({_attr(m): "running"})
    return sorted(s.scalars(stmt.returning(m.id)))


def _orm_by_pk(s: Session, m: Any) -> list[int] | None:
    s.execute(sa.update(m), [{"id": 1, _attr(m): "running"}, {"id": 2, _attr(m): "running"}])
    return None


ORM_PATHS: dict[str, OrmMove] = {
    **{
        f"{sync}{'-returning' if returning else ''}": _orm_update(sync, returning)
        for sync in ("auto", "evaluate", "fetch", False)
        for returning in (False, True)
    },
    "update-from": _orm_update_from,
    "by-primary-key": _orm_by_pk,
}


@pytest.mark.parametrize("mode", ["filter", "raise"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("path", list(ORM_PATHS))
def test_the_orm_update_guard_on_every_form(
    engine: sa.Engine, service: str, model: Any, path: str, mode: str
) -> None:
    """Filter mode moves the legal row only (RETURNING names only it; the session's objects
    follow their rows unless synchronization is off); raise mode refuses the statement with
    IllegalTransitionError(via="orm-update") and changes nothing."""
    reset(engine, model)
    factory = rdb.ResilientSession(engine, service=service, config=Config(bulk_update=mode))
    seen: dict[str, Any] = {}

    def unit(s: Session) -> None:
        one, two = s.get_one(model, 1), s.get_one(model, 2)
        seen["returned"] = ORM_PATHS[path](s, model)
        seen["objects"] = (getattr(one, _attr(model)), getattr(two, _attr(model)))

    if mode == "raise":
        with pytest.raises(rdb.IllegalTransitionError) as info:
            factory.run(unit)
        assert (info.value.via, info.value.pk, info.value.column) == ("orm-update", 2, _attr(model))
        assert stored(engine, model) == ["pending", "done"]
        return
    factory.run(unit)
    assert stored(engine, model) == ["running", "done"]
    assert seen["returned"] in (None, [1])
    if path not in ("False", "False-returning"):
        assert seen["objects"] == ("running", "done")


# ------------------------------------------------------------------------------------------------
# async (asyncpg)
# ------------------------------------------------------------------------------------------------


async def _async_unit(
    url: str, service: str, move: Callable[[AsyncSession], Any]
) -> tuple[int, Any]:
    engine = create_async_engine(url)
    calls = 0

    async def unit(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await move(session)

    try:
        await rdb.AsyncResilientSession(engine, service=service).run(unit)
    except Exception as exc:
        return calls, exc
    finally:
        await engine.dispose()
    return calls, None


@pytest.mark.asyncio
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "path", [p for p in TRIGGER_PATHS if "driver_sql" not in p and "raw" not in p]
)
async def test_the_trigger_refuses_an_illegal_move_async(
    triggered: sa.Engine, pg_async_url: str, service: str, model: Any, path: str
) -> None:
    move = TRIGGER_PATHS[path]
    reset(triggered, model)

    def moving(to: str, ids: list[int]) -> Callable[[AsyncSession], Any]:
        return lambda s: s.run_sync(lambda sync: move(sync, model, to, ids))

    calls, err = await _async_unit(pg_async_url, service, moving("running", [1, 2]))
    assert calls == 1
    _assert_blocked(err, model, "done", "running")
    assert stored(triggered, model) == ["pending", "done"]
    assert await _async_unit(pg_async_url, service, moving("running", [1])) == (1, None)
    assert stored(triggered, model) == ["running", "done"]


@pytest.mark.asyncio
@pytest.mark.parametrize("many", [False, True], ids=["execute", "executemany"])
async def test_a_block_on_asyncpgs_own_connection_in_a_unit(
    triggered: sa.Engine, pg_async_url: str, service: str, many: bool
) -> None:
    """A statement the unit sends on asyncpg's own connection, past SQLAlchemy: its refusal
    is the unit's IllegalTransitionError as through SQLAlchemy (it was the driver's error)."""
    model = Item
    reset(triggered, model)

    def moving(to: str, ids: list[int]) -> Callable[[AsyncSession], Any]:
        async def move(s: AsyncSession) -> None:
            conn = await s.connection()
            # (SQLAlchemy's asyncpg adapter sends BEGIN with its first statement: one sent on
            # the driver's connection before it would run in autocommit)
            await conn.execute(sa.text("SELECT 1"))
            sql = _sql(model, conn, "UPDATE {t} SET {c} = $1 WHERE {id} = $2")
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            if many:
                await driver.executemany(sql, [(to, i) for i in ids])
            else:
                for i in ids:
                    await driver.execute(sql, to, i)

        return move

    calls, err = await _async_unit(pg_async_url, service, moving("running", [1, 2]))
    assert calls == 1
    _assert_blocked(err, model, "done", "running")
    assert stored(triggered, model) == ["pending", "done"]
    assert await _async_unit(pg_async_url, service, moving("running", [1])) == (1, None)
    assert stored(triggered, model) == ["running", "done"]
