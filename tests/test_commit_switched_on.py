"""Connections made while self-healing was off (``SELF_HEALING_ENABLED=false``) are the driver's
own, unmarked; a reload that switches self-healing on (``reload_config()``) must leave no
COMMIT after it unmarked. A connection in use at the switch (a unit begun while off, a drop-in
transaction) commits through the marked class from then on: a lost COMMIT answer of one that
may have written is an unknown outcome (500 on the web, counted, said), never a transient
disconnect (a 503 inviting the client to write again). A later unit on such a pooled connection
has its COMMIT marked and verified. Real server, real lost answers (the fault proxy), psycopg
and both async drivers."""

from __future__ import annotations

import gc
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy
from resilient_db.web import problem_details

pytestmark = pytest.mark.usefixtures("no_backoff")

NOTES = sa.table("switched_notes", sa.column("name", sa.Text))


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def notes(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS switched_notes (name text)"))
    rdb.install_commit_markers(engine)


@pytest.fixture
def proxied(notes: None, pg_database: str, fault_proxy: FaultProxy) -> Iterator[sa.Engine]:
    """One pooled connection through the fault proxy: a later unit gets the same one."""
    through_proxy = sa.create_engine(fault_proxy.url(pg_database), pool_size=1, max_overflow=0)
    yield through_proxy
    through_proxy.dispose()


@pytest.fixture
def async_proxied(
    notes: None,
    pg_database: str,
    fault_proxy: FaultProxy,
    async_driver: str,
    made_async_engines: list[AsyncEngine],
) -> AsyncEngine:
    through_proxy = create_async_engine(
        fault_proxy.url(pg_database, driver=async_driver), pool_size=1, max_overflow=0
    )
    made_async_engines.append(through_proxy)
    return through_proxy


@pytest.fixture
def switched_off(clean_env: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Self-healing off by the environment, as reloaded; the environment's configuration is
    back afterwards."""
    clean_env.setenv("SELF_HEALING_ENABLED", "false")
    rdb.reload_config()
    yield clean_env
    clean_env.undo()
    rdb.reload_config()


def switch_on(env: pytest.MonkeyPatch) -> None:
    env.setenv("SELF_HEALING_ENABLED", "true")
    rdb.reload_config()


def unknown_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Commit outcome unknown" in r.getMessage()]


def unknown_commits(service: str) -> int:
    return int(rdb.health()["services"][service]["counters"]["unknown_commits"])


def written(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).where(NOTES.c.name == name)) or 0)


def assert_unknown(exc: BaseException, caplog: pytest.LogCaptureFixture, service: str) -> str:
    """``exc`` (a lost COMMIT answer) is an unknown outcome: not transient, a 500 of its own on
    the web, counted and said once; returns the line."""
    assert not rdb.is_transient(exc)
    problem = problem_details(exc)
    assert problem is not None
    assert problem.status == 500
    assert "Retry-After" not in problem.headers
    assert unknown_commits(service) == 1
    (line,) = unknown_lines(caplog)
    return line


def plain_connections_of(engine: sa.Engine) -> list[Any]:
    """The driver's connections of ``engine``'s pool that are checked in (none marked, all
    made while self-healing was off)."""
    return [record.dbapi_connection for record in list(engine.pool._pool.queue)]  # type: ignore[attr-defined]


# -- sync (psycopg) ------------------------------------------------------------------------------
@pytest.mark.parametrize("pooled_before_the_factory", [False, True])
def test_a_unit_in_use_at_the_switch_has_its_lost_answer_called_unknown(
    engine: sa.Engine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    pooled_before_the_factory: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``pooled_before_the_factory``: the engine's one connection was made before it had a
    resilient factory (an install of the markers through it, as the quickstart does), so no
    connect of ours saw it; it is marked at the switch all the same."""
    if pooled_before_the_factory:
        with proxied.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    Sessions = rdb.ResilientSession(proxied, service=service)
    name = f"switched-{uuid.uuid4()}"
    runs: list[int] = []

    def add_across_the_switch(session: Session) -> None:
        runs.append(1)
        session.execute(sa.text("SELECT 1"))  # checked out while off: the driver's own class
        switch_on(switched_off)
        session.execute(sa.insert(NOTES).values(name=name))
        fault_proxy.lose_commit_answer()

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError) as raised,
    ):
        Sessions.run(add_across_the_switch)
    assert fault_proxy.commits_lost == 1
    assert runs == [1]
    line = assert_unknown(raised.value, caplog, service)
    assert "a unit begun with self-healing off" in line
    assert written(engine, name) == 1  # (it did commit: what the answer tells to check)


