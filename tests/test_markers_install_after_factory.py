"""The commit markers installed on an engine that has a resilient factory already (made at
import, the install run at startup): the install's own connection is no proof that the markers
are missing, and the connections it set up use the markers once it has installed them."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db as rdb

NOT_INSTALLED = "Commit markers are not installed"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url, pool_size=2)
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id serial PRIMARY KEY)")
    rdb.uninstall_commit_markers(eng)
    eng.dispose()  # (connections made before the test's factory)
    yield eng
    eng.dispose()


def _insert(session: sa.orm.Session) -> None:
    session.execute(sa.text("INSERT INTO t DEFAULT VALUES"))


def _markers(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql("SELECT count(*) FROM resilient_db.commit_markers").scalar()
        )


def test_an_install_through_the_engine_after_the_factory_is_used_and_not_warned_missing(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the install's look at the database (a connection of the factory's engine) said
    once per engine that the markers were not installed, and the connection it left in the
    pool verified by transaction id for good: every unit after the install, one at a time,
    wrote no marker."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        rdb.install_commit_markers(engine)
        for _ in range(3):
            Sessions.run(_insert)
    assert not [r for r in caplog.records if NOT_INSTALLED in r.getMessage()]
    assert _markers(engine) == 3


def test_an_install_through_a_connection_after_the_factory_is_used_from_its_next_checkout(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(_insert)  # the pool's connection: set up while nothing is installed
    with engine.begin() as conn:
        rdb.install_commit_markers(conn)
    for _ in range(3):
        Sessions.run(_insert)
    assert _markers(engine) == 3


@pytest.mark.asyncio
async def test_an_async_install_after_the_factory_is_used_from_the_next_checkout(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    """docs/units-of-work.md's asyncio form (``conn.run_sync`` on a connection of
    ``engine.begin()``)."""
    async_engine = create_async_engine(pg_async_url, pool_size=1)
    try:
        Sessions = rdb.AsyncResilientSession(async_engine, service=service)

        async def insert(session: sa.ext.asyncio.AsyncSession) -> None:
            await session.execute(sa.text("INSERT INTO t DEFAULT VALUES"))

        await Sessions.run(insert)
        async with async_engine.begin() as conn:
            await conn.run_sync(rdb.install_commit_markers)
        for _ in range(3):
            await Sessions.run(insert)
    finally:
        await async_engine.dispose()
    assert _markers(engine) == 3


def test_an_install_refused_after_the_factory_still_warns_once(
    engine: sa.Engine, pg_url: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The install's own connection says nothing; the markers still missing after it (a role
    that may not create in the database) are said once, by the next connection's set-up."""
    role, password = f"rdb_noc_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.exec_driver_sql(f"REVOKE CREATE ON DATABASE {engine.url.database} FROM PUBLIC")
        conn.exec_driver_sql(f"GRANT INSERT, SELECT ON t TO {role}")
        conn.exec_driver_sql(f"GRANT USAGE ON SEQUENCE t_id_seq TO {role}")
    app = sa.create_engine(sa.make_url(pg_url).set(username=role, password=password))
    try:
        Sessions = rdb.ResilientSession(app, service=service)
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            with pytest.raises(sa.exc.ProgrammingError):
                rdb.install_commit_markers(app)
            for _ in range(3):
                Sessions.run(_insert)
        said = [r for r in caplog.records if NOT_INSTALLED in r.getMessage()]
        assert len(said) == 1, said
    finally:
        app.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
