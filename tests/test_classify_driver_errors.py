"""Driver errors without a SQLSTATE, classified by the driver's state, never by the message.

- psycopg raises ``OperationalError`` without SQLSTATE for a broken socket and also for errors
  of a sound connection: libpq refuses a statement of more than 65,535 parameters (an IN list
  of 70,000 ids) before sending it. On an established connection such an error is a lost
  connection only when the connection is lost (SQLAlchemy's ``connection_invalidated``, from
  psycopg's ``broken``; for the driver's connection used directly, its libpq status). Before,
  every such error was a disconnect: retried, counted by the breaker, which then opened for
  every unit of the service.
- psycopg keeps no SQLSTATE of a refusal the server sends while connecting. A server that asked
  for a password the URL did not give refused for good: not transient. A refusal after the
  password was sent (a wrong password, an unknown database) can't be told from the server's
  "too many connections" sent after authentication, which heals: it stays a disconnect, as a
  connect that reaches no server does. asyncpg's carry their SQLSTATE (28P01, 3D000: not
  transient; 53300: unavailable).

Real server, real drivers, loopback; backoff zeroed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, assert_breaker_untouched
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")

#: a breaker that two counted failures open: one retried unit would open it
CONFIG = rdb.Config(failure_threshold=2, reset_timeout=60.0)
IDS = 70_000
MANY = sa.text("SELECT count(*) FROM generate_series(1, 3) AS g(n) WHERE n IN :ids").bindparams(
    sa.bindparam("ids", expanding=True)
)
PID = sa.text("SELECT pg_backend_pid()")


def _counters(service: str) -> dict[str, Any]:
    return dict(rdb.health()["services"][service]["counters"])


# -- an error of a sound connection ----------------------------------------------------------------
@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def test_a_unit_of_70000_parameters_raises_after_one_attempt(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    with engine.connect() as conn:
        pid = conn.execute(PID).scalar_one()
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        return int(session.execute(MANY, {"ids": list(range(IDS))}).scalar_one())

    for n in (1, 2, 3):
        with pytest.raises(sa_exc.OperationalError) as info:
            Sessions.run(unit)
        assert rdb.sqlstate_of(info.value) is None  # libpq's own refusal, never sent
        assert not info.value.connection_invalidated
        assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
        assert len(calls) == n  # one attempt each
    assert_breaker_untouched(service)
    with engine.connect() as conn:
        assert conn.execute(PID).scalar_one() == pid  # the pooled connection was kept
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1


def test_the_drivers_own_connection_is_judged_by_its_state(
    pg_server: Any, pg_database: str, service: str
) -> None:
    """Statements sent on psycopg's connection itself (no SQLAlchemy wrapper to say whether it
    lost the connection): the same 70,000 parameters are the unit's error; a connection the
    network cut is lost, and the unit is replayed."""
    with FaultProxy(pg_server) as proxy:
        engine = sa.create_engine(proxy.url(pg_database))
        Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
        seen: list[BaseException] = []

        def many(session: Session) -> None:
            driver = session.connection().connection.driver_connection
            try:
                driver.execute(
                    "SELECT 1 WHERE 1 IN (" + ",".join(["%s"] * IDS) + ")", list(range(IDS))
                )
            except Exception as exc:
                seen.append(exc)
                raise

        def cut(session: Session) -> int:
            driver = session.connection().connection.driver_connection
            if not seen:
                proxy.cut_all()
                try:
                    driver.execute("SELECT 1")
                except Exception as exc:
                    seen.append(exc)
                    raise
            return int(driver.execute("SELECT 1").fetchone()[0])

        try:
            with pytest.raises(psycopg.OperationalError) as info:  # unwrapped
                Sessions.run(many)
            assert info.value.sqlstate is None
            assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
            assert len(seen) == 1
            assert_breaker_untouched(service)

            seen.clear()
            assert Sessions.run(cut) == 1
            assert len(seen) == 1
            assert getattr(seen[0], "sqlstate", "?") is None
            assert rdb.classify(seen[0]) is rdb.Outcome.DISCONNECT
            assert _counters(service)["retries_by_class"] == {"disconnect": 1}
        finally:
            engine.dispose()


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.asyncio
async def test_async_a_unit_of_70000_parameters_raises_after_one_attempt(
    aengine: AsyncEngine, service: str
) -> None:
    """psycopg's AsyncConnection meets libpq's limit as the sync one does (asyncpg refuses
    more than 32,767 arguments with an InterfaceError, not transient either)."""
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        return int((await session.execute(MANY, {"ids": list(range(IDS))})).scalar_one())

    for n in (1, 2, 3):
        with pytest.raises(sa_exc.DBAPIError) as info:
            await Sessions.run(unit)
        assert rdb.sqlstate_of(info.value) is None
        assert not info.value.connection_invalidated
        assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
        assert len(calls) == n
    assert_breaker_untouched(service)


# -- refusals while connecting ---------------------------------------------------------------------
def _with(url: str, **parts: Any) -> str:
    return sa.make_url(url).set(**parts).render_as_string(hide_password=False)


@pytest.fixture
def password_url(pg_url: str) -> str:
    if sa.make_url(pg_url).password is None:
        pytest.skip("the test server takes connections without a password")
    return pg_url


def _assert_retried_as_disconnect(url: str, service: str) -> None:
    """A unit on ``url`` whose connect fails: a disconnect, tried three times (2 retries)."""
    engine = sa.create_engine(url)
    config = rdb.Config(max_retries=2, circuit_breaker=False)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    try:
        with pytest.raises(sa_exc.OperationalError) as info:
            Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
    finally:
        engine.dispose()
    assert rdb.classify(info.value) is rdb.Outcome.DISCONNECT
    assert _counters(service)["attempts"] == 3


REFUSED = {
    "wrong-password": {"password": "wrong"},  # 28P01
    "unknown-database": {"database": "no_such_database"},  # 3D000
}


def _assert_raised_at_once(engine: sa.Engine, service: str, *, requests: int) -> None:
    """Each of ``requests`` units on ``engine`` fails its connect: raised after one attempt as
    not transient (never CircuitOpenError), and the breaker is left untouched."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        for n in range(1, requests + 1):
            with pytest.raises(sa_exc.OperationalError) as info:  # never CircuitOpenError
                Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
            assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
            assert _counters(service)["attempts"] == n  # one attempt per request
    finally:
        engine.dispose()
    assert_breaker_untouched(service)