def test_a_unit_in_another_thread_at_the_switch_has_its_lost_answer_called_unknown(
    engine: sa.Engine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reload runs in one thread while a unit holds its connection in another (a web
    server's worker): that unit's COMMIT, after the reload, is marked all the same."""
    Sessions = rdb.ResilientSession(proxied, service=service)
    name = f"switched-{uuid.uuid4()}"
    holding, reloaded = threading.Event(), threading.Event()
    raised: list[BaseException] = []

    def add_across_the_switch(session: Session) -> None:
        session.execute(sa.text("SELECT 1"))  # checked out while off
        holding.set()
        assert reloaded.wait(30)
        session.execute(sa.insert(NOTES).values(name=name))
        fault_proxy.lose_commit_answer()

    def worker() -> None:
        try:
            Sessions.run(add_across_the_switch)
        except BaseException as exc:  # (looked at in the test's thread)
            raised.append(exc)

    thread = threading.Thread(target=worker)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        thread.start()
        try:
            assert holding.wait(30)
            switch_on(switched_off)
        finally:
            reloaded.set()
            thread.join(30)
    assert not thread.is_alive()
    (exc,) = raised
    assert isinstance(exc, sa.exc.DBAPIError)
    assert fault_proxy.commits_lost == 1
    line = assert_unknown(exc, caplog, service)
    assert "a unit begun with self-healing off" in line
    assert written(engine, name) == 1


def test_drop_in_use_in_use_at_the_switch_has_its_lost_answer_called_unknown(
    engine: sa.Engine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    name = f"switched-{uuid.uuid4()}"

    def add_across_the_switch() -> None:
        with Sessions.begin() as session:
            session.execute(sa.text("SELECT 1"))  # checked out while off
            switch_on(switched_off)
            session.execute(sa.insert(NOTES).values(name=name))
            fault_proxy.lose_commit_answer()

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError) as raised,
    ):
        add_across_the_switch()
    assert fault_proxy.commits_lost == 1
    line = assert_unknown(raised.value, caplog, service)
    assert "drop-in" in line
    assert written(engine, name) == 1


def test_a_new_factory_switching_its_engine_on_marks_a_connection_in_use(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a reload: the engine's factories were off and are gone, and a new one with
    self-healing on is made while a connection made meanwhile is in use. Its lost COMMIT
    answer is an unknown outcome, as after a reload that switches self-healing on."""
    off = rdb.ResilientSession(
        proxied, service=service, config=rdb.load_config({"SELF_HEALING_ENABLED": "false"})
    )
    off.run(lambda session: session.execute(sa.text("SELECT 1")))
    del off
    gc.collect()  # (the engine keeps its factories weakly)
    name = str(uuid.uuid4())
    with proxied.connect() as conn:  # made while off, in use
        conn.execute(sa.text("SELECT 1"))
        on = rdb.ResilientSession(proxied, service=service)
        assert on.config.enabled
        conn.execute(sa.insert(NOTES).values(name=name))
        fault_proxy.lose_commit_answer()
        with (
            caplog.at_level(logging.WARNING, logger="resilient_db"),
            pytest.raises(sa.exc.DBAPIError) as raised,
        ):
            conn.commit()
    assert fault_proxy.commits_lost == 1
    assert "drop-in use" in assert_unknown(raised.value, caplog, service)
    assert written(proxied, name) == 1  # it committed: the outcome was unknown, not absent


def test_a_later_unit_on_a_connection_in_use_at_the_switch_is_verified(
    engine: sa.Engine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)

    def across_the_switch(session: Session) -> None:
        session.execute(sa.text("SELECT 1"))  # checked out while off
        switch_on(switched_off)

    Sessions.run(across_the_switch)
    name = f"switched-{uuid.uuid4()}"
    runs: list[int] = []

    def add(session: Session) -> str:
        runs.append(1)
        session.execute(sa.insert(NOTES).values(name=name))
        fault_proxy.lose_commit_answer()
        return "done"

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        assert Sessions.run(add) == "done"  # verified by its marker: committed
    assert fault_proxy.commits_lost == 1
    assert runs == [1]
    assert unknown_lines(caplog) == []
    assert written(engine, name) == 1


def test_connections_made_while_off_commit_marked_once_switched_on(
    proxied: sa.Engine, service: str, switched_off: pytest.MonkeyPatch
) -> None:
    """Every pooled connection made while off, in use or not, commits through the marked
    class once self-healing is on (no COMMIT after the switch goes out unmarked)."""
    Sessions = rdb.ResilientSession(proxied, service=service)
    Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))
    (made_off,) = plain_connections_of(proxied)
    assert not getattr(made_off, "_rdb_marked", False)  # off: the driver's own class
    switch_on(switched_off)
    assert getattr(made_off, "_rdb_marked", False)


