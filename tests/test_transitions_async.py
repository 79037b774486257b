"""The status-transition guard under ``AsyncSession``, on both of SQLAlchemy's async drivers
(asyncpg and psycopg's ``AsyncConnection``): the sync twin's scenarios that could break with
MissingGreenlet (expired attributes, SELECTs inside flush, bulk UPDATE), the compare-and-set
carried by the flush's UPDATE (asyncpg reports no row count for an executemany: there the UPDATE
makes the server raise for a row that moved), plus the trigger error mapping through the driver."""

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
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from resilient_db._classify import sqlstate_of
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


class Odd(Base):
    """A model with a column keyed like the parameter the raising compare-and-set adds."""

    __tablename__ = "odds"
    __transitions__ = TransitionRules(
        column="status", transitions={"queued": {"running", "dropped"}}, initial={"queued"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    rdb_row: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(default="queued")


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


async def _added_ids(sessions: async_sessionmaker[AsyncSession], rows: list[Any]) -> list[int]:
    """Add ``rows`` (new objects of a guarded model, in an initial state) and commit; their ids."""
    async with sessions() as s:
        s.add_all(rows)
        await s.flush()
        ids = [int(row.id) for row in rows]
        await s.commit()
    return ids


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


async def test_many_row_flush_carries_the_compare_and_set_on_both_drivers(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], async_driver: str
) -> None:
    """Nothing is locked or read before a many-row UPDATE, on either driver. psycopg counts
    an executemany's rows, so its UPDATE carries ``AND status = :expected``; asyncpg reports no
    row count for one, so its UPDATE carries a condition that makes the server raise for a row
    that moved, and the error names that row and what it holds."""
    ids = [await _add_job(engine) for _ in range(3)]
    async with sessions() as s:
        jobs = [await s.get(Job, i) for i in ids]
        for job in jobs:
            assert job is not None
            job.status = "running"
        statements = Sent(engine)
        await s.commit()
        statements.stop()
        assert not [q for q in statements.sql if "FOR UPDATE" in q or q.startswith("SELECT")]
        updates = [(q, many) for q, many in statements.sent if q.startswith("UPDATE")]
        assert len(updates) == 1
        assert updates[0][1]  # one executemany
        if async_driver == "asyncpg":
            assert "rdb-stale:" in updates[0][0]
        else:
            assert "AND jobs.status =" in updates[0][0]
            assert "rdb-stale:" not in updates[0][0]
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
        before = transition_stats()["stale_transitions"]
        with pytest.raises(StaleTransitionError) as info:
            await s.flush()
        assert transition_stats()["stale_transitions"] == before + 1
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (
            ids[1],
            "running",
            "done",
        )
        assert "now holds 'crashed'" in info.value.reason
        assert isinstance(info.value, StaleDataError)
        await s.rollback()
    assert [await _db_status(engine, i) for i in ids] == ["running", "crashed", "running"]


async def test_many_row_flush_names_a_row_already_moved_where_it_was_going(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], async_driver: str
) -> None:
    """A row another transaction moved to the very state this flush writes is stale too (the
    move was decided on a state it no longer holds). asyncpg's raising condition names it;
    psycopg's row count says how many such rows there were, and the row's ``xmin`` which
    (tests/test_guard_stale_rows.py)."""
    ids = [await _add_job(engine, "running") for _ in range(4)]
    async with sessions() as s:
        jobs = [await s.get(Job, i) for i in ids]
        async with engine.begin() as conn:
            await conn.execute(
                sa.update(_table(Job)).where(_table(Job).c.id == ids[2]).values(status="done")
            )
        for job in jobs:
            assert job is not None
            job.status = "done"
        with pytest.raises(StaleTransitionError) as info:
            await s.flush()
        assert info.value.pk == ids[2]
        if async_driver == "asyncpg":
            assert "now holds 'done'" in info.value.reason
        else:
            assert "had already moved the row to 'done'" in info.value.reason
        await s.rollback()
    assert [await _db_status(engine, i) for i in ids] == ["running", "running", "done", "running"]


