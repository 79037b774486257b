"""A status column whose ``onupdate`` is a SQL expression (``mapped_column(...,
onupdate=text("'draft'"))``): every flush UPDATE of a row that does not set the status has the
server compute the expression and write it. The flush guard did not judge it at all: an edit of
a published document committed it as ``draft``, which its rules forbid, unless the database
trigger was installed. The state written is now judged once the server wrote it (the
expression evaluated once, by the UPDATE itself): one row sent alone returns it with the
UPDATE (``RETURNING``, no extra round trip); rows of an executemany, or of an UPDATE carrying
SQLAlchemy's own RETURNING (``eager_defaults=True``), are read back after it, by primary key. An
illegal move raises ``IllegalTransitionError`` from the flush, whose transaction is rolled back:
nothing illegal commits. The UPDATE is the compare-and-set as for a status set: a row another
transaction moved meanwhile is a ``StaleTransitionError``.

Real server, no trigger installed (the session guard alone), real concurrent transactions;
psycopg, and asyncpg (whose executemany reports no row count: the raising form)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sent import Sent
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


def _rules() -> rdb.TransitionRules:
    return rdb.TransitionRules(
        column="status",
        transitions={
            "draft": {"review"},
            "review": {"draft", "published"},
            "published": {"archived"},
        },
        initial={"draft"},
    )


class Doc(Base):
    """An edit sends a document back to draft, computed by the server... which the rules
    forbid from published."""

    __tablename__ = "docs"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate=sa.text("'draft'"))


class EagerDoc(Base):
    """The same, SQLAlchemy fetching the onupdate's value itself (RETURNING of its own)."""

    __tablename__ = "eager_docs"
    __transitions__ = _rules()
    __mapper_args__: ClassVar[dict[str, Any]] = {"eager_defaults": True}
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate=sa.text("'draft'"))


#: every call of nextval('tick') is the next number: a second evaluation would differ
TICK = sa.Sequence("tick")


class TickDoc(Base):
    """An edit sends the document back to draft on even ticks, leaves it on odd ones."""

    __tablename__ = "tick_docs"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(
        sa.String(20),
        default="draft",
        onupdate=sa.case(
            (sa.func.nextval("tick") % 2 == 0, "draft"), else_=sa.literal_column("status")
        ),
    )


MODELS = [Doc, EagerDoc]
Model = Any


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("CREATE SEQUENCE tick"))
        for model in (*MODELS, TickDoc):
            conn.execute(
                sa.insert(model),
                [
                    {"id": 1, "status": "review"},
                    {"id": 2, "status": "review"},
                    {"id": 3, "status": "published"},
                ],
            )
    yield eng
    eng.dispose()


def stored(engine: sa.Engine, model: Model) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(model.id, model.body, model.status).order_by(model.id))
        return [tuple(r) for r in rows]  # type: ignore[misc]


def move(engine: sa.Engine, model: Model, key: int, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(model.__table__).where(model.id == key).values(status=status))


SEEDED = [(1, "", "review"), (2, "", "review"), (3, "", "published")]


