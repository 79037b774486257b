"""A guarded status that is part of the primary key: another transaction that changes it
changes the row's key with it, so the flush's compare-and-set UPDATE (by the key the row was
loaded with) matches nothing and the row is not found by that key on the error path. The
StaleTransitionError said "the row no longer exists"; it now says that the row's status
changed since it was loaded, and what the row holds now (the rows with the rest of its key are
read, on the error path only: the success path sends the UPDATE alone, as before). A row
deleted meanwhile still reads "the row no longer exists".

Real server, real concurrent transactions (the other commits first); psycopg and asyncpg."""

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


RULES = {"draft": {"review"}, "review": {"published"}}


class Version(Base):
    __tablename__ = "versions"
    __transitions__ = rdb.TransitionRules(column="status", transitions=RULES, initial={"draft"})
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), primary_key=True)
    body: Mapped[str] = mapped_column(default="")


class Slot(Base):
    """The status is the whole key."""

    __tablename__ = "slots"
    __transitions__ = rdb.TransitionRules(column="status", transitions=RULES, initial={"draft"})
    status: Mapped[str] = mapped_column(sa.String(20), primary_key=True)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(
            sa.insert(Version), [{"id": 1, "status": "draft"}, {"id": 2, "status": "draft"}]
        )
        conn.execute(sa.insert(Slot), [{"status": "draft"}])
    yield eng
    eng.dispose()


def other(engine: sa.Engine, sql: str) -> None:
    """Another transaction, committed."""
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)


def stored(engine: sa.Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [
            tuple(r) for r in conn.exec_driver_sql("SELECT id, status FROM versions ORDER BY id")
        ]  # type: ignore[misc]


def test_a_status_in_the_key_changed_meanwhile(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        version = session.get_one(Version, (1, "draft"))
        other(engine, "UPDATE versions SET status = 'review' WHERE id = 1")
        version.status = "review"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    err = stale.value
    assert (err.pk, err.from_state, err.to_state, err.via) == (
        (1, "draft"),
        "draft",
        "review",
        "flush",
    )
    assert "no longer exists" not in err.reason
    assert "status changed since it was loaded ('draft' expected)" in err.reason
    assert "now holds 'review'" in err.reason
    assert stored(engine) == [(1, "review"), (2, "draft")]


def test_a_row_deleted_meanwhile(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        version = session.get_one(Version, (1, "draft"))
        other(engine, "DELETE FROM versions WHERE id = 1")
        version.status = "review"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    assert stale.value.reason == "the row no longer exists"


def test_the_status_is_the_whole_key(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        slot = session.get_one(Slot, "draft")
        other(engine, "UPDATE slots SET status = 'review'")
        slot.status = "review"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    assert stale.value.from_state == "draft"
    assert "no row holds 'draft' any longer" in stale.value.reason
    assert "whole primary key" in stale.value.reason


def test_several_rows_of_one_update(engine: sa.Engine, service: str) -> None:
    """Both rows' UPDATE changes their keys: which one the other transaction moved can't be
    told by key; the error says their status (part of the key) may have changed."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        versions = [session.get_one(Version, (k, "draft")) for k in (1, 2)]
        other(engine, "UPDATE versions SET status = 'review' WHERE id = 2")
        for version in versions:
            version.status = "review"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    assert "no longer exists" not in stale.value.reason
    assert "had their status (part of their key) changed" in stale.value.reason
    assert stored(engine) == [(1, "draft"), (2, "review")]


def test_the_success_path_sends_the_update_alone(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    sent = Sent(engine)
    try:
        with Sessions.begin() as session:
            session.get_one(Version, (1, "draft")).status = "review"
    finally:
        sent.stop()
    statements = sent.sql
    assert [s.split()[0] for s in statements] == ["SELECT", "UPDATE"], sent.sql
    assert stored(engine) == [(1, "review"), (2, "draft")]


@pytest.mark.asyncio
async def test_async(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
    try:
        Sessions = rdb.AsyncResilientSession(aengine, service=service)
        async with Sessions() as session:
            version = await session.get_one(Version, (1, "draft"))
            other(engine, "UPDATE versions SET status = 'review' WHERE id = 1")
            version.status = "review"
            with pytest.raises(rdb.StaleTransitionError) as stale:
                await session.commit()
    finally:
        await aengine.dispose()
    assert "now holds 'review'" in stale.value.reason
