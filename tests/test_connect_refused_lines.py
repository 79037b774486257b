"""A connect refused replaces no pooled connection, and says none.

A FATAL at login (PgBouncer's 08P01, a login refused with 08004, PostgreSQL's 53300 too many
clients, 57P03 starting up) reaches the engine's ``handle_error`` on SQLAlchemy's path for
errors without a connection, where nothing is invalidated (whether the hooks take it for a
disconnect or not). The pooled connections stay and are used on: no ``Replacing the pooled
connections`` line, no ``pool_invalidations``. Real server: a login event trigger refuses the
engine's logins with ``RAISE ... USING ERRCODE`` (asyncpg reports the FATAL's SQLSTATE; libpq
reports none at connect), while a row in a table says so. Where the pooled connections are
dead (a restart), the checkout finds each one so and replaces it."""

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


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        ("08004", rdb.Outcome.DISCONNECT),  # a login refused
        ("08P01", rdb.Outcome.DISCONNECT),  # PgBouncer's refusals (max_client_conn, ...)
        ("53300", rdb.Outcome.UNAVAILABLE),  # too many clients
        ("57P03", rdb.Outcome.UNAVAILABLE),  # the database system is starting up
    ],
)
def test_a_login_refused_keeps_the_pool_and_says_nothing_of_it(
    pg_server: PostgresServer,
    refusing: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
    *,
    code: str,
    outcome: rdb.Outcome,
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
            pg_server.execute(f"INSERT INTO refuse_logins VALUES ('{code}')", database=refusing)
            async with engine.connect():  # that one out: the next unit connects
                with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's, wrapped or not
                    await Sessions.run(backend)
            pg_server.execute("DELETE FROM refuse_logins", database=refusing)
            return first, raised.value, await Sessions.run(backend)
        finally:
            await engine.dispose()

    first, error, after = asyncio.run(scenario())
    assert rdb.sqlstate_of(error) == code, error
    assert rdb.classify(error) is outcome  # (retried as a lost connection, or later)
    assert after == first  # the pooled connection was kept and used on
    events = [getattr(r, "self_heal", {}).get("event") for r in caplog.records]
    assert "pool_invalidated" not in events, [r.getMessage() for r in caplog.records]
    assert rdb.health()["services"][service]["counters"]["pool_invalidations"] == 0


@pytest.mark.server_control
def test_connects_refused_by_a_stopped_server_leave_its_dead_pooled_connections_to_checkout(
    pg_server: PostgresServer, pg_database: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stopped: the pool's connections are dead, and the connects that would replace
    them are refused, which invalidates no pool. Each dead one is found so at its checkout
    (counted in ``dead_pooled_connections``) and replaced once the server is back; none is
    handed out."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine(pg_server.url(pg_database), pool_size=2, max_overflow=0)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        held = [engine.connect() for _ in range(2)]
        pooled = [conn.connection.driver_connection for conn in held]
        for conn in held:
            conn.close()
        pg_server.stop()
        try:
            with pytest.raises(sa.exc.OperationalError):
                Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))  # its connect refused
        finally:
            pg_server.start()
        held = [engine.connect() for _ in range(2)]
        again = [conn.connection.driver_connection for conn in held]
        assert not {id(c) for c in again} & {id(c) for c in pooled}  # (all alive: ids unique)
        assert [conn.exec_driver_sql("SELECT 1").scalar() for conn in held] == [1, 1]
        for conn in held:
            conn.close()
    finally:
        engine.dispose()
    counters = rdb.health()["services"][service]["counters"]
    assert counters["dead_pooled_connections"] == 2
    assert counters["pool_invalidations"] == 0
