"""A multi-host URL (``host=a&host=b&target_session_attrs=read-write``) none of whose hosts can
be used: what the unit raises, and its ``[SELF-HEAL]`` lines, name every host tried.

asyncpg's connect to such a URL is resilient_db's own (one host at a time, each with its own
connect timeout): it raised the last host's error as it was, ``Connect call failed
('127.0.0.1', <last port>)``, and the ``Gave up`` line said ``disconnect``, as if that one host
had been tried. psycopg's own error lists every host already (its text, not resilient_db's;
psycopg 3.2.8+, before which it names the last host only).
Real servers: one stopped, and a loopback port nothing listens on."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import sys
import warnings
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from processes import wait_for
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db.testing import (
    EmbeddedPostgres,
    FaultProxy,
    PostgresServer,
    StandbyPair,
    free_port,
)

pytestmark = pytest.mark.usefixtures("no_backoff")

CONFIG = rdb.Config(max_retries=1, failure_threshold=2)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(".")[:3] if n.isdigit())


@pytest.fixture(scope="module")
def down_hosts() -> Iterator[tuple[str, str]]:
    """``host:port`` of a server that was running and is stopped, and of a loopback port
    nothing listens on."""
    server = EmbeddedPostgres()
    try:
        server.start()
        stopped = f"{server.host}:{server.port}"
        server.stop()
        yield stopped, f"127.0.0.1:{free_port()}"
    finally:
        server.close()


def multi_host_url(driver: str, hosts: tuple[str, str], attrs: str = "read-write") -> sa.URL:
    return sa.make_url(f"postgresql+{driver}://app@/app").update_query_dict(
        {"host": list(hosts), "target_session_attrs": attrs}
    )


async def select_one(session: AsyncSession) -> None:
    await session.execute(sa.text("SELECT 1"))


@pytest.mark.parametrize("attrs", ["read-write", "prefer-standby"])
def test_asyncpg_names_every_host_tried_when_none_can_be_used(
    down_hosts: tuple[str, str],
    service: str,
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
    attrs: str,
) -> None:
    """(``prefer-standby`` makes its one pass over the hosts its own way: the same said.)"""

    async def run() -> ConnectionRefusedError:
        engine = create_async_engine(multi_host_url("asyncpg", down_hosts, attrs))
        factory = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
        try:
            # the driver's error, as asyncpg raises it (its type decides how it is handled)
            with pytest.raises(ConnectionRefusedError) as raised:
                await factory.run(select_one)
            return raised.value
        finally:
            await engine.dispose()

    with caplog.at_level(logging.ERROR, logger="resilient_db"):
        error = asyncio.run(run())
    # the last host's error as the event loop made it: asyncio's names the address ("Connect
    # call failed ('127.0.0.1', <port>)"), uvloop's does not ("Connection refused")
    assert error.errno == errno.ECONNREFUSED

    (gave_up,) = [e for e in events if e.name == "gave_up"]
    (line,) = [r.getMessage() for r in caplog.records if "Gave up" in r.getMessage()]
    (opened,) = [e for e in events if e.name == "breaker_opened"]
    for said in (line, gave_up.fields["cause"], opened.message):
        assert "no host of the multi-host URL could be used, 2 tried" in said
        first, second = (said.index(f"{host}: ConnectionRefusedError") for host in down_hosts)
        assert first < second  # in the order tried, each with how it failed
    if sys.version_info >= (3, 11):
        (note,) = error.__notes__
        assert note == f"resilient_db: {gave_up.fields['cause']}"


def test_psycopgs_own_error_names_every_host_tried(
    down_hosts: tuple[str, str], service: str
) -> None:
    """psycopg tries the hosts itself, and its error lists each one's failure: nothing to add."""
    if _version(psycopg.__version__) < (3, 2, 8):
        pytest.skip("psycopg before 3.2.8 names the last host tried only")
    engine = sa.create_engine(multi_host_url("psycopg", down_hosts))
    factory = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        with pytest.raises(sa.exc.OperationalError) as raised:
            factory.run(lambda session: session.execute(sa.text("SELECT 1")))
    finally:
        engine.dispose()
    assert "Multiple connection attempts failed" in str(raised.value)
    for host in down_hosts:
        name, _, port = host.rpartition(":")
        assert f"host: '{name}', port: '{port}'" in str(raised.value)


