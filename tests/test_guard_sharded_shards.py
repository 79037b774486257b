"""The flush guard in a horizontally sharded session of two shards (two databases on the test
server). Such a session picks each row's connection by the row (``connection_callable``); the
flush guard locked and read the rows it judges before their UPDATE, through the
connection of the mapper's shard chosen without the row (``shard_chooser(mapper, None)``),
which is another shard for half of them: a legal move of a row there was refused as stale
(the row was not found), and a move of a row whose status was not loaded was judged by what
another shard holds under the same key. Each row is now read (when its status was not loaded)
and compare-and-set on its own shard.
Real server, real ``ShardedSession``, no trigger, no mocks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "shard_docs"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"draft": {"review"}, "review": {"published"}, "published": {"archived"}},
        initial={"draft"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))


def _shard_of(doc_id: int) -> str:
    return "even" if doc_id % 2 == 0 else "odd"


@pytest.fixture
def shards(pg_server: PostgresServer, pg_database: str) -> Iterator[dict[str, sa.Engine]]:
    """Odd ids in the test's database, even ids in a second one; each shard also holds a row
    of the other parity's key 4 in another state (so a read on the wrong shard finds a row)."""
    second = f"t_shards_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(second)
    engines = {
        "odd": sa.create_engine(pg_server.url(pg_database)),
        "even": sa.create_engine(pg_server.url(second)),
    }
    seeds = {
        "odd": [(1, "review"), (3, "published"), (4, "draft")],
        "even": [(2, "review"), (4, "published")],
    }
    try:
        for name, engine in engines.items():
            Base.metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(sa.insert(Doc), [{"id": i, "status": s} for i, s in seeds[name]])
        yield engines
    finally:
        for engine in engines.values():
            engine.dispose()
        pg_server.drop_database(second)


def _chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
    # the row's shard; without a row (a statement), the odd one (as an application's default)
    return "odd" if instance is None else _shard_of(instance.id)


def _identity_chooser(mapper: Any, primary_key: Any, **kw: Any) -> list[str]:
    return [_shard_of(primary_key[0])]


@pytest.fixture
def Sessions(shards: dict[str, sa.Engine], service: str) -> Any:
    return rdb.ResilientSession(
        class_=ShardedSession,
        service=service,
        shards=shards,
        shard_chooser=_chooser,
        identity_chooser=_identity_chooser,
        execute_chooser=lambda context: ["odd", "even"],
    )


def stored(shards: dict[str, sa.Engine]) -> dict[str, dict[int, str]]:
    found: dict[str, dict[int, str]] = {}
    for name, engine in shards.items():
        with engine.connect() as conn:
            found[name] = dict(conn.execute(sa.select(Doc.id, Doc.status).order_by(Doc.id)).all())  # type: ignore[arg-type]
    return found


SEEDED = {"odd": {1: "review", 3: "published", 4: "draft"}, "even": {2: "review", 4: "published"}}


def test_a_legal_move_of_a_row_on_the_other_shard_is_written(
    shards: dict[str, sa.Engine], Sessions: Any
) -> None:
    with Sessions.begin() as session:
        session.get_one(Doc, 2).status = "published"
    assert stored(shards)["even"] == {2: "published", 4: "published"}


def test_one_flush_of_rows_on_both_shards(shards: dict[str, sa.Engine], Sessions: Any) -> None:
    with Sessions.begin() as session:
        session.get_one(Doc, 1).status = "published"
        session.get_one(Doc, 2).status = "published"
    assert stored(shards) == {
        "odd": {1: "published", 3: "published", 4: "draft"},
        "even": {2: "published", 4: "published"},
    }


@pytest.mark.parametrize("several", [False, True], ids=["one-row", "several-rows"])
def test_a_status_not_loaded_is_judged_by_its_own_shard_s_row(
    shards: dict[str, sa.Engine], Sessions: Any, several: bool
) -> None:
    """Row 4 of the even shard is published (draft on the odd one): archived is legal, review
    is not."""
    with Sessions.begin() as session:
        if several:
            session.get_one(Doc, 1).status = "published"
        doc = session.get_one(Doc, 4, identity_token="even")
        session.expire(doc, ["status"])
        doc.status = "archived"
    assert stored(shards)["even"][4] == "archived"
    with Sessions() as session:
        if several:
            session.get_one(Doc, 3).status = "archived"
        doc = session.get_one(Doc, 4, identity_token="even")  # (an autoflush: nothing judged)
        session.expire(doc, ["status"])
        doc.status = "review"
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            session.commit()
    err = refused.value
    assert (err.pk, err.from_state, err.to_state, err.via) == (4, "archived", "review", "flush")
    assert (stored(shards)["odd"][3], stored(shards)["even"][4]) == ("published", "archived")


def test_a_row_moved_on_its_shard_meanwhile_is_stale(
    shards: dict[str, sa.Engine], Sessions: Any
) -> None:
    with Sessions() as session:
        doc = session.get_one(Doc, 2)  # review
        with shards["even"].begin() as conn:
            conn.execute(sa.update(Doc).where(Doc.id == 2).values(status="published"))
        doc.status = "published"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.commit()
    assert (stale.value.pk, stale.value.from_state) == (2, "review")