def test_a_connect_without_the_password_the_server_asks_for_raises_at_once(
    password_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server asked for a password and the URL gave none: no retry can succeed."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    given = sa.make_url(password_url)
    without = sa.engine.URL.create(
        given.drivername, given.username, None, given.host, given.port, given.database
    )
    _assert_raised_at_once(sa.create_engine(without), service, requests=5)


def test_a_connect_without_the_password_for_a_session_kind_is_still_a_disconnect(
    password_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password missing, but the URL asks for a session kind (``target_session_attrs``):
    the refusal may be a host that takes no writes, which heals, not the password (see
    test_a_connect_that_may_heal_is_still_a_disconnect): retried, as before."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    given = sa.make_url(password_url)
    without = sa.engine.URL.create(
        given.drivername,
        given.username,
        None,
        given.host,
        given.port,
        given.database,
        query={"target_session_attrs": "read-write"},
    )
    _assert_retried_as_disconnect(without.render_as_string(hide_password=False), service)


def test_a_session_kind_libpq_does_not_take_raises_at_once(pg_url: str, service: str) -> None:
    """``target_session_attrs=read_write`` (for read-write): libpq refuses the value itself,
    before any host is tried, on every connect: no retry can succeed, and no breaker opens on
    it (a breaker opened so would say the database failed)."""
    engine = sa.create_engine(_with(pg_url, query={"target_session_attrs": "read_write"}))
    _assert_raised_at_once(engine, service, requests=3)


@pytest.mark.parametrize("refusal", sorted(REFUSED))
def test_psycopg_refusals_after_the_password_are_disconnects(
    password_url: str, service: str, refusal: str
) -> None:
    """psycopg keeps no SQLSTATE of a refusal sent while connecting: a wrong password or an
    unknown database look the same as the server's "too many connections" sent after
    authentication (below), which heals; so they are retried (asyncpg's are not: below)."""
    _assert_retried_as_disconnect(_with(password_url, **REFUSED[refusal]), service)


def test_a_connect_refused_for_too_many_connections_after_authentication_heals(
    password_url: str, pg_server: Any, service: str
) -> None:
    """53300 sent after the password was checked (here a role's connection limit; likewise the
    last slots reserved for superusers, the usual "too many connections" of an application):
    retried, and the unit succeeds once a connection is given back."""
    role = f"limited_{service.replace('-', '_')}"
    pg_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' CONNECTION LIMIT 1")
    url = _with(password_url, username=role, password="pw")
    held = psycopg.connect(sa.make_url(url).set(drivername="postgresql").render_as_string(False))
    given_back: list[float] = []

    def sleep(seconds: float) -> None:  # the first backoff: the other connection ends
        given_back.append(seconds)
        held.close()

    engine = sa.create_engine(url)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG, sleep=sleep)
    try:
        assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    finally:
        held.close()
        engine.dispose()
        pg_server.execute(f"DROP ROLE IF EXISTS {role}")
    assert len(given_back) == 1
    assert _counters(service)["retries_by_class"] == {"disconnect": 1}


@pytest.mark.parametrize("refusal", sorted(REFUSED))
def test_asyncpg_refusals_after_authentication_carry_their_code_and_raise_at_once(
    password_url: str, service: str, refusal: str
) -> None:
    """The same on asyncpg, where the error carries the server's SQLSTATE."""
    import asyncio  # noqa: PLC0415

    url = _with(password_url, **REFUSED[refusal]).replace("+psycopg", "+asyncpg")

    async def main() -> list[BaseException]:
        engine = create_async_engine(url)
        Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)

        async def unit(session: AsyncSession) -> int:
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

        errors: list[BaseException] = []
        try:
            for _ in range(10):
                # SQLAlchemy 2.0's asyncpg dialect lets an error of asyncpg's connect through
                # as it is; 2.1 wraps it in a DBAPIError
                with pytest.raises((sa_exc.DBAPIError, asyncpg.PostgresError)) as info:
                    await Sessions.run(unit)
                errors.append(info.value)
        finally:
            await engine.dispose()
        return errors

    errors = asyncio.run(main())
    assert {rdb.sqlstate_of(e) for e in errors} == {
        {"wrong-password": "28P01", "unknown-database": "3D000"}[refusal]
    }
    assert _counters(service)["attempts"] == 10
    assert_breaker_untouched(service)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("where", ["no-server", "read-write-session"])
