"""A ``reload_config()`` arriving while a unit's attempt runs reaches the next attempt, never
half of this one: the status-transition guard judges an attempt's bulk UPDATEs and its flushes
under one configuration.

The flush guard and the bulk guard each read the factory's configuration as it was when they
ran, so a reload switching ``SELF_HEALING_STATUS_VALIDATION`` (or the kill switch) between them
left one attempt half guarded: its bulk UPDATE filtered and its flush let through (an illegal
move committed by a unit that had just been refused one), or the other way round. Found with
threads running units while another reloaded in a loop; here the reload is made from inside
the unit, between the two statements. Real server; psycopg and asyncpg."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "reload_jobs"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


ON = {"SELF_HEALING_STATUS_VALIDATION": "true"}
OFF = {"SELF_HEALING_STATUS_VALIDATION": "false"}
KILLED = {"SELF_HEALING_ENABLED": "false"}

#: (the configuration the attempt starts under, the one a reload applies midway, whether its
#: guard is on): the whole attempt runs under the first
CASES = [(ON, OFF, True), (OFF, ON, False), (ON, KILLED, True)]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(
            sa.insert(Job), [{"id": 1, "status": "pending"}, {"id": 2, "status": "pending"}]
        )
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def async_engine(pg_async_url: str, engine: sa.Engine) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    yield eng
    await eng.dispose()


def stored(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT status FROM reload_jobs ORDER BY id")))


def check(raised: BaseException | None, bulk_rows: list[int], guard_on: bool) -> None:
    """Both guards of the attempt judged as the configuration it started under says."""
    if guard_on:
        assert bulk_rows == [0]  # filtered: pending -> done is no move of the rules
        assert isinstance(raised, rdb.IllegalTransitionError)
    else:
        assert bulk_rows == [1]
        assert raised is None


@pytest.mark.parametrize(("before", "midway", "guard_on"), CASES)
def test_a_reload_midway_reaches_no_half_of_a_sync_attempt(
    *,
    engine: sa.Engine,
    clean_env: pytest.MonkeyPatch,
    before: dict[str, str],
    midway: dict[str, str],
    guard_on: bool,
) -> None:
    rdb.reload_config(before)
    Factory = rdb.ResilientSession(engine, service="reload-mid-unit")
    bulk_rows: list[int] = []

    def unit(session: Session) -> None:
        moved = session.execute(sa.update(Job).where(Job.id == 1).values(status="done"))
        bulk_rows.append(moved.rowcount)
        rdb.reload_config(midway)  # an operator's reload, between the two statements
        job = session.get(Job, 2)
        assert job is not None
        job.status = "done"
        session.flush()

    raised: BaseException | None = None
    try:
        Factory.run(unit)
    except rdb.IllegalTransitionError as exc:
        raised = exc
    check(raised, bulk_rows, guard_on)
    assert stored(engine) == (["pending", "pending"] if guard_on else ["done", "done"])
    assert Factory.config == rdb.load_config(midway)  # the reload applied all the same


@pytest.mark.asyncio
@pytest.mark.parametrize(("before", "midway", "guard_on"), CASES)
async def test_a_reload_midway_reaches_no_half_of_an_async_attempt(
    *,
    engine: sa.Engine,
    async_engine: AsyncEngine,
    clean_env: pytest.MonkeyPatch,
    before: dict[str, str],
    midway: dict[str, str],
    guard_on: bool,
) -> None:
    rdb.reload_config(before)
    Factory = rdb.AsyncResilientSession(async_engine, service="reload-mid-unit-async")
    bulk_rows: list[int] = []

    async def unit(session: AsyncSession) -> None:
        moved = await session.execute(sa.update(Job).where(Job.id == 1).values(status="done"))
        bulk_rows.append(moved.rowcount)  # type: ignore[attr-defined]
        rdb.reload_config(midway)
        job = await session.get(Job, 2)
        assert job is not None
        job.status = "done"
        await session.flush()

    raised: BaseException | None = None
    try:
        await Factory.run(unit)
    except rdb.IllegalTransitionError as exc:
        raised = exc
    check(raised, bulk_rows, guard_on)
    assert stored(engine) == (["pending", "pending"] if guard_on else ["done", "done"])
    assert Factory.config == rdb.load_config(midway)


def test_the_next_attempt_takes_the_reload(
    *, engine: sa.Engine, clean_env: pytest.MonkeyPatch, no_backoff: None
) -> None:
    """A reload switching the guard off during an attempt that then fails transiently: its
    replay runs under the new configuration (the guard off for both statements)."""
    rdb.reload_config(ON)
    Factory = rdb.ResilientSession(engine, service="reload-mid-unit-retry")
    bulk_rows: list[int] = []

    def unit(session: Session) -> None:
        moved = session.execute(sa.update(Job).where(Job.id == 1).values(status="done"))
        bulk_rows.append(moved.rowcount)
        if len(bulk_rows) == 1:
            rdb.reload_config(OFF)
            session.execute(sa.text("SELECT serialization_failure()"))
        job = session.get(Job, 2)
        assert job is not None
        job.status = "done"
        session.flush()

    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION serialization_failure() RETURNS void LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END $$"
        )
    Factory.run(unit)
    assert bulk_rows == [0, 1]
    assert stored(engine) == ["done", "done"]