async def test_many_row_flush_of_an_enum_column_names_the_state_as_the_model_holds_it(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    ids = await _added_ids(sessions, [Signal(light=Light.red) for _ in range(3)])
    async with sessions() as s:
        found = [await s.get(Signal, i) for i in ids]
        signals = [sig for sig in found if sig is not None]
        async with engine.begin() as conn:
            await conn.exec_driver_sql(BYPASS_BY_HAND)
            await conn.execute(
                sa.update(_table(Signal))
                .where(_table(Signal).c.id == ids[0])
                .values(light=Light.amber)
            )
        for sig in signals:
            sig.light = Light.green
        with pytest.raises(StaleTransitionError) as info:
            await s.flush()
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (
            ids[0],
            Light.red,
            Light.green,
        )
        assert "now holds 'A'" in info.value.reason  # as the psycopg path reads it: Light.amber
        await s.rollback()


@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
async def test_many_row_flush_never_tests_rows_it_does_not_update(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], plan: str
) -> None:
    """The raising condition makes no error for rows that hold what they should, however the
    server plans the UPDATE: a sequential scan meets rows in other states (the CASE rules them
    out; PostgreSQL also happens to test the cheaper `id = $n` first, so this can't show the CASE
    is needed), and plans made with the parameters' values compute constant parts ahead (a cast
    of text built from parameters alone would fail every UPDATE here)."""
    others = [await _add_job(engine, state) for state in ("running", "crashed", "done") * 3]
    # a loop, not a comprehension around one that awaits (Python 3.11+; a SyntaxError on 3.10)
    rounds: list[list[int]] = []
    for _ in range(4):
        rounds.append([await _add_job(engine) for _ in range(3)])
    async with sessions() as s:
        await s.execute(sa.text("SET LOCAL enable_indexscan = off"))
        await s.execute(sa.text("SET LOCAL enable_bitmapscan = off"))
        await s.execute(sa.text(f"SET LOCAL plan_cache_mode = {plan}"))
        # 12 executions of the one UPDATE: past the server's five custom plans
        for ids in rounds:
            jobs = [await s.get(Job, i) for i in ids]
            for job in jobs:
                assert job is not None
                job.status = "running"
            await s.flush()
        await s.commit()
    assert [await _db_status(engine, i) for ids in rounds for i in ids] == ["running"] * 12
    assert [await _db_status(engine, i) for i in others] == ["running", "crashed", "done"] * 3


async def test_a_stale_many_row_flush_in_a_savepoint_leaves_the_transaction_usable(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """On asyncpg the stale row's error aborts the server's transaction (the raising
    condition): inside a savepoint that is the savepoint's alone, as with psycopg's row count.
    The unit goes on and commits the rest."""
    ids = [await _add_job(engine) for _ in range(3)]
    kept = await _add_job(engine)
    async with sessions() as s:
        jobs = [await s.get(Job, i) for i in ids]
        other = await s.get(Job, kept)
        assert other is not None
        async with engine.begin() as conn:  # another transaction moves the third job
            await conn.execute(
                sa.update(_table(Job)).where(_table(Job).c.id == ids[2]).values(status="dropped")
            )
        savepoint = await s.begin_nested()
        for job in jobs:
            assert job is not None
            job.status = "running"
        with pytest.raises(StaleTransitionError) as info:
            await s.flush()
        await savepoint.rollback()
        assert info.value.pk == ids[2]
        other.status = "running"
        await s.commit()
    assert [await _db_status(engine, i) for i in ids] == ["queued", "queued", "dropped"]
    assert await _db_status(engine, kept) == "running"


async def test_a_column_named_like_the_guards_parameter_falls_back_to_a_locked_check(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], async_driver: str
) -> None:
    ids = await _added_ids(sessions, [Odd(), Odd(), Odd()])
    async with sessions() as s:
        odds = [await s.get(Odd, i) for i in ids]
        async with engine.begin() as conn:  # another transaction moves the second
            await conn.execute(sa.update(Odd).where(Odd.id == ids[1]).values(status="dropped"))
        for odd in odds:
            assert odd is not None
            odd.status = "running"
            odd.rdb_row = 7
        statements = Sent(engine)
        with pytest.raises(StaleTransitionError) as info:
            await s.flush()
        statements.stop()
        assert not [q for q in statements.sql if "rdb-stale:" in q]
        if async_driver == "asyncpg":
            assert [q for q in statements.sql if q.endswith("FOR UPDATE")]
        assert info.value.pk == ids[1]
        assert "now holds 'dropped'" in info.value.reason
        await s.rollback()


