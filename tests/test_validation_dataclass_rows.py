"""Response validation never reads an ORM row's fields itself: the check for iterators nested
in a result looks into plain dataclasses, not into mapped classes that are dataclasses too
(``MappedAsDataclass``), whose fields are the ORM's attributes. Reading them ran the ORM's
loaders: every deferred column and lazy relationship of the reachable graph loaded on each
validated unit, a ``lazy="raise"`` relationship the validator never reads failed the unit, and
``with_self_healing``'s check after the operation met ``DetachedInstanceError``. Real server,
statements counted on the engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    Session,
    mapped_column,
    relationship,
)

import resilient_db as rdb


class Base(MappedAsDataclass, DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "dc_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    bio: Mapped[str] = mapped_column(sa.Text, deferred=True, default="")
    books: Mapped[list[Book]] = relationship(back_populates="author", default_factory=list)
    shelf: Mapped[list[Shelf]] = relationship(lazy="raise", default_factory=list)


class Book(Base):
    __tablename__ = "dc_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("dc_authors.id"))
    title: Mapped[str]
    author: Mapped[Author | None] = relationship(back_populates="books", default=None)


class Shelf(Base):
    __tablename__ = "dc_shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("dc_authors.id"))


class AuthorOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with Session(eng) as session, session.begin():
        author = Author(id=1, name="ada", bio="a long text")
        session.add(author)
        session.flush()
        # (``author=``: before 2.1, SQLAlchemy's dataclass ``__init__`` sets the relationship's
        # default None, and the flush writes NULL over ``author_id``)
        session.add_all(
            [Book(id=i, author_id=1, title=f"b{i}", author=author) for i in range(1, 6)]
        )
        session.add(Shelf(id=1, author_id=1))
    rdb.install_commit_markers(eng)
    yield eng
    eng.dispose()


def _statements(engine: sa.Engine) -> list[str]:
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", note)
    return seen


def test_a_dataclass_orm_row_is_checked_without_loading_what_the_model_does_not_read(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, expire_on_commit=False)
    seen = _statements(engine)
    author = Sessions.run(lambda s: s.get(Author, 1), validate=AuthorOut)
    assert author.name == "ada"
    selects = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1, selects  # the row itself: no deferred column, no relationship


def test_a_lazy_raise_relationship_the_model_does_not_read_is_not_touched(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, expire_on_commit=False)
    author = Sessions.run(lambda s: s.get(Author, 1), validate=AuthorOut)
    assert author.id == 1


def test_with_self_healing_checks_a_committed_dataclass_row_after_its_session_closed(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, expire_on_commit=False)

    def rename() -> Author:
        with Sessions.begin() as session:
            found = session.get(Author, 1)
            assert found is not None
            found.name = "renamed"
            return found

    author = rdb.with_self_healing(rename, service=service, validate=AuthorOut)
    assert author.name == "renamed"
