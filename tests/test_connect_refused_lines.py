"""A connect refused with a SQLSTATE of class 08 replaces no pooled connection, and says none.

A FATAL of class 08 at login (PgBouncer's 08P01, a login refused with 08004) reaches the
engine's ``handle_error`` on SQLAlchemy's path for errors without a connection, where nothing
is invalidated. The pooled connections stay and are used on: no ``Replacing the pooled
connections`` line, no ``pool_invalidations``. Real server: a login event trigger refuses the
engine's logins with ``RAISE ... USING ERRCODE`` (asyncpg reports the FATAL's SQLSTATE; libpq
reports none at connect), while a row in a table says so."""

from __future__ import annotations

import asyncio
import logging

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db.testing import PostgresServer

APP_NAME = "rdb-refused-logins"
CONFIG = rdb.Config(max_retries=0, circuit_breaker=False)


@pytest.fixture
def refusing(pg_server: PostgresServer, pg_database: str) -> str:
    """A login trigger refusing the engine's logins (its ``application_name``) with 08004
    while ``refuse_logins`` holds a row; other logins (the harness's) pass."""
    pg_server.execute("CREATE TABLE refuse_logins (code text NOT NULL)", database=pg_database)
    pg_server.execute(
        f"""CREATE FUNCTION refuse_login() RETURNS event_trigger LANGUAGE plpgsql AS $$
        DECLARE wanted text;
        BEGIN
          IF pg_catalog.current_setting('application_name') = '{APP_NAME}' THEN
            SELECT code INTO wanted FROM public.refuse_logins LIMIT 1;
            IF wanted IS NOT NULL THEN
              RAISE EXCEPTION 'logins refused here' USING ERRCODE = wanted;
            END IF;
          END IF;
        END $$""",
        database=pg_database,
    )
    pg_server.execute(
        "CREATE EVENT TRIGGER refuse_login ON login EXECUTE FUNCTION refuse_login()",
        database=pg_database,
    )
    return pg_database


def test_a_login_refused_with_class_08_keeps_the_pool_and_says_nothing_of_it(
    pg_server: PostgresServer, refusing: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_db")
    url = pg_server.url(refusing, driver="asyncpg")

    async def backend(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())

    async def scenario() -> tuple[int, BaseException, int]:
        engine = create_async_engine(
            url,
            pool_size=2,
            max_overflow=0,
            connect_args={"server_settings": {"application_name": APP_NAME}},
        )
        Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
        try:
            first = await Sessions.run(backend)  # the pool's connection
            pg_server.execute("INSERT INTO refuse_logins VALUES ('08004')", database=refusing)
            async with engine.connect():  # that one out: the next unit connects
                with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's, wrapped or not
                    await Sessions.run(backend)
            pg_server.execute("DELETE FROM refuse_logins", database=refusing)
            return first, raised.value, await Sessions.run(backend)
        finally:
            await engine.dispose()

    first, error, after = asyncio.run(scenario())
    assert rdb.sqlstate_of(error) == "08004", error
    assert rdb.classify(error) is rdb.Outcome.DISCONNECT  # (retried as a lost connection)
    assert after == first  # the pooled connection was kept and used on
    events = [getattr(r, "self_heal", {}).get("event") for r in caplog.records]
    assert "pool_invalidated" not in events, [r.getMessage() for r in caplog.records]
    assert rdb.health()["services"][service]["counters"]["pool_invalidations"] == 0
