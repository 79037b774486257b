"""The status-transition guard under ``AsyncSession``, on both of SQLAlchemy's async drivers
(asyncpg and psycopg's ``AsyncConnection``): the sync twin's scenarios that could break with
MissingGreenlet (expired attributes, SELECTs inside flush, bulk UPDATE), the compare-and-set
carried by the flush's UPDATE (asyncpg reports no row count for an executemany: the guard locks
those rows instead), plus the trigger error mapping through the driver."""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, BYPASS_BY_HAND, MoveFirst
from sent import Sent
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError, StaleTransitionError
from resilient_db.transitions import (
    TransitionRules,
    allowed_transitions,
    bypass_transitions_async,
    install_transition_trigger,
    trigger_drift,
)
from resilient_db.transitions._bypass import GUARD_INFO_KEY
from resilient_db.transitions._dbmap import exception_from_db
from resilient_db.transitions._guards import install_guard
from resilient_db.transitions._report import transition_stats

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    """Every test that reaches the server runs on both async drivers."""
    return str(request.param)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    __transitions__ = TransitionRules(
        column="status",
        transitions={"queued": {"running", "dropped"}, "running": {"done", "crashed"}},
        initial={"queued"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(default="job")
    status: Mapped[str] = mapped_column(default="queued")


class Light(enum.Enum):
    red = "R"
    green = "G"
    amber = "A"


class Signal(Base):
    __tablename__ = "signals"
    __transitions__ = TransitionRules(
        column="light",
        transitions={
            Light.red: {Light.green},
            Light.green: {Light.amber},
            Light.amber: {Light.red},
        },
        initial={Light.red},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    light: Mapped[Light] = mapped_column(sa.Enum(Light, name="light"), default=Light.red)


class _S(Session):
    pass


install_guard(_S)


def _table(model: type[Any]) -> sa.Table:
    table = model.__table__
    assert isinstance(table, sa.Table)
    return table


@pytest_asyncio.fixture
async def engine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    async with eng.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.run_sync(install_transition_trigger, Job)
        await conn.run_sync(install_transition_trigger, Signal)
    yield eng
    await eng.dispose()


def _factory(engine: AsyncEngine, **config: Any) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(
        engine, sync_session_class=_S, info={GUARD_INFO_KEY: Config(**config)}
    )


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return _factory(engine)


async def _add_job(engine: AsyncEngine, status: str = "queued") -> int:
    """Insert a job in any state (setup: sets the trigger bypass by hand, unlogged)."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql(BYPASS_BY_HAND)
        table = _table(Job)
        result = await conn.execute(table.insert().values(status=status).returning(table.c.id))
        return int(result.scalar_one())


async def _db_status(engine: AsyncEngine, job_id: int) -> str:
    async with engine.connect() as conn:
        table = _table(Job)
        result = await conn.execute(sa.select(table.c.status).where(table.c.id == job_id))
        return str(result.scalar_one())


@pytest.fixture
def sync_engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


async def test_guarded_change_sends_no_select_before_its_update(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    job_id = await _add_job(engine)
    async with sessions() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        statements = Sent(engine)
        job.status = "running"
        await s.flush()
        statements.stop()
        [(update, many)] = statements.sent
        assert update.startswith("UPDATE jobs SET status=")
        assert re.search(r"WHERE jobs\.id = \S+ AND jobs\.status = \S+$", update), update
        assert not many
        await s.commit()
    assert await _db_status(engine, job_id) == "running"


async def test_move_landing_between_the_check_and_the_update_is_stale(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], sync_engine: sa.Engine
) -> None:
    job_id = await _add_job(engine, "running")
    before = transition_stats()["stale_transitions"]
    async with sessions() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        job.status = "done"
        with (
            MoveFirst(
                engine.sync_engine,
                sync_engine,
                "UPDATE jobs SET status = 'done' WHERE id = :id",
                id=job_id,
            ),
            pytest.raises(StaleTransitionError) as info,
        ):
            await s.flush()
        err = info.value
        assert (err.model, err.pk, err.column, err.via) == ("Job", job_id, "status", "flush")
        assert (err.from_state, err.to_state) == ("running", "done")
        assert "now holds 'done'" in err.reason
        assert isinstance(err, StaleDataError)
        await s.rollback()
    assert transition_stats()["stale_transitions"] == before + 1


async def test_many_row_flush_locks_the_rows_asyncpg_cannot_count(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], async_driver: str
) -> None:
    """asyncpg's executemany reports no row count, so a compare-and-set in it would go unchecked:
    the guard locks and checks rows that change together before their UPDATE (one SELECT per
    table, as before the compare-and-set moved into the UPDATE). psycopg's does: its UPDATE
    carries the compare-and-set, nothing is locked first."""
    ids = [await _add_job(engine) for _ in range(3)]
    async with sessions() as s:
        jobs = [await s.get(Job, i) for i in ids]
        for job in jobs:
            assert job is not None
            job.status = "running"
        statements = Sent(engine)
        await s.commit()
        statements.stop()
        locked = [q for q, _ in statements.sent if q.endswith("FOR UPDATE")]
        updates = [(q, many) for q, many in statements.sent if q.startswith("UPDATE")]
        assert len(updates) == 1
        assert updates[0][1]  # still one executemany
        if async_driver == "asyncpg":
            assert len(locked) == 1
            sent = [q for q, _ in statements.sent]
            assert sent.index(locked[0]) < sent.index(updates[0][0])  # locked before the UPDATE
        else:
            assert locked == []
            assert "AND jobs.status =" in updates[0][0]  # the compare-and-set
        for job in jobs:
            assert job is not None
            await s.refresh(job)  # loaded: 'running'
        async with engine.begin() as conn:  # then another transaction moves the second job
            await conn.execute(
                sa.update(_table(Job)).where(_table(Job).c.id == ids[1]).values(status="crashed")
            )
        for job in jobs:
            assert job is not None
            job.status = "done"
        with pytest.raises(StaleTransitionError) as info:
            await s.flush()
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (
            ids[1],
            "running",
            "done",
        )
        assert "now holds 'crashed'" in info.value.reason
        await s.rollback()
    assert [await _db_status(engine, i) for i in ids] == ["running", "crashed", "running"]


async def test_concurrent_workers_claim_every_job_exactly_once(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Tasks on their own connections race for the same rows: each job is claimed once (a
    second claim of a job is stale; without the compare-and-set it would commit too)."""
    ids = [await _add_job(engine) for _ in range(12)]
    claims: list[int] = []
    stale: list[int] = []

    async def worker() -> None:
        while True:
            async with sessions() as s:
                job = (
                    await s.scalars(
                        sa.select(Job).where(Job.status == "queued").order_by(Job.id).limit(1)
                    )
                ).first()
                if job is None:
                    return
                job_id = job.id
                job.status = "running"
                try:
                    await s.commit()
                except StaleTransitionError:
                    stale.append(job_id)
                    continue
                claims.append(job_id)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(4))), timeout=60)
    assert sorted(claims) == ids
    assert stale  # the workers did collide
    assert [await _db_status(engine, i) for i in ids] == ["running"] * len(ids)