async def test_an_error_of_the_same_sqlstate_from_elsewhere_is_raised_as_it_is(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The raising condition's error is recognised by what its message carries, not by its
    SQLSTATE alone: a trigger of yours raising 22P02 in a many-row flush reaches you as it is."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.name = 'bad' THEN RAISE EXCEPTION 'bad name' USING ERRCODE = '22P02'; "
            "END IF; RETURN NEW; END $$"
        )
        await conn.exec_driver_sql(
            "CREATE TRIGGER refuse_bad BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION "
            "refuse_bad()"
        )
    ids = [await _add_job(engine) for _ in range(3)]
    async with sessions() as s:
        jobs = [await s.get(Job, i) for i in ids]
        for job, name in zip(jobs, ("fine", "bad", "fine"), strict=True):
            assert job is not None
            job.status = "running"
            job.name = name
        statements = Sent(engine)
        with pytest.raises(sa.exc.DBAPIError) as info:
            await s.flush()
        statements.stop()
        assert [many for q, many in statements.sent if q.startswith("UPDATE")] == [True]
        assert not isinstance(info.value, StaleTransitionError)
        assert sqlstate_of(info.value) == "22P02"
        assert "bad name" in str(info.value)
        await s.rollback()
    assert [await _db_status(engine, i) for i in ids] == ["queued"] * 3


