"""A status column with an ``onupdate``: an ORM bulk UPDATE that does not set the status still
moves it (SQLAlchemy applies the ``onupdate`` to every UPDATE, and every parameter set, that
leaves the column out). The flush guard judged that move; the bulk-UPDATE guard judged only a
status the statement names, so ``update(Doc).values(body=...)`` and a bulk UPDATE by primary key
``[{"id": 1, "body": ...}]`` moved an archived document back to 'draft', which the rules forbid,
unguarded (without the trigger). The ``onupdate`` is now judged as the state such a statement
writes: a value as a value of ``values()`` is, a SQL expression as such an expression is (by the
condition the statement carries; refused in a bulk UPDATE by primary key, as a SQL expression
given there is); a Python function, whose value SQLAlchemy computes only as it runs the UPDATE,
is refused. A statement that sets the status is judged by the state it sets (SQLAlchemy applies
no ``onupdate`` then).

Real server, no trigger installed: the session guards alone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb

RULES = rdb.TransitionRules(
    column="status",
    transitions={"draft": {"published"}, "published": {"archived", "draft"}},
    initial={"draft"},
)


class Base(DeclarativeBase):
    pass


class Doc(Base):
    """Any edit sends the document back to review."""

    __tablename__ = "docs"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate="draft")


class SqlDoc(Base):
    """The same, the onupdate a SQL expression."""

    __tablename__ = "sql_docs"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(
        sa.String(20), default="draft", onupdate=sa.func.lower("DRAFT")
    )


def _back_to_draft() -> str:
    return "draft"


class FnDoc(Base):
    """The same, the onupdate a Python function."""

    __tablename__ = "fn_docs"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate=_back_to_draft)


#: row 1 may go back to draft, row 2 may not
ROWS = "(1, 'x', 'published'), (2, 'x', 'archived')"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


def _set_rows(engine: sa.Engine, table: str = "docs") -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM {table}")
        conn.exec_driver_sql(f"INSERT INTO {table} (id, body, status) VALUES {ROWS}")


def _rows(engine: sa.Engine, table: str = "docs") -> dict[int, tuple[str, str]]:
    with engine.connect() as conn:
        found = conn.exec_driver_sql(f"SELECT id, body, status FROM {table} ORDER BY id")
        return {r[0]: (r[1], r[2]) for r in found}


def _sessions(engine: sa.Engine, service: str, mode: str) -> Any:
    return rdb.ResilientSession(
        engine, service=service, config=rdb.Config(circuit_breaker=False, bulk_update=mode)
    )


UNCHANGED = {1: ("x", "published"), 2: ("x", "archived")}
#: filter mode: the row that may not go back to draft is left out
FILTERED = {1: ("edited", "draft"), 2: ("x", "archived")}

#: the bulk UPDATEs of docs that leave the status to its onupdate: (statement, parameters,
#: execution options)
STATEMENTS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "criteria": (sa.update(Doc).where(Doc.id.in_([1, 2])).values(body="edited"), None, {}),
    "by_primary_key": (
        sa.update(Doc),
        [{"id": 1, "body": "edited"}, {"id": 2, "body": "edited"}],
        {},
    ),
    "per_parameter_set": (
        sa.update(Doc).where(Doc.id == sa.bindparam("row")).values(body="edited"),
        [{"row": 1}, {"row": 2}],
        {"dml_strategy": "orm", "synchronize_session": False},
    ),
}


@pytest.mark.parametrize("how", list(STATEMENTS))
def test_a_bulk_update_leaving_the_status_to_its_onupdate_is_judged(
    engine: sa.Engine, service: str, how: str
) -> None:
    stmt, params, options = STATEMENTS[how]
    _set_rows(engine)
    with _sessions(engine, service, "raise")() as session:
        with pytest.raises(rdb.IllegalTransitionError) as info:
            session.execute(stmt, params, execution_options=options)
        session.rollback()
    err = info.value
    assert (err.pk, err.from_state, err.to_state, err.via) == (2, "archived", "draft", "orm-update")
    assert _rows(engine) == UNCHANGED

    _set_rows(engine)
    with _sessions(engine, service, "filter")() as session:
        session.execute(stmt, params, execution_options=options)
        session.commit()
    assert _rows(engine) == FILTERED


def test_a_status_the_statement_sets_is_judged_instead_of_the_onupdate(
    engine: sa.Engine, service: str
) -> None:
    """SQLAlchemy applies no onupdate to a column the statement sets: archiving the published
    row is legal (the onupdate, 'draft', is not what is written)."""
    _set_rows(engine)
    with _sessions(engine, service, "raise")() as session:
        session.execute(sa.update(Doc).where(Doc.id == 1).values(body="y", status="archived"))
        session.execute(sa.update(Doc), [{"id": 2, "body": "y", "status": "archived"}])
        session.commit()
    assert _rows(engine) == {1: ("y", "archived"), 2: ("y", "archived")}


def test_an_onupdate_sql_expression_is_judged_by_the_statements_condition(
    engine: sa.Engine, service: str
) -> None:
    _set_rows(engine, "sql_docs")
    with _sessions(engine, service, "raise")() as session:
        with pytest.raises(rdb.IllegalTransitionError) as info:
            session.execute(sa.update(SqlDoc).values(body="edited"))
        session.rollback()
    assert (info.value.pk, info.value.from_state, info.value.to_state) == (2, "archived", "draft")
    assert _rows(engine, "sql_docs") == UNCHANGED

    with _sessions(engine, service, "filter")() as session:
        session.execute(sa.update(SqlDoc).values(body="edited"))
        session.commit()
    assert _rows(engine, "sql_docs") == FILTERED

    # its value per row can't be read before a bulk UPDATE by primary key: refused
    _set_rows(engine, "sql_docs")
    with _sessions(engine, service, "filter")() as session:
        with pytest.raises(rdb.TransitionRulesError, match="the column's onupdate"):
            session.execute(sa.update(SqlDoc), [{"id": 1, "body": "edited"}])
        session.rollback()
    assert _rows(engine, "sql_docs") == UNCHANGED


@pytest.mark.parametrize("by_primary_key", [False, True])
def test_an_onupdate_python_function_is_refused(
    engine: sa.Engine, service: str, by_primary_key: bool
) -> None:
    _set_rows(engine, "fn_docs")
    stmt: Any = sa.update(FnDoc).where(FnDoc.id == 1).values(body="edited")
    params: Any = None
    if by_primary_key:
        stmt, params = sa.update(FnDoc), [{"id": 1, "body": "edited"}]
    with _sessions(engine, service, "filter")() as session:
        with pytest.raises(rdb.TransitionRulesError, match="onupdate, a Python function"):
            session.execute(stmt, params)
        session.rollback()
        # setting the status itself is judged as usual
        session.execute(sa.update(FnDoc).where(FnDoc.id == 1).values(body="y", status="draft"))
        session.commit()
    assert _rows(engine, "fn_docs") == {1: ("y", "draft"), 2: ("x", "archived")}
