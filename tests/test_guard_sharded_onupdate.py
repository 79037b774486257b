"""A guarded status column with an ``onupdate``, or set by a mapper ``before_update``
listener, in a session that picks its connection per row (``ShardedSession``:
``connection_callable``). There the flush's UPDATE was no compare-and-set (its connection not
known ahead): the rows were locked and checked first (now it is, on each row's shard). The README
listed what the ``onupdate`` (a SQL expression, a Python function, an illegal value) or the
listener writes there as judged by the database trigger only; the flush guard judges it as
the UPDATE is sent (the mapper's ``before_update`` has the UPDATE of such a row checked under
lock), trigger or not: an illegal move is refused at flush, a legal one written. These tests
hold that (the README now says so).

Real server, real sharded session (one shard here), no trigger installed, no mocks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb


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


def _back_to_draft(context: Any) -> str:
    return "draft"


class SqlDoc(Base):
    """An edit sends the document back to draft, computed by the server."""

    __tablename__ = "sql_docs"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate=sa.text("'draft'"))


class FnDoc(Base):
    """The same, by a Python function SQLAlchemy calls as it sends the UPDATE."""

    __tablename__ = "fn_docs"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate=_back_to_draft)


class ValueDoc(Base):
    """The same, by a value."""

    __tablename__ = "value_docs"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft", onupdate="draft")


Model = Any
SEEDED = [(1, "", "review"), (3, "", "published")]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        for model in (SqlDoc, FnDoc, ValueDoc):
            conn.execute(
                sa.insert(model), [{"id": 1, "status": "review"}, {"id": 3, "status": "published"}]
            )
    yield eng
    eng.dispose()


@pytest.fixture
def Sessions(engine: sa.Engine, service: str) -> Any:
    return rdb.ResilientSession(
        class_=ShardedSession,
        service=service,
        shards={"only": engine},
        shard_chooser=lambda mapper, instance, clause=None: "only",
        identity_chooser=lambda *args, **kw: ["only"],
        execute_chooser=lambda context: ["only"],
    )


def stored(engine: sa.Engine, model: Model) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(model.id, model.body, model.status).order_by(model.id))
        return [tuple(r) for r in rows]  # type: ignore[misc]


MODELS = [SqlDoc, FnDoc, ValueDoc]
IDS = ["sql", "function", "value"]


@pytest.mark.parametrize("model", MODELS, ids=IDS)
@pytest.mark.parametrize("expired", [False, True], ids=["loaded", "expired"])
def test_an_illegal_onupdate_is_refused_at_flush(
    engine: sa.Engine, Sessions: Any, model: Model, expired: bool
) -> None:
    """published -> draft by an edit: refused, nothing written (a status not loaded: read)."""
    with Sessions() as session:
        assert session.connection_callable is not None  # (per-row connections)
        doc = session.get_one(model, 3)
        if expired:
            session.expire(doc, ["status"])
        doc.body = "edited"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    err = refused.value
    assert (err.pk, err.from_state, err.to_state, err.via) == (3, "published", "draft", "flush")
    assert stored(engine, model) == SEEDED


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_several_rows_one_illegal_refuses_all(
    engine: sa.Engine, Sessions: Any, model: Model
) -> None:
    with Sessions() as session:
        for doc in [session.get_one(model, key) for key in (1, 3)]:
            doc.body = "edited"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    assert (refused.value.pk, refused.value.to_state) == (3, "draft")
    assert stored(engine, model) == SEEDED


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_a_legal_onupdate_is_written(engine: sa.Engine, Sessions: Any, model: Model) -> None:
    with Sessions.begin() as session:
        session.get_one(model, 1).body = "edited"
    assert stored(engine, model) == [(1, "edited", "draft"), (3, "", "published")]


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_a_row_with_no_net_change_writes_no_onupdate(
    engine: sa.Engine, Sessions: Any, model: Model
) -> None:
    with Sessions.begin() as session:
        doc = session.get_one(model, 3)
        doc.body = "edited"
        doc.body = ""  # set back: the flush sends no UPDATE of the row
        assert doc in session.dirty
    assert stored(engine, model) == SEEDED


class ListenedDoc(Base):
    """Sent back to draft by a mapper before_update listener of the application's."""

    __tablename__ = "listened_docs"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(20), default="draft")


@sa.event.listens_for(ListenedDoc, "before_update")
def _back_to_draft_on_edit(mapper: Any, connection: Any, target: ListenedDoc) -> None:
    target.status = "draft"


def test_a_status_a_listener_sets_during_the_flush_is_judged(
    engine: sa.Engine, Sessions: Any
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(ListenedDoc),
            [{"id": 1, "status": "review"}, {"id": 3, "status": "published"}],
        )
    with Sessions() as session:
        session.get_one(ListenedDoc, 3).body = "edited"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    assert (refused.value.pk, refused.value.to_state, refused.value.via) == (3, "draft", "flush")
    with Sessions.begin() as session:
        session.get_one(ListenedDoc, 1).body = "edited"
    assert stored(engine, ListenedDoc) == [(1, "edited", "draft"), (3, "", "published")]
