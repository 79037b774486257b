"""A status column with a Python-side ``onupdate`` (``mapped_column(..., onupdate="draft")``, or a
function): every flush UPDATE of a row that does not set the status writes the onupdate. The
flush guard did not judge it before the flush: it watched the table, and when the UPDATE came it
read the row under lock (``SELECT ... FOR UPDATE``, one more round trip per write) to judge the
move. The onupdate is now judged from the state the row was loaded in, and the UPDATE carries
the compare-and-set (``AND status = :loaded``) as for a status set: no extra statement. An
onupdate that would make an illegal move is still refused (when the UPDATE is sent: a row with
no net change gets no UPDATE, hence no onupdate); a row another transaction moved meanwhile is
a ``StaleTransitionError`` (it was judged, under lock, from the state the other transaction
left, as an ``IllegalTransitionError`` or a silent success).

Real server, real concurrent transactions; psycopg, and asyncpg (whose executemany reports no
row count: the raising form)."""

from __future__ import annotations

from collections.abc import Iterator

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
    """An edit sends a published document back to draft... which its rules forbid."""

    __tablename__ = "docs"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate="draft")


def _to_draft() -> str:
    return "draft"


class CalledDoc(Base):
    """The same, the onupdate a Python function (its value computed as the UPDATE runs)."""

    __tablename__ = "called_docs"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate=_to_draft)


MODELS = [Doc, CalledDoc]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    for model in MODELS:
        with eng.begin() as conn:
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


def stored(engine: sa.Engine, model: type[Doc | CalledDoc]) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(model.id, model.body, model.status).order_by(model.id))
        return [tuple(r) for r in rows]  # type: ignore[misc]


def move(engine: sa.Engine, model: type[Doc | CalledDoc], key: int, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(model.__table__).where(model.id == key).values(status=status))


@pytest.mark.parametrize("model", MODELS)
def test_an_onupdate_is_compare_and_set_on_the_update(
    engine: sa.Engine, service: str, model: type[Doc | CalledDoc]
) -> None:
    """review -> draft by an edit: one UPDATE, carrying the compare-and-set; no SELECT FOR
    UPDATE."""
    Sessions = rdb.ResilientSession(engine, service=service)
    sent = Sent(engine)
    try:
        with Sessions.begin() as session:
            session.get_one(model, 1).body = "edited"
    finally:
        sent.stop()
    table = model.__tablename__
    assert [s for s in sent.sql if "FOR UPDATE" in s] == []
    updates = sent.matching("UPDATE")
    assert len(updates) == 1
    assert f"AND {table}.status = " in updates[0]
    assert stored(engine, model)[0] == (1, "edited", "draft")


@pytest.mark.parametrize("model", MODELS)
def test_an_illegal_onupdate_is_refused(
    engine: sa.Engine, service: str, model: type[Doc | CalledDoc]
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        session.get_one(model, 3).body = "edited"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    err = refused.value
    assert not isinstance(err, rdb.StaleTransitionError)
    assert (err.pk, err.from_state, err.to_state, err.via) == (3, "published", "draft", "flush")
    assert "onupdate" in err.reason
    with Sessions() as session:  # the status set to what it holds: the UPDATE leaves it out
        doc = session.get_one(model, 3)
        doc.status = "published"
        doc.body = "edited"
        with pytest.raises(rdb.IllegalTransitionError):
            session.commit()
    with Sessions.begin() as session:  # no net change: no UPDATE, no onupdate
        doc = session.get_one(model, 3)
        doc.body = doc.body
    with Sessions.begin() as session:  # the status set: the onupdate is not written
        doc = session.get_one(model, 3)
        doc.status = "archived"
        doc.body = "archived"
    assert stored(engine, model)[2] == (3, "archived", "archived")


@pytest.mark.parametrize("model", MODELS)
def test_several_rows_in_one_flush(
    engine: sa.Engine, service: str, model: type[Doc | CalledDoc]
) -> None:
    """The ORM's executemany: both legal rows compare-and-set, one illegal row refuses all."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        for key in (1, 2, 3):
            session.get_one(model, key).body = "edited"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    assert (refused.value.pk, refused.value.to_state) == (3, "draft")
    sent = Sent(engine)
    try:
        with Sessions.begin() as session:
            for key in (1, 2):
                session.get_one(model, key).body = "edited"
    finally:
        sent.stop()
    assert [s for s in sent.sql if "FOR UPDATE" in s] == []
    assert [(k, s) for k, _, s in stored(engine, model)] == [
        (1, "draft"),
        (2, "draft"),
        (3, "published"),
    ]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rows", [1, 2])
def test_a_row_moved_meanwhile_is_stale(
    engine: sa.Engine, service: str, model: type[Doc | CalledDoc], rows: int
) -> None:
    """Loaded in review (draft is legal from there); another transaction publishes it; the
    edit's UPDATE matches nothing: stale, naming what the row holds. It was judged under lock
    from 'published' instead (an IllegalTransitionError)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        docs = [session.get_one(model, key) for key in (1, 2)[:rows]]
        move(engine, model, rows, "published")
        for doc in docs:
            doc.body = "edited"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    err = stale.value
    assert (err.pk, err.from_state, err.to_state) == (rows, "review", "draft")
    assert "now holds 'published'" in err.reason
    assert stored(engine, model)[rows - 1] == (rows, "", "published")


@pytest.mark.asyncio
@pytest.mark.parametrize("model", MODELS)
async def test_async(
    engine: sa.Engine,
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    model: type[Doc | CalledDoc],
) -> None:
    """asyncpg: one row (its row count) and several (the raising form)."""
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    sent = Sent(aengine)
    try:
        async with Sessions.begin() as session:
            (await session.get_one(model, 1)).body = "edited"
        assert [s for s in sent.sql if "FOR UPDATE" in s] == []
        async with Sessions() as session:
            docs = [await session.get_one(model, key) for key in (2, 3)]
            for doc in docs:
                doc.body = "edited"
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                await session.commit()
        assert (refused.value.pk, refused.value.to_state) == (3, "draft")
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
        sent.stop()
        await aengine.dispose()
    assert [(k, s) for k, _, s in stored(engine, model)] == [
        (1, "draft"),
        (2, "published"),
        (3, "published"),
    ]