def test_asyncpg_says_how_each_host_failed_a_standby_and_a_closed_port(
    pg_standby: StandbyPair, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """A closed port, then a hot standby (running, but not read-write): each failed its own
    way, and both are said, in the order tried. (The unit raises the standby's refusal, the
    last host's, wrapped by SQLAlchemy 2.1: the cause is found on its chain. SQLAlchemy 2.0
    raises asyncpg's errors of a connect as they are.)"""
    pair = pg_standby
    pair.create_database("app")
    closed, standby = f"127.0.0.1:{free_port()}", f"{pair.standby.host}:{pair.standby.port}"
    url = sa.make_url(pair.url("app", driver="asyncpg")).update_query_dict(
        {"host": [closed, standby], "target_session_attrs": "read-write"}
    )

    raised: type[Exception] = sa.exc.DBAPIError
    if _version(sa.__version__) < (2, 1):
        raised = asyncpg.TargetServerAttributeNotMatched

    async def run() -> None:
        engine = create_async_engine(url)
        factory = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
        try:
            with pytest.raises(raised, match="target attribute requirement"):
                await factory.run(select_one)
        finally:
            await engine.dispose()

    asyncio.run(run())
    (gave_up,) = [e for e in events if e.name == "gave_up"]
    cause = gave_up.fields["cause"]
    assert cause.startswith("no host of the multi-host URL could be used, 2 tried: ")
    assert f"{closed}: ConnectionRefusedError: " in cause
    assert f"{standby}: TargetServerAttributeNotMatched: " in cause
    assert cause.index(closed) < cause.index(standby)


@pytest.mark.parametrize(
    ("driver", "name", "value"),
    [
        ("psycopg", "target_session_attrs", "read_write"),
        ("psycopg", "load_balance_hosts", "rand"),
        ("asyncpg", "target_session_attrs", "read_write"),
    ],
)
def test_a_misspelled_host_choice_is_raised_at_once_not_retried_as_an_outage(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    driver: str,
    name: str,
    value: str,
) -> None:
    """A value the driver does not take (``read_write`` for ``read-write``) fails every connect
    before any host is tried: raised at the first attempt, the breaker left alone. psycopg's
    error for it (libpq's "invalid target_session_attrs value", no SQLSTATE) was taken for a
    refused connection: the unit was retried to its deadline, and the breaker opened as for a
    database that is down. (asyncpg raises its own configuration error, never retried; it takes
    no ``load_balance_hosts``.)"""
    here = f"{pg_server.host}:{pg_server.port}"
    url = sa.make_url(pg_server.url(pg_database, driver=driver)).update_query_dict(
        {"host": [here, here], name: value}
    )
    config = rdb.Config(max_retries=3, failure_threshold=2)
    if driver == "asyncpg":

        async def run() -> BaseException:
            engine = create_async_engine(url)
            factory = rdb.AsyncResilientSession(engine, service=service, config=config)
            try:
                # (SQLAlchemy 2.1 wraps it in a DBAPIError; 2.0 lets asyncpg's own through)
                with pytest.raises((sa.exc.DBAPIError, asyncpg.ClientConfigurationError)) as raised:
                    await factory.run(select_one)
                return raised.value
            finally:
                await engine.dispose()

        error = asyncio.run(run())
    else:
        engine = sa.create_engine(url)
        factory = rdb.ResilientSession(engine, service=service, config=config)
        try:
            with pytest.raises(sa.exc.OperationalError) as raised_sync:
                factory.run(lambda session: session.execute(sa.text("SELECT 1")))
        finally:
            engine.dispose()
        error = raised_sync.value
    assert value in str(error)
    assert rdb.classify(error) is rdb.Outcome.NOT_TRANSIENT
    state = rdb.health()["services"][service]
    assert state["counters"]["attempts"] == 1, state
    assert state["breaker"]["state"] == "closed", state


def test_asyncpg_prefer_standby_passes_a_host_that_is_down_and_writes_once(
    pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """``prefer-standby`` over a closed port, then a primary: the closed host is passed, no
    standby is found, and the unit's write lands once on the primary it kept."""
    with FaultProxy(pg_server) as primary:
        url = sa.make_url(pg_server.url(pg_database, driver="asyncpg")).update_query_dict(
            {
                "host": [f"127.0.0.1:{free_port()}", f"{primary.host}:{primary.port}"],
                "target_session_attrs": "prefer-standby",
            }
        )
        calls = []

        async def write(session: AsyncSession) -> None:
            calls.append(1)
            await session.execute(sa.text("INSERT INTO multi_host_writes VALUES (1)"))

        async def run() -> None:
            engine = create_async_engine(url)
            try:
                await rdb.AsyncResilientSession(engine, service=service, config=CONFIG).run(write)
            finally:
                await engine.dispose()

        pg_server.execute("CREATE TABLE multi_host_writes (n int)", database=pg_database)
        asyncio.run(run())
        assert primary.connections_accepted == 1
    assert calls == [1]
    assert pg_server.execute("SELECT count(*) FROM multi_host_writes", database=pg_database) == [
        (1,)
    ]


def test_asyncpg_prefer_standby_cancelled_on_a_later_host_closes_the_server_it_kept(
    pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """``prefer-standby`` keeps the first primary reached while it looks for a standby on the
    next hosts: a connect cancelled meanwhile (the caller's timeout) closes the kept one, no
    connection left open on the server."""
    with FaultProxy(pg_server) as primary, FaultProxy(pg_server) as silent:
        silent.blackhole()  # (accepts, never answers: the connect waits there)
        url = sa.make_url(pg_server.url(pg_database, driver="asyncpg")).update_query_dict(
            {
                "host": [f"{primary.host}:{primary.port}", f"{silent.host}:{silent.port}"],
                "target_session_attrs": "prefer-standby",
                # (no SSL request: asyncpg's future for its answer, cut off by the cancel,
                # would be reported "never retrieved" when collected)
                "ssl": "disable",
            }
        )

        async def run() -> None:
            engine = create_async_engine(url)
            rdb.AsyncResilientSession(engine, service=service)  # (its connects are the library's)
            try:
                connecting = asyncio.ensure_future(engine.connect().start())
                for _ in range(1000):  # (bounded: the connect reaches the second host at once)
                    if silent.connections_accepted:
                        break
                    await asyncio.sleep(0.01)
                assert primary.active_connections == 1
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always", ResourceWarning)
                    connecting.cancel()
                    cancelled = False
                    try:
                        await connecting
                    except asyncio.CancelledError:
                        cancelled = True
                    del connecting  # (its error's frames hold what the connect made)
                    gc.collect()  # (asyncpg's finalizer of a connection left open warns)
                assert cancelled
                assert not [w for w in seen if "unclosed connection" in str(w.message)]
            finally:
                await engine.dispose()

        asyncio.run(run())
        assert silent.connections_accepted == 1
        # The proxy sees a client's close on its own thread, a moment after it is sent.
        wait_for(lambda: primary.active_connections == 0, "the kept connection closed", 10)