async def test_many_row_flush_waiting_on_a_row_that_moves_meanwhile_is_stale(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """A many-row UPDATE that waits for another transaction's lock on one of its rows sees the
    state that transaction committed (the server checks the row again) and names that row."""
    ids = [await _add_job(engine) for _ in range(3)]
    async with sessions() as winner, sessions() as loser:
        mine = [await loser.get(Job, i) for i in ids]
        theirs = await winner.get(Job, ids[1])
        assert theirs is not None
        theirs.status = "dropped"
        await winner.flush()  # holds the second row's lock
        for job in mine:
            assert job is not None
            job.status = "running"
        flushing = asyncio.ensure_future(loser.flush())  # waits on that lock
        await winner.commit()
        with pytest.raises(StaleTransitionError) as info:
            await flushing
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (
            ids[1],
            "queued",
            "running",
        )
        assert "now holds 'dropped'" in info.value.reason
        await loser.rollback()
    assert [await _db_status(engine, i) for i in ids] == ["queued", "dropped", "queued"]


async def test_concurrent_workers_claim_every_job_exactly_once(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Tasks on their own connections race for the same rows: each job is claimed once (a
    second claim of a job is stale; without the compare-and-set it would commit too)."""
    ids = [await _add_job(engine) for _ in range(12)]
    claims: list[int] = []
    stale: list[int] = []
    # the first round collides for sure: every worker has read the first job before any
    # claims it (left to timing, a busy machine could let them take turns)
    read_first: list[int] = []
    all_read = asyncio.Event()

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
                if not all_read.is_set():
                    read_first.append(job_id)
                    if len(read_first) == 4:
                        all_read.set()
                    await asyncio.wait_for(all_read.wait(), timeout=30)
                job.status = "running"
                try:
                    await s.commit()
                except StaleTransitionError:
                    stale.append(job_id)
                    continue
                claims.append(job_id)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(4))), timeout=60)
    assert sorted(claims) == ids
    assert set(read_first) == {ids[0]}
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


async def test_status_set_by_a_listener_during_the_flush_is_judged(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The async twin: a before_update listener that sets the status during the flush, for a
    row with a judged change (from its loaded state) and for one with none (from the state it
    holds, read under lock): nothing illegal is sent, a legal move is written."""
    a, b, c = await _add_job(engine), await _add_job(engine), await _add_job(engine, "running")

    def finish(mapper: Any, connection: Any, target: Job) -> None:
        if target.name == "finish":
            target.status = "done"

    event.listen(Job, "before_update", finish)
    try:
        for job_id, judged in ((a, "running"), (b, None)):
            async with sessions() as s:
                job = await s.get(Job, job_id)
                assert job is not None
                job.name = "finish"
                if judged is not None:
                    job.status = judged
                with pytest.raises(IllegalTransitionError) as info:
                    await s.flush()
                assert (info.value.pk, info.value.from_state, info.value.to_state) == (
                    job_id,
                    "queued",
                    "done",
                )
        async with sessions() as s:  # running -> done is legal: written
            job = await s.get(Job, c)
            assert job is not None
            job.name = "finish"
            await s.commit()
    finally:
        event.remove(Job, "before_update", finish)
    assert [await _db_status(engine, i) for i in (a, b, c)] == ["queued", "queued", "done"]


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


async def test_bulk_update_of_an_alias_and_by_primary_key_through_values(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """``update(aliased(Job))`` is judged on the alias, and a bulk UPDATE by primary key whose
    state comes from ``values()`` per row: the illegal moves are left out (filter mode) before
    the trigger would see them, the legal ones written."""
    done, queued = await _add_job(engine, "done"), await _add_job(engine)
    alias = aliased(Job)
    no_sync = {"synchronize_session": False}
    async with sessions() as s:
        stmt = sa.update(alias).where(alias.id == done).values(status="queued")
        result = await s.execute(stmt, execution_options=no_sync)
        assert result.rowcount == 0  # type: ignore[attr-defined]
        stmt = sa.update(alias).where(alias.id == queued).values({alias.status: "running"})
        result = await s.execute(stmt, execution_options=no_sync)
        assert result.rowcount == 1  # type: ignore[attr-defined]
        await s.execute(
            sa.update(Job).values(status=sa.bindparam("s")),
            [{"id": done, "s": "queued"}, {"id": queued, "s": "crashed"}],
        )
        await s.commit()
    assert (await _db_status(engine, done), await _db_status(engine, queued)) == ("done", "crashed")


async def test_a_status_set_by_a_later_before_flush_listener_is_judged_at_the_flush(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """An application's ``before_flush`` listener added after the guard's sets the status of
    a job the unit left alone: the flush judges it from the state the row holds (under lock,
    without MissingGreenlet), before the trigger would."""
    done, running = await _add_job(engine, "done"), await _add_job(engine, "running")
    target: dict[str, int] = {}

    def requeue(session: Session, context: Any, instances: Any) -> None:
        if "id" in target:
            job = session.get(Job, target.pop("id"))
            assert job is not None
            job.status = "crashed" if job.status == "running" else "queued"

    event.listen(_S, "before_flush", requeue)
    try:
        async with sessions() as s:
            target["id"] = done
            s.add(Job(name="other"))
            with pytest.raises(IllegalTransitionError) as info:
                await s.flush()
            assert (info.value.pk, info.value.from_state, info.value.via) == (done, "done", "flush")
        async with sessions() as s:  # running -> crashed: legal
            target["id"] = running
            s.add(Job(name="other"))
            await s.commit()
    finally:
        event.remove(_S, "before_flush", requeue)
    assert (await _db_status(engine, done), await _db_status(engine, running)) == (
        "done",
        "crashed",
    )
