"""An ORM bulk UPDATE whose rows the ORM narrows by ``with_loader_criteria()``: given in the
statement's options, or added by the application's ``do_orm_execute`` listener (SQLAlchemy's
soft-delete / multi-tenant recipe). The guard's check judged and locked every row the
statement's own WHERE matched: in raise mode a legal UPDATE was refused because of a row the
criteria leave out (and the error named it: another tenant's key), both modes locked rows the
UPDATE never touches, filter mode counted them. The check now applies the criteria as the
UPDATE does. Real server; sync (psycopg) and async (asyncpg); the locks seen from a second
connection."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from scenarios import metadata_engine
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    aliased,
    mapped_column,
    with_loader_criteria,
)

import resilient_db as rdb
from resilient_db.testing import PostgresServer
from resilient_db.transitions._report import transition_stats


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "criteria_tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"in_progress", "cancelled"}, "in_progress": {"completed"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(20))
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


#: the application's criteria: its tenant's rows only
MINE = with_loader_criteria(Task, Task.tenant == "mine")


class _Tenanted(Session):
    """A session class whose ``do_orm_execute`` listener adds the criteria to each UPDATE
    (SQLAlchemy's recipe), registered to run before the guard's (``insert=True``)."""


@event.listens_for(_Tenanted, "do_orm_execute", insert=True)
def _tenant_only(state: ORMExecuteState) -> None:
    tenant = state.execution_options.get("tenant")
    if tenant is None:
        return
    if state.is_update or (state.is_select and state.execution_options.get("select_too")):
        # a lambda: the tenant is read anew at each statement (SQLAlchemy caches the SQL)
        state.statement = state.statement.options(
            with_loader_criteria(
                Task, lambda cls: cls.tenant == tenant, track_closure_variables=True
            )
        )


@event.listens_for(_Tenanted, "do_orm_execute", insert=True)
def _selects_only(state: ORMExecuteState) -> None:
    if state.is_select and state.execution_options.get("selects_only"):
        state.statement = state.statement.options(MINE)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from metadata_engine(pg_url, Base)


def _set_rows(engine: sa.Engine, rows: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM criteria_tasks")
        conn.exec_driver_sql(f"INSERT INTO criteria_tasks VALUES {rows}")


def _rows(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as conn:
        found = conn.exec_driver_sql("SELECT id, status FROM criteria_tasks ORDER BY id")
        return {row[0]: row[1] for row in found}


def _locked(engine: sa.Engine, row: int) -> bool:
    """Whether another transaction holds row ``row``'s lock (asked from a connection of
    its own, without waiting)."""
    with engine.connect() as conn:
        try:
            conn.exec_driver_sql(f"SELECT 1 FROM criteria_tasks WHERE id = {row} FOR UPDATE NOWAIT")
        except sa.exc.OperationalError as exc:
            if isinstance(exc.orig, psycopg.errors.LockNotAvailable):
                return True
            raise
        finally:
            conn.rollback()
    return False


def _sessions(engine: sa.Engine, service: str, mode: str) -> Any:
    config = rdb.load_config(environ={}).replace(bulk_update=mode, max_retries=0)
    return rdb.ResilientSession(engine, service=service, config=config, class_=_Tenanted)


#: another tenant's row (1, completed: no move to cancelled) and two of the application's
ROWS = "(1, 'other', 'completed'), (2, 'mine', 'pending'), (3, 'mine', 'in_progress')"

#: the UPDATE narrowed by the criteria, given in its options or by the listener
CANCEL = {
    "options": (sa.update(Task).where(Task.id > 0).values(status="cancelled").options(MINE), {}),
    "listener": (
        sa.update(Task).where(Task.id > 0).values(status="cancelled"),
        {"tenant": "mine", "select_too": True},
    ),
}


@pytest.mark.parametrize("mode", ["raise", "filter"])
@pytest.mark.parametrize("given", ["options", "listener"])
def test_rows_the_criteria_leave_out_are_neither_judged_nor_locked(
    engine: sa.Engine,
    service: str,
    mode: str,
    given: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Row 1 (another tenant's, completed) is out of the UPDATE: it refuses nothing, is named
    nowhere, counted nowhere and not locked; row 3 (the application's, in_progress: no move to
    cancelled) is judged as before: refused in raise mode, left out and counted in filter mode."""
    _set_rows(engine, ROWS)
    Sessions = _sessions(engine, service, mode)
    stmt, options = CANCEL[given]
    before = transition_stats()["bulk_rows_filtered"]
    caplog.set_level(logging.WARNING, logger="resilient_db")
    with Sessions() as session:
        if mode == "raise":
            with pytest.raises(rdb.IllegalTransitionError) as info:
                session.execute(stmt, execution_options=options)
            err = info.value
            assert (err.pk, err.from_state) == (3, "in_progress")
            assert "1 matching row(s)" in err.reason
        else:
            assert session.execute(stmt, execution_options=options).rowcount == 1  # type: ignore[attr-defined]
            assert transition_stats()["bulk_rows_filtered"] == before + 1
            [line] = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
            assert "blocked for 1 row(s)" in line, line
        assert not _locked(engine, 1)
        assert _locked(engine, 3)  # the application's rows are locked by the check
        session.commit()
    expected = {1: "completed", 2: "pending" if mode == "raise" else "cancelled", 3: "in_progress"}
    assert _rows(engine) == expected


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_a_legal_update_is_not_refused_for_a_row_the_criteria_leave_out(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """The reproducer's case: the only illegal row is another tenant's; the UPDATE, legal for
    every row it changes, runs in raise mode too, and filter mode counts nothing."""
    _set_rows(engine, "(1, 'other', 'completed'), (2, 'mine', 'pending')")
    Sessions = _sessions(engine, service, mode)
    before = transition_stats()["bulk_rows_filtered"]
    with Sessions() as session:
        stmt = sa.update(Task).values(status="cancelled").options(MINE)
        assert session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
        assert not _locked(engine, 1)
        session.commit()
    assert transition_stats()["bulk_rows_filtered"] == before
    assert _rows(engine) == {1: "completed", 2: "cancelled"}


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_criteria_of_a_new_state_given_as_an_expression_and_per_parameter_set(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """The same for the other forms the check takes: a new state given as a SQL expression,
    and an UPDATE run once per parameter set (``dml_strategy="orm"``)."""
    Sessions = _sessions(engine, service, mode)
    statements: list[tuple[Any, Any, dict[str, Any]]] = [
        (
            sa.update(Task).values(status=sa.func.lower("CANCELLED")).options(MINE),
            None,
            {"synchronize_session": False},
        ),
        (
            sa.update(Task).where(Task.id == sa.bindparam("row")).values(status="cancelled"),
            [{"row": 1}, {"row": 2}],
            {"dml_strategy": "orm", "synchronize_session": False},
        ),
    ]
    for stmt, params, options in statements:
        _set_rows(engine, "(1, 'other', 'completed'), (2, 'mine', 'pending')")
        with Sessions() as session:
            session.execute(stmt.options(MINE), params, execution_options=options)
            assert not _locked(engine, 1)
            session.commit()
        assert _rows(engine) == {1: "completed", 2: "cancelled"}


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_criteria_sqlalchemy_leaves_out_of_the_update_are_left_out_of_the_check(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """SQLAlchemy doesn't add the criteria to an UPDATE it runs as Core
    (``dml_strategy="core_only"``): every row of its WHERE is judged, as it is changed."""
    _set_rows(engine, "(1, 'other', 'completed'), (2, 'mine', 'pending')")
    Sessions = _sessions(engine, service, mode)
    stmt = sa.update(Task).values(status="cancelled").options(MINE)
    with Sessions() as session:
        options = {"dml_strategy": "core_only", "synchronize_session": False}
        if mode == "raise":
            with pytest.raises(rdb.IllegalTransitionError) as info:
                session.execute(stmt, execution_options=options)
            assert info.value.pk == 1
        else:
            assert session.execute(stmt, execution_options=options).rowcount == 1  # type: ignore[attr-defined]
        session.commit()
    assert _rows(engine) == {1: "completed", 2: "pending" if mode == "raise" else "cancelled"}


@pytest.mark.filterwarnings("ignore:UPDATE statement has a cartesian product")
@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_criteria_of_an_update_of_an_alias(engine: sa.Engine, service: str, mode: str) -> None:
    """SQLAlchemy adds the criteria to the table, not the alias (``UPDATE t AS t_1 ... FROM
    t WHERE t.tenant = ...``, with a warning of the cartesian product): the alias's rows
    change when any row of the table meets them.
    None does: nothing changes, and raise mode refuses nothing. One does: each row the UPDATE
    leaves behind is counted once."""
    a = aliased(Task)
    stmt = sa.update(a).where(a.id > 0).values(status="cancelled").options(MINE)
    options = {"synchronize_session": False}
    Sessions = _sessions(engine, service, mode)
    _set_rows(engine, "(1, 'other', 'completed'), (2, 'other', 'pending')")
    with Sessions() as session:
        assert session.execute(stmt, execution_options=options).rowcount == 0  # type: ignore[attr-defined]
        assert not _locked(engine, 1)
        session.commit()
    assert _rows(engine) == {1: "completed", 2: "pending"}
    if mode == "raise":
        return
    _set_rows(engine, "(1, 'other', 'completed'), (2, 'mine', 'pending'), (3, 'mine', 'pending')")
    before = transition_stats()["bulk_rows_filtered"]
    with Sessions() as session:
        assert session.execute(stmt, execution_options=options).rowcount == 2  # type: ignore[attr-defined]
        session.commit()
    assert transition_stats()["bulk_rows_filtered"] == before + 1
    assert _rows(engine) == {1: "completed", 2: "cancelled", 3: "cancelled"}


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["raise", "filter"])
async def test_async_rows_the_criteria_leave_out_are_neither_judged_nor_locked(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str, mode: str
) -> None:
    """As above, through ``AsyncResilientSession`` on asyncpg."""
    _set_rows(engine, "(1, 'other', 'completed'), (2, 'mine', 'pending')")
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    config = rdb.load_config(environ={}).replace(bulk_update=mode, max_retries=0)
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=config)
    before = transition_stats()["bulk_rows_filtered"]
    try:
        async with Sessions() as session:
            stmt = sa.update(Task).values(status="cancelled").options(MINE)
            result: Any = await session.execute(stmt)
            assert result.rowcount == 1
            assert not _locked(engine, 1)
            assert _locked(engine, 2)
            await session.commit()
    finally:
        await aengine.dispose()
    assert transition_stats()["bulk_rows_filtered"] == before
    assert _rows(engine) == {1: "completed", 2: "cancelled"}


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_each_statement_is_judged_by_its_own_tenant(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """The listener's lambda reads the tenant at each statement: the check of each UPDATE
    applies that statement's tenant, not one cached from an earlier statement."""
    _set_rows(engine, "(1, 'other', 'completed'), (2, 'mine', 'pending'), (3, 'other', 'pending')")
    Sessions = _sessions(engine, service, mode)
    stmt = sa.update(Task).values(status="cancelled")
    with Sessions() as session:
        assert session.execute(stmt, execution_options={"tenant": "mine"}).rowcount == 1  # type: ignore[attr-defined]
        session.commit()
    _set_rows(engine, "(1, 'other', 'pending'), (2, 'mine', 'completed')")
    with Sessions() as session:
        assert session.execute(stmt, execution_options={"tenant": "other"}).rowcount == 1  # type: ignore[attr-defined]
        assert not _locked(engine, 2)
        session.commit()
    assert _rows(engine) == {1: "cancelled", 2: "completed"}


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_criteria_a_listener_adds_to_selects_only_do_not_narrow_the_check(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """A listener adding the criteria to SELECTs only (SQLAlchemy's soft-delete recipe) leaves
    the UPDATE as it is: every row it changes is judged (the check is no SELECT of the
    session's, which that listener would narrow)."""
    _set_rows(engine, "(1, 'other', 'completed'), (2, 'mine', 'pending')")
    Sessions = _sessions(engine, service, mode)
    stmt = sa.update(Task).values(status="cancelled")
    with Sessions() as session:
        options = {"selects_only": True, "synchronize_session": False}
        if mode == "raise":
            with pytest.raises(rdb.IllegalTransitionError) as info:
                session.execute(stmt, execution_options=options)
            assert info.value.pk == 1
        else:
            assert session.execute(stmt, execution_options=options).rowcount == 1  # type: ignore[attr-defined]
        session.commit()
    assert _rows(engine) == {1: "completed", 2: "pending" if mode == "raise" else "cancelled"}


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_criteria_of_a_listener_after_the_guards_fail_safe(
    engine: sa.Engine, service: str, mode: str
) -> None:
    """A listener of the factory runs after the guard's (class-level listeners run first):
    the criteria it adds are not seen by the check, which judges every row of the statement's
    own WHERE (as without criteria): raise mode refuses for another tenant's row and nothing
    changes; filter mode counts it, and the UPDATE changes only the legal rows the criteria
    keep. No illegal move either way."""
    _set_rows(engine, "(1, 'other', 'completed'), (2, 'mine', 'pending'), (3, 'other', 'pending')")
    Sessions = _sessions(engine, service, mode)

    def late(state: ORMExecuteState) -> None:
        if state.is_update:
            state.statement = state.statement.options(MINE)

    event.listen(Sessions, "do_orm_execute", late)
    before = transition_stats()["bulk_rows_filtered"]
    stmt = sa.update(Task).values(status="cancelled")
    with Sessions() as session:
        if mode == "raise":
            with pytest.raises(rdb.IllegalTransitionError) as info:
                session.execute(stmt)
            assert info.value.pk == 1
        else:
            assert session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
            assert transition_stats()["bulk_rows_filtered"] == before + 1
        session.commit()
    changed = {} if mode == "raise" else {2: "cancelled"}
    assert _rows(engine) == {1: "completed", 2: "pending", 3: "pending", **changed}
