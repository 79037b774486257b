"""The "Commit outcome unknown" line of a COMMIT that carried no marker says where it was sent
from: a unit begun while self-healing was off (``SELF_HEALING_ENABLED=false``) and switched on
by ``reload_config()`` before its COMMIT is a unit, not drop-in use; its COMMIT was not marked
(the unit began without the protocol), so its outcome can't be verified."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy

NOTES = sa.table("lost_notes", sa.column("name", sa.Text))


@pytest.fixture
def notes(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS lost_notes (name text)"))


@pytest.fixture
def proxied(notes: None, pg_database: str, fault_proxy: FaultProxy) -> Iterator[sa.Engine]:
    through_proxy = sa.create_engine(fault_proxy.url(pg_database))
    yield through_proxy
    through_proxy.dispose()


@pytest.fixture
def switched_off(clean_env: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Self-healing off by the environment, as reloaded; the environment's configuration is
    back afterwards."""
    clean_env.setenv("SELF_HEALING_ENABLED", "false")
    rdb.reload_config()
    yield clean_env
    clean_env.undo()
    rdb.reload_config()


def unknown_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Commit outcome unknown" in r.getMessage()]


def test_a_unit_begun_with_self_healing_off_is_not_called_drop_in_use(
    engine: sa.Engine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    assert not Sessions.config.enabled
    Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
    name = f"lost-{uuid.uuid4()}"
    runs: list[int] = []

    def switched_on_then_add(session: Session) -> None:
        runs.append(1)
        # a reload while the unit runs, before its first statement: its connection is checked
        # out, its INSERT and its COMMIT sent, with self-healing on
        switched_off.setenv("SELF_HEALING_ENABLED", "true")
        rdb.reload_config()
        session.execute(sa.insert(NOTES).values(name=name))
        fault_proxy.lose_commit_answer()

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError),
    ):
        Sessions.run(switched_on_then_add)
    assert Sessions.config.enabled
    assert fault_proxy.commits_lost == 1
    assert runs == [1]  # not replayed: it began with self-healing off
    (line,) = unknown_lines(caplog)
    assert "drop-in" not in line
    assert "outside a unit" not in line
    assert "a unit begun with self-healing off" in line
    assert "not marked" in line
    with engine.connect() as conn:  # (it did commit: what the line tells to check)
        assert conn.scalar(sa.select(sa.func.count()).where(NOTES.c.name == name)) == 1


@pytest.mark.asyncio
@pytest.mark.usefixtures("notes")
async def test_an_async_unit_begun_with_self_healing_off_is_not_called_drop_in_use(
    engine: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    pg_database: str,
    async_driver: str,
    made_async_engines: list[AsyncEngine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    through_proxy = create_async_engine(fault_proxy.url(pg_database, driver=async_driver))
    made_async_engines.append(through_proxy)
    Sessions = rdb.AsyncResilientSession(through_proxy, service=service)
    assert not Sessions.config.enabled
    name = f"lost-{uuid.uuid4()}"

    async def connected(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT 1"))

    async def switched_on_then_add(session: AsyncSession) -> None:
        switched_off.setenv("SELF_HEALING_ENABLED", "true")
        rdb.reload_config()  # (as in the sync test)
        await session.execute(sa.insert(NOTES).values(name=name))
        fault_proxy.lose_commit_answer()

    await Sessions.run(connected)
    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError),
    ):
        await Sessions.run(switched_on_then_add)
    assert fault_proxy.commits_lost == 1
    (line,) = unknown_lines(caplog)
    assert "drop-in" not in line
    assert "a unit begun with self-healing off" in line
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(NOTES.c.name == name)) == 1


def test_drop_in_use_is_still_called_drop_in_use(
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    with Sessions() as session:
        session.execute(sa.text("SELECT 1"))
        session.commit()  # connected
        session.execute(sa.insert(NOTES).values(name=f"lost-{uuid.uuid4()}"))
        fault_proxy.lose_commit_answer()
        with (
            caplog.at_level(logging.WARNING, logger="resilient_db"),
            pytest.raises(sa.exc.OperationalError),
        ):
            session.commit()
    (line,) = unknown_lines(caplog)
    assert "a COMMIT sent outside a unit (drop-in use)" in line