@pytest.mark.parametrize("model", MODELS)
def test_an_illegal_onupdate_is_refused(engine: sa.Engine, service: str, model: Model) -> None:
    """published -> draft by an edit: refused, nothing written (it committed as draft)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        session.get_one(model, 3).body = "edited"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    err = refused.value
    assert not isinstance(err, rdb.StaleTransitionError)
    assert (err.pk, err.from_state, err.to_state, err.via) == (3, "published", "draft", "flush")
    assert "onupdate" in err.reason
    assert stored(engine, model) == SEEDED


@pytest.mark.parametrize("model", MODELS)
def test_a_legal_onupdate_is_written(engine: sa.Engine, service: str, model: Model) -> None:
    """review -> draft by an edit: written, by one compare-and-set UPDATE (which returns the
    state written; with eager_defaults SQLAlchemy's own RETURNING, the row read back)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    sent = Sent(engine)
    try:
        with Sessions.begin() as session:
            doc = session.get_one(model, 1)
            doc.body = "edited"
            session.flush()
            if model is EagerDoc:
                assert doc.__dict__["status"] == "draft"  # fetched by SQLAlchemy, as before
    finally:
        sent.stop()
    table = model.__tablename__
    assert [s for s in sent.sql if "FOR UPDATE" in s] == []
    updates = sent.matching("UPDATE")
    assert len(updates) == 1
    assert f"AND {table}.status = " in updates[0]
    assert "RETURNING" in updates[0]
    reads = [s for s in sent.matching("SELECT") if "WHERE" in s and f"{table}.id IN" in s]
    assert len(reads) == (1 if model is EagerDoc else 0)
    assert stored(engine, model)[0] == (1, "edited", "draft")


@pytest.mark.parametrize("model", MODELS)
def test_several_rows_in_one_flush(engine: sa.Engine, service: str, model: Model) -> None:
    """Rows of one flush: two legal rows and an illegal one refuse all; the legal ones alone
    are written (one executemany, read back in one SELECT; eager_defaults: row by row)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        for doc in [session.get_one(model, key) for key in (1, 2, 3)]:
            doc.body = "edited"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    assert (refused.value.pk, refused.value.from_state, refused.value.to_state) == (
        3,
        "published",
        "draft",
    )
    assert stored(engine, model) == SEEDED
    sent = Sent(engine)
    try:
        with Sessions.begin() as session:
            for doc in [session.get_one(model, key) for key in (1, 2)]:
                doc.body = "edited"
    finally:
        sent.stop()
    assert [s for s in sent.sql if "FOR UPDATE" in s] == []
    if model is Doc:
        assert [many for s, many in sent.sent if s.startswith("UPDATE")] == [True]
    assert [(k, s) for k, _, s in stored(engine, model)] == [
        (1, "draft"),
        (2, "draft"),
        (3, "published"),
    ]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rows", [1, 2])
def test_a_row_moved_meanwhile_is_stale(
    engine: sa.Engine, service: str, model: Model, rows: int
) -> None:
    """Loaded in review (draft is legal from there); another transaction publishes it: the
    edit's UPDATE matches nothing, stale, naming what the row holds."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        docs = [session.get_one(model, key) for key in (1, 2)[:rows]]
        move(engine, model, rows, "published")
        for doc in docs:
            doc.body = "edited"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    err = stale.value
    assert (err.pk, err.from_state) == (rows, "review")
    assert "now holds 'published'" in err.reason
    assert stored(engine, model)[rows - 1] == (rows, "", "published")
    assert stored(engine, model)[0] == (1, "", "published" if rows == 1 else "review")


def test_a_status_not_loaded_is_read_first(engine: sa.Engine, service: str) -> None:
    """The status expired (not loaded): its state is read first, the move judged as written."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        doc = session.get_one(Doc, 3)
        session.expire(doc, ["status"])
        doc.body = "edited"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    assert (refused.value.from_state, refused.value.to_state) == ("published", "draft")
    with Sessions.begin() as session:
        doc = session.get_one(Doc, 1)
        session.expire(doc, ["status"])
        doc.body = "edited"
    assert stored(engine, Doc) == [(1, "edited", "draft"), *SEEDED[1:]]


def test_a_volatile_onupdate_is_evaluated_once(engine: sa.Engine, service: str) -> None:
    """The expression is judged by the value the UPDATE wrote: the first edit of the published
    row takes tick 1 (it stays published: legal, written), the second tick 2 (draft: refused).
    A check evaluating it apart from the SET would have judged another tick than it wrote."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions.begin() as session:
        session.get_one(TickDoc, 3).body = "first"
    assert stored(engine, TickDoc)[2] == (3, "first", "published")
    with Sessions() as session:
        session.get_one(TickDoc, 3).body = "second"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    assert (refused.value.from_state, refused.value.to_state) == ("published", "draft")
    assert stored(engine, TickDoc)[2] == (3, "first", "published")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT last_value FROM tick")).scalar_one() == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("model", MODELS)
async def test_async(
    engine: sa.Engine,
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    model: Model,
) -> None:
    """asyncpg: one row (RETURNING), several (the raising form, read back), a stale row."""
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    try:
        async with Sessions() as session:
            (await session.get_one(model, 3)).body = "edited"
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                await session.commit()
        assert (refused.value.pk, refused.value.to_state) == (3, "draft")
        async with Sessions() as session:
            docs = [await session.get_one(model, key) for key in (2, 3)]
            for doc in docs:
                doc.body = "edited"
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                await session.commit()
        assert (refused.value.pk, refused.value.to_state) == (3, "draft")
        assert stored(engine, model) == SEEDED
        async with Sessions.begin() as session:
            (await session.get_one(model, 1)).body = "edited"
        async with Sessions() as session:
            docs = [await session.get_one(model, key) for key in (1, 2)]
            move(engine, model, 2, "published")
            for doc in docs:
                doc.body = "again"
            with pytest.raises(rdb.StaleTransitionError) as stale:
                await session.commit()
        assert (stale.value.pk, stale.value.from_state) == (2, "review")
        assert "now holds 'published'" in stale.value.reason
    finally:
        await aengine.dispose()
    assert stored(engine, model) == [(1, "edited", "draft"), (2, "", "published"), SEEDED[2]]