async def test_illegal_flush_is_blocked_without_missing_greenlet(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    job_id = await _add_job(engine)
    async with sessions() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        assert allowed_transitions(job) == {"running", "dropped"}
        job.status = "done"
        with pytest.raises(IllegalTransitionError) as info:
            await s.flush()
        err = info.value
        assert (err.model, err.pk, err.column, err.via) == ("Job", job_id, "status", "flush")
        assert (err.from_state, err.to_state) == ("queued", "done")
        await s.rollback()
        job.status = "running"  # the session is usable after the rollback
        await s.commit()
    assert await _db_status(engine, job_id) == "running"


async def test_insert_must_use_initial_state(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as s:
        s.add(Job(id=9, status="running"))
        with pytest.raises(IllegalTransitionError) as info:
            await s.commit()
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (9, None, "running")


async def test_expired_attribute_without_lazy_load(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    job_id = await _add_job(engine)
    async with sessions() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        await s.commit()  # expire_on_commit: every attribute is expired now
        job.status = "running"  # the loaded value is unknown; no I/O allowed here
        await s.flush()
        await s.commit()
        job.status = "queued"  # expired again; illegal from the stored value
        with pytest.raises(IllegalTransitionError) as info:
            await s.flush()
        assert (info.value.from_state, info.value.to_state) == ("running", "queued")
        await s.rollback()
    assert await _db_status(engine, job_id) == "running"


async def test_race_loser_gets_stale(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    job_id = await _add_job(engine)
    async with sessions() as winner, sessions() as loser:
        mine = await loser.get(Job, job_id)
        theirs = await winner.get(Job, job_id)
        assert mine is not None
        assert theirs is not None
        theirs.status = "running"
        await winner.flush()  # holds the row lock
        mine.status = "dropped"
        flushing = asyncio.ensure_future(loser.flush())  # waits on the lock (or sees the commit)
        await winner.commit()
        with pytest.raises(StaleTransitionError) as info:
            await flushing
        assert (info.value.from_state, info.value.to_state, info.value.via) == (
            "queued",
            "dropped",
            "flush",
        )
        await loser.rollback()
    assert await _db_status(engine, job_id) == "running"


async def test_bulk_update_filter_and_raise(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    ids = {state: await _add_job(engine, state) for state in ("queued", "running", "done")}
    caplog.set_level(logging.WARNING, logger="resilient_db.transitions")
    async with _factory(engine)() as s:
        result = await s.execute(sa.update(Job).values(status="crashed"))
        assert isinstance(result, sa.CursorResult)
        assert result.rowcount == 1
        await s.commit()
    assert await _db_status(engine, ids["running"]) == "crashed"
    assert await _db_status(engine, ids["queued"]) == "queued"
    assert await _db_status(engine, ids["done"]) == "done"
    assert any("blocked for 2 row(s)" in r.getMessage() for r in caplog.records)
    async with _factory(engine, bulk_update="raise")() as s:
        with pytest.raises(IllegalTransitionError) as info:
            await s.execute(sa.update(Job).values(status="running"))
        assert info.value.via == "orm-update"
        await s.rollback()
        await s.execute(sa.update(Job).where(Job.id == ids["queued"]).values(status="running"))
        await s.commit()
    assert await _db_status(engine, ids["queued"]) == "running"


async def test_bulk_update_by_primary_key(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    a, b = await _add_job(engine), await _add_job(engine, "done")
    async with sessions() as s:
        await s.execute(
            sa.update(Job), [{"id": a, "status": "running"}, {"id": b, "status": "queued"}]
        )
        await s.commit()
    assert (await _db_status(engine, a), await _db_status(engine, b)) == ("running", "done")


async def test_trigger_error_mapped_through_the_driver(engine: AsyncEngine) -> None:
    job_id = await _add_job(engine, "done")
    async with engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError) as info:
            await conn.exec_driver_sql(f"UPDATE jobs SET status = 'queued' WHERE id = {job_id}")
        err = exception_from_db(info.value)
        assert err is not None
        assert (err.model, err.pk, err.column, err.via) == ("Job", job_id, "status", "db")
        assert (err.from_state, err.to_state) == ("done", "queued")
        await conn.rollback()
        with pytest.raises(sa.exc.DBAPIError) as info:
            await conn.execute(sa.insert(Signal).values(id=1, light=Light.amber))
        err = exception_from_db(info.value)
        assert err is not None
        assert (err.model, err.pk, err.from_state, err.to_state) == (
            "Signal",
            1,
            None,
            Light.amber,
        )
        await conn.rollback()
        assert await conn.run_sync(trigger_drift, Job) is None


async def test_enum_column_under_async(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as s:
        signal = Signal(id=1)
        s.add(signal)
        await s.commit()
        signal.light = Light.green
        await s.commit()
        signal.light = Light.red
        with pytest.raises(IllegalTransitionError) as info:
            await s.flush()
        assert (info.value.from_state, info.value.to_state) == (Light.green, Light.red)


async def test_bypass_under_async(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    job_id = await _add_job(engine, "done")
    async with sessions() as s:
        await bypass_transitions_async(s, reason="async repair")
        job = await s.get(Job, job_id)
        assert job is not None
        job.status = "queued"
        await s.commit()
        job.status = "done"
        with pytest.raises(IllegalTransitionError):
            await s.flush()
    async with engine.connect() as conn:
        await bypass_transitions_async(conn, reason="async migration")
        await conn.exec_driver_sql(f"UPDATE jobs SET status = 'crashed' WHERE id = {job_id}")
        await conn.commit()
    assert await _db_status(engine, job_id) == "crashed"