def test_a_connect_that_may_heal_is_still_a_disconnect(
    password_url: str, service: str, where: str
) -> None:
    """No server at the address (refused before any password); and a URL that asks for a
    session kind (``target_session_attrs``): libpq's refusal of a host that takes no writes
    comes after authentication, like a wrong password, which psycopg can't tell from it, so
    there both stay disconnects (retried)."""
    if where == "no-server":
        url = _with(password_url, host="127.0.0.1", port=_free_port())
    else:
        url = _with(password_url, password="wrong", query={"target_session_attrs": "read-write"})
    _assert_retried_as_disconnect(url, service)
    counters = _counters(service)
    assert counters["retries_by_class"] == {"disconnect": 2}


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_a_raw_connect_that_times_out_is_a_disconnect(
    fault_proxy: FaultProxy, pg_database: str, driver: str
) -> None:
    """docs/units-of-work.md: "A connect that times out (asyncpg's ``timeout``, psycopg's
    ``connect_timeout``) is a disconnect". Raised by a driver's own connect (not the pool's),
    asyncpg's timed-out connect was no transient error: its ``TimeoutError`` comes from
    ``asyncpg.connection.connect``, which the classifier did not take for connecting."""
    fault_proxy.blackhole()  # accepts TCP, never answers
    url = fault_proxy.url(pg_database, driver="")

    def connect() -> object:
        if driver == "asyncpg":
            return asyncio.run(asyncpg.connect(url, timeout=0.3))
        return psycopg.connect(url, connect_timeout=1)

    with pytest.raises(Exception) as raised:  # noqa: PT011 (each driver's own class)
        connect()
    assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
    assert rdb.is_transient(raised.value)
