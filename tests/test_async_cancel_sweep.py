"""An async unit or drop-in block cancelled at every await point it passes, on both async
drivers, against the real server: whatever the point, the caller is never told less than what
happened. A unit that returned is committed; a cancellation raised unmarked left nothing
committed (resubmitting is safe); one marked saved-then-interrupted did commit (marked
commit-interrupted, either may be). Afterwards no connection is left checked out or in a
transaction, and no unit is left registered.

The cancellation lands after ``k`` turns of the event loop, for ``k`` = 0, 1, 2, ... until the
work finishes first: each turn is one await point further (a connection's set-up, BEGIN, the
INSERT, the SELECT, the COMMIT and its answer, the session's close), whichever the driver and
the code path make it. (The last turns are not all reached on every run: where one lands
depends on when the server answers; every outcome is checked.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, assert_pool_took_all_back
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb
from resilient_db._state import STATE
from resilient_db._unit import async_units, commit_interrupted, saved_then_interrupted

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("no_backoff")]

#: at most this many cancellation points per shape (a unit takes a few dozen turns)
MOST_TURNS = 400


class _Base(DeclarativeBase):
    pass


class Swept(_Base):
    __tablename__ = "swept"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _work(session: AsyncSession, key: int) -> int:
    session.add(Swept(id=key))
    await session.flush()
    await session.execute(sa.text("SELECT 1"))
    return key


def _shape(name: str, factory: Any) -> Callable[[int], Awaitable[int]]:
    """The same work as a unit, or as drop-in code of SQLAlchemy's asyncio documentation."""

    async def run(key: int) -> int:
        result: int = await factory.run(_work, key)
        return result

    async def begin(key: int) -> int:
        async with factory.begin() as session:
            return await _work(session, key)

    async def with_commit(key: int) -> int:
        async with factory() as session:
            done = await _work(session, key)
            await session.commit()
            return done

    async def with_begin(key: int) -> int:
        async with factory() as session:  # noqa: SIM117 (the documentation's two blocks)
            async with session.begin():
                return await _work(session, key)

    shapes: dict[str, Callable[[int], Awaitable[int]]] = {
        "run": run,
        "begin": begin,
        "with_commit": with_commit,
        "with_begin": with_begin,
    }
    return shapes[name]


@pytest.mark.parametrize("shape", ["run", "begin", "with_commit", "with_begin"])
@pytest.mark.parametrize("markers", [True, False], ids=["markers", "no-markers"])
async def test_a_cancellation_at_any_await_point_tells_the_caller_what_happened(
    pg_async_url: str, service: str, shape: str, markers: bool, caplog: pytest.LogCaptureFixture
) -> None:
    direct = create_async_engine(pg_async_url)
    engine = create_async_engine(pg_async_url)
    try:
        async with direct.begin() as conn:
            await conn.run_sync(_Base.metadata.create_all)
            if markers:
                await conn.run_sync(rdb.install_commit_markers)
        work = _shape(shape, rdb.AsyncResilientSession(engine, service=service))
        outcomes: dict[int, tuple[str, str | None]] = {}
        for turns in range(MOST_TURNS):
            # a connection in the pool: the sweep goes past the connect (a connection whose
            # set-up is cut off is dropped, and the next one would be cut off there again)
            async with engine.connect() as warm:
                await warm.execute(sa.text("SELECT 1"))
            task = asyncio.create_task(work(turns))
            for _ in range(turns):
                await asyncio.sleep(0)
            finished_first = task.done()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError as cancelled:
                mark = (
                    "commit-interrupted"
                    if commit_interrupted(cancelled)
                    else "saved"
                    if saved_then_interrupted(cancelled)
                    else None
                )
                outcomes[turns] = ("cancelled", mark)
            else:
                outcomes[turns] = ("returned", None)
            if finished_first:
                break
        assert outcomes[max(outcomes)] == ("returned", None), "the work never finished"
        async with direct.connect() as conn:
            # (a COMMIT cut off may still be running on the server: it is waited for)
            for _ in range(2000):
                busy = (
                    await conn.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND pid <> pg_backend_pid() AND backend_type = "
                            "'client backend' AND state <> 'idle'"
                        )
                    )
                ).scalar_one()
                if not busy:
                    break
                await asyncio.sleep(0.005)
            assert not busy, "a backend of the sweep is still busy"
            present = set((await conn.execute(sa.select(Swept.id))).scalars())
        wrong = {
            turns: (outcome, turns in present)
            for turns, outcome in outcomes.items()
            if (outcome in (("returned", None), ("cancelled", "saved"))) != (turns in present)
            and outcome != ("cancelled", "commit-interrupted")
        }
        assert not wrong, f"told otherwise than what happened: {wrong}"
        # (a cancellation at the await of a connection's reset as the COMMIT hands it back)
        assert_pool_took_all_back(engine.pool, caplog)
        assert not async_units
        assert not STATE.unit_sessions
    finally:
        await engine.dispose()
        await direct.dispose()