# -- the line's words (sync and async) ------------------------------------------------------------
# A unit begun while self-healing was off and switched on before its COMMIT is a unit, not drop-in
# use: its COMMIT was not marked (the unit began without the protocol), so its outcome can't be
# verified. Drop-in use keeps its own words.
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
        switch_on(switched_off)
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
    assert written(engine, name) == 1  # (it did commit: what the line tells to check)


@pytest.mark.asyncio
async def test_an_async_unit_begun_with_self_healing_off_is_not_called_drop_in_use(
    engine: sa.Engine,
    async_proxied: AsyncEngine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service)
    assert not Sessions.config.enabled
    name = f"lost-{uuid.uuid4()}"

    async def connected(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT 1"))

    async def switched_on_then_add(session: AsyncSession) -> None:
        switch_on(switched_off)  # (as in the sync test)
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
    assert written(engine, name) == 1


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


# -- async (asyncpg, psycopg) --------------------------------------------------------------------
@pytest.mark.parametrize("pooled_before_the_factory", [False, True])
@pytest.mark.asyncio
async def test_an_async_unit_in_use_at_the_switch_has_its_lost_answer_called_unknown(
    engine: sa.Engine,
    async_proxied: AsyncEngine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    pooled_before_the_factory: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if pooled_before_the_factory:  # (see the sync test)
        async with async_proxied.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service)
    name = f"switched-{uuid.uuid4()}"
    runs: list[int] = []

    async def add_across_the_switch(session: AsyncSession) -> None:
        runs.append(1)
        await session.execute(sa.text("SELECT 1"))  # checked out while off
        switch_on(switched_off)
        await session.execute(sa.insert(NOTES).values(name=name))
        fault_proxy.lose_commit_answer()

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError) as raised,
    ):
        await Sessions.run(add_across_the_switch)
    assert fault_proxy.commits_lost == 1
    assert runs == [1]
    line = assert_unknown(raised.value, caplog, service)
    assert "a unit begun with self-healing off" in line
    assert written(engine, name) == 1


@pytest.mark.asyncio
async def test_async_drop_in_use_in_use_at_the_switch_has_its_lost_answer_called_unknown(
    engine: sa.Engine,
    async_proxied: AsyncEngine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service)
    name = f"switched-{uuid.uuid4()}"

    async def add_across_the_switch() -> None:
        async with Sessions.begin() as session:
            await session.execute(sa.text("SELECT 1"))  # checked out while off
            switch_on(switched_off)
            await session.execute(sa.insert(NOTES).values(name=name))
            fault_proxy.lose_commit_answer()

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError) as raised,
    ):
        await add_across_the_switch()
    assert fault_proxy.commits_lost == 1
    line = assert_unknown(raised.value, caplog, service)
    assert "drop-in" in line
    assert written(engine, name) == 1


@pytest.mark.asyncio
async def test_a_later_async_unit_on_a_connection_in_use_at_the_switch_is_verified(
    engine: sa.Engine,
    async_proxied: AsyncEngine,
    fault_proxy: FaultProxy,
    service: str,
    switched_off: pytest.MonkeyPatch,
    *,
    async_driver: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service)
    drivers: list[Any] = []

    async def driver_of(session: AsyncSession) -> Any:
        connection = await session.connection()
        return (await connection.get_raw_connection()).driver_connection

    async def across_the_switch(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT 1"))  # checked out while off
        drivers.append(await driver_of(session))
        switch_on(switched_off)

    await Sessions.run(across_the_switch)
    name = f"switched-{uuid.uuid4()}"
    runs: list[int] = []

    async def add(session: AsyncSession) -> str:
        runs.append(1)
        drivers.append(await driver_of(session))
        await session.execute(sa.insert(NOTES).values(name=name))
        fault_proxy.lose_commit_answer()
        return "done"

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        assert await Sessions.run(add) == "done"
    assert fault_proxy.commits_lost == 1
    assert runs == [1]
    assert unknown_lines(caplog) == []
    assert written(engine, name) == 1
    # asyncpg's was marked in place at the switch (a slower class): the pool replaced it with
    # one made marked at its next checkout; psycopg's was marked in place, and set up then
    made_off, later = drivers
    assert (later is made_off) == (async_driver == "psycopg")
