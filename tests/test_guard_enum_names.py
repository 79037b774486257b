"""A SQLAlchemy ``Enum`` column takes a state by its member's name as well as by the member
(``task.status = "COMPLETED"``). The guards judge both alike, and their errors now report the
state so too: as the member, as they report the state the row was in and as the trigger's error
does. They reported the name as given, and the error and its 409 body said ``'p' ->
'COMPLETED'`` (one state by the member's value, the other by its name). Real server."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.web import problem_details


class Base(DeclarativeBase):
    pass


class St(enum.Enum):
    PENDING = "p"
    IN_PROGRESS = "ip"
    COMPLETED = "c"


class Job(Base):
    __tablename__ = "jobs"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={St.PENDING: {St.IN_PROGRESS}, St.IN_PROGRESS: {St.COMPLETED}},
        initial={St.PENDING},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[St] = mapped_column(sa.Enum(St), default=St.PENDING)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.insert(Job).values(id=1, status=St.PENDING))
    yield eng
    eng.dispose()


def refused(
    engine: sa.Engine, service: str, work: Callable[[Session], None]
) -> rdb.IllegalTransitionError:
    config = rdb.load_config(environ={}).replace(bulk_update="raise")
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    with Sessions() as session, pytest.raises(rdb.IllegalTransitionError) as info:
        _work_and_flush(session, work)
    return info.value


def _work_and_flush(session: Session, work: Callable[[Session], None]) -> None:
    work(session)
    session.flush()


def assert_reported_as_members(err: rdb.IllegalTransitionError, from_: St | None, to: St) -> None:
    assert (err.from_state, err.to_state) == (from_, to)
    body = problem_details(err).body
    assert (body["from_state"], body["to_state"]) == (
        None if from_ is None else from_.value,
        to.value,
    )
    assert "'COMPLETED'" not in str(err)
    assert "'IN_PROGRESS'" not in str(err)


def test_a_change_by_name_is_reported_as_the_member(engine: sa.Engine, service: str) -> None:
    def work(session: Session) -> None:
        session.get_one(Job, 1).status = "COMPLETED"  # type: ignore[assignment]

    err = refused(engine, service, work)
    assert err.via == "flush"
    assert_reported_as_members(err, St.PENDING, St.COMPLETED)


def test_a_new_row_by_name_is_reported_as_the_member(engine: sa.Engine, service: str) -> None:
    def work(session: Session) -> None:
        session.add(Job(id=2, status="IN_PROGRESS"))  # type: ignore[arg-type]

    err = refused(engine, service, work)
    assert err.inserted
    assert_reported_as_members(err, None, St.IN_PROGRESS)


def test_a_bulk_update_by_name_is_reported_as_the_member(engine: sa.Engine, service: str) -> None:
    def with_criteria(session: Session) -> None:
        session.execute(sa.update(Job).values(status="COMPLETED"))

    def by_primary_key(session: Session) -> None:
        session.execute(sa.update(Job), [{"id": 1, "status": "COMPLETED"}])

    for work in (with_criteria, by_primary_key):
        err = refused(engine, service, work)
        assert err.via == "orm-update"
        assert_reported_as_members(err, St.PENDING, St.COMPLETED)


def test_a_stale_change_by_name_is_reported_as_the_member(engine: sa.Engine, service: str) -> None:
    def work(session: Session) -> None:
        job = session.get_one(Job, 1)
        with engine.begin() as conn:  # another transaction moves the row meanwhile
            conn.execute(sa.update(Job).values(status=St.IN_PROGRESS))
        job.status = "IN_PROGRESS"  # type: ignore[assignment]

    err = refused(engine, service, work)
    assert isinstance(err, rdb.StaleTransitionError)
    assert (err.from_state, err.to_state) == (St.PENDING, St.IN_PROGRESS)
