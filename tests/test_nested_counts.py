"""A ``with_self_healing`` operation called inside a unit (or an operation) of its own service
runs once, its attempt part of the enclosing one, which the breaker let through: that one is
counted, once, as a unit or a drop-in connect run there is (an operation that does not replay,
``use_retry=False`` or run once inside another service's, included: its drop-in connect, which
retries on its own, counted an attempt of its own too). Before, the nested operation counted
an attempt of its own (``attempts`` doubled, and with it the retry budget's first attempts), a
pool timeout it met was counted (and its event sent) by both, and a partly committed failure had
two ``Not replaying`` lines, a lost COMMIT answer two ``partly_committed`` events (OpenTelemetry's
unknown commits counted twice against health()'s once). Real faults on a real server."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from scenarios import otel_points
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.metrics import HealthCollector
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")

Otel = tuple[Any, InMemorySpanExporter, InMemoryMetricReader]


def counters(service: str) -> dict[str, Any]:
    return dict(rdb.health()["services"][service]["counters"])


def prometheus(name: str, service: str) -> str:
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    prefix = f'{name}{{service="{service}"}} '
    (line,) = [x for x in generate_latest(registry).decode().splitlines() if x.startswith(prefix)]
    return line.removeprefix(prefix)


@pytest.fixture
def ledger(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ledger (id serial PRIMARY KEY, note text)"))
    rdb.install_commit_markers(engine)
    return engine


def test_a_helper_of_the_units_service_is_counted_in_the_units_attempts(
    engine: sa.Engine, service: str, otel: Otel
) -> None:
    _, _, reader = otel
    Sessions = rdb.ResilientSession(engine, service=service)
    left = [1]

    @rdb.with_self_healing(service=service)
    def helper(session: Session) -> int:
        if left:
            left.pop()
            session.execute(sa.text("SELECT raise_code('40001')"))
        return int(session.execute(sa.text("SELECT 7")).scalar_one())

    assert Sessions.run(helper) == 7
    found = counters(service)
    assert (found["attempts"], found["retries"], found["recovered"]) == (2, 1, 1)
    assert prometheus("resilient_db_attempts_total", service) == "2.0"
    assert otel_points(reader, "resilient_db.attempts")[(("service", service),)] == 2
    # the call form, inside an operation that replays: its attempts alone are counted
    assert rdb.with_self_healing(lambda: rdb.with_self_healing(lambda: 1, service=service)) == 1
    assert counters(service)["attempts"] == 3


@pytest.mark.asyncio
async def test_an_async_helper_of_the_units_service_is_counted_in_the_units_attempts(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    left = [1]

    @rdb.with_self_healing(service=service)
    async def helper(session: AsyncSession) -> int:
        if left:
            left.pop()
            await session.execute(sa.text("SELECT raise_code('40P01')"))
        return int((await session.execute(sa.text("SELECT 7"))).scalar_one())

    try:
        assert await Sessions.run(helper) == 7
    finally:
        await aengine.dispose()
    found = counters(service)
    assert (found["attempts"], found["retries"], found["recovered"]) == (2, 1, 1)


def test_a_pool_timeout_in_a_nested_operation_is_counted_once(
    pg_url: str, service: str, events: list[rdb.SelfHealEvent], otel: Otel
) -> None:
    """The unit holds the engine's one connection; the helper's drop-in session waits the
    whole pool_timeout for another: one wait, one count, one event."""
    _, _, reader = otel
    small = sa.create_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.05)
    Sessions = rdb.ResilientSession(small, service=service)

    @rdb.with_self_healing(service=service)
    def helper() -> None:
        with Sessions() as session:
            session.execute(sa.text("SELECT 1"))

    def unit(session: Session) -> None:
        session.execute(sa.text("SELECT 1"))
        helper()

    try:
        with pytest.raises(sa.exc.TimeoutError):
            Sessions.run(unit)
    finally:
        small.dispose()
    found = counters(service)
    assert (found["attempts"], found["pool_timeouts"]) == (1, 1)
    assert [e.name for e in events if e.name == "pool_timeout"] == ["pool_timeout"]
    assert prometheus("resilient_db_pool_timeouts_total", service) == "1.0"
    assert otel_points(reader, "resilient_db.pool.timeouts") == {(("service", service),): 1}


def test_a_nested_operations_lost_commit_answer_is_said_and_counted_once(
    ledger: sa.Engine,
    *,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
    otel: Otel,
) -> None:
    """The helper's drop-in block loses its COMMIT's answer: not replayed, an unknown outcome,
    said in one ERROR line and counted once everywhere."""
    _, _, reader = otel
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls: list[int] = []

    @rdb.with_self_healing(service=service)
    def helper() -> None:
        with Sessions.begin() as session:
            session.execute(sa.text("INSERT INTO ledger (note) VALUES ('helper')"))
            fault_proxy.lose_commit_answer()

    def unit(session: Session) -> None:
        calls.append(1)
        helper()

    caplog.set_level(logging.INFO, logger="resilient_db")
    try:
        with pytest.raises(sa.exc.OperationalError):
            Sessions.run(unit)
    finally:
        proxied.dispose()
    assert (calls, fault_proxy.commits_lost) == ([1], 1)
    lines = [r for r in caplog.records if r.getMessage().startswith("[SELF-HEAL] Not replaying")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.ERROR
    assert f"service={service} " in lines[0].getMessage()
    found = counters(service)
    assert (found["attempts"], found["unknown_commits"], found["retries"]) == (1, 1, 0)
    assert otel_points(reader, "resilient_db.commit.verifications") == {
        (("outcome", "unknown"), ("service", service)): 1
    }


def test_a_nested_operation_that_committed_part_of_its_work_is_said_once(
    ledger: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    Sessions = rdb.ResilientSession(ledger, service=service)

    @rdb.with_self_healing(service=service)
    def helper() -> None:
        with Sessions.begin() as session:
            session.execute(sa.text("INSERT INTO ledger (note) VALUES ('helper')"))
        with ledger.connect() as conn:
            conn.execute(sa.text("SELECT raise_code('40001')"))

    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(sa.exc.OperationalError) as raised:
        Sessions.run(lambda session: helper())
    assert rdb.sqlstate_of(raised.value) == "40001"
    said = [r.getMessage() for r in caplog.records if "Not replaying" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"[SELF-HEAL] Not replaying: service={service} the unit committed")
    with ledger.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar_one() == 1


#: no circuit breaker (every factory and operation of the environment's configuration), and a
#: retry budget whose first attempts are the units started
NO_BREAKER = {"SELF_HEALING_CIRCUIT_BREAKER": "false", "SELF_HEALING_RETRY_BUDGET": "0.5"}


def first_attempts(service: str) -> int:
    return int(rdb.health()["services"][service]["budget"]["first_attempts"])


def test_calls_nested_in_their_services_attempt_are_counted_once_without_a_breaker(
    pg_url: str, engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """With the breaker switched off, whether a nested call was of the enclosing attempt's
    service was judged by which breaker let that attempt through: none did, so each nested
    call counted an attempt of its own (a unit that made 2 attempts showed 4, and the retry
    budget 3 units started where 1 was). Judged by the service's name, they are counted once."""
    rdb.reload_config(NO_BREAKER)
    fresh = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)  # (each session connects)
    Sessions = rdb.ResilientSession(engine, service=service)
    Connecting = rdb.ResilientSession(fresh, service=service)
    left = [1]

    @rdb.with_self_healing(service=service)
    def helper(session: Session) -> int:
        if left:
            left.pop()
            session.execute(sa.text("SELECT raise_code('40001')"))
        return int(session.execute(sa.text("SELECT 7")).scalar_one())

    try:
        assert Sessions.run(helper) == 7  # a helper in a unit: 2 attempts, 1 retry
        assert Sessions.policy.breaker is None
        found = counters(service)
        assert (found["attempts"], found["retries"], found["recovered"]) == (2, 1, 1)
        assert first_attempts(service) == 1

        # an operation in an operation, a unit in an operation, a drop-in session's connect in
        # an operation: each one attempt
        nested = lambda: rdb.with_self_healing(lambda: 1, service=service)  # noqa: E731
        assert rdb.with_self_healing(nested, service=service) == 1
        assert rdb.with_self_healing(lambda: Sessions.run(lambda s: 1), service=service) == 1

        def drop_in() -> int:
            with Connecting() as session:
                return int(session.execute(sa.text("SELECT 1")).scalar_one())

        assert rdb.with_self_healing(drop_in, service=service) == 1
    finally:
        fresh.dispose()
    assert counters(service)["attempts"] == 5
    assert first_attempts(service) == 4


def test_operations_asking_no_breaker_nested_in_their_services_are_counted_once(
    engine: sa.Engine, service: str
) -> None:
    """``use_circuit_breaker=False``: an operation in an operation of its service counted its
    own attempt too, when the outer one asked no breaker either."""
    left = [1]

    def inner() -> int:
        if left:
            left.pop()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT raise_code('40001')"))
        return 1

    def outer() -> int:
        return int(rdb.with_self_healing(inner, service=service, use_circuit_breaker=False))

    assert rdb.with_self_healing(outer, service=service, use_circuit_breaker=False) == 1
    found = counters(service)
    assert (found["attempts"], found["retries"], found["recovered"]) == (2, 1, 1)
    # another service's operation is not part of it: counted apart
    other = f"{service}-other"
    nested = lambda: rdb.with_self_healing(lambda: 2, service=other, use_circuit_breaker=False)  # noqa: E731
    assert rdb.with_self_healing(nested, service=service, use_circuit_breaker=False) == 2
    assert (counters(service)["attempts"], counters(other)["attempts"]) == (3, 1)


@pytest.mark.asyncio
async def test_async_calls_nested_in_their_services_attempt_are_counted_once_without_a_breaker(
    engine: sa.Engine, pg_async_url: str, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    rdb.reload_config(NO_BREAKER)
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    left = [1]

    @rdb.with_self_healing(service=service)
    async def helper(session: AsyncSession) -> int:
        if left:
            left.pop()
            await session.execute(sa.text("SELECT raise_code('40P01')"))
        return int((await session.execute(sa.text("SELECT 7"))).scalar_one())

    async def one(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    try:
        assert await Sessions.run(helper) == 7
        found = counters(service)
        assert (found["attempts"], found["retries"], found["recovered"]) == (2, 1, 1)
        assert first_attempts(service) == 1
        # a unit in an operation: one attempt
        assert await rdb.with_self_healing(lambda: Sessions.run(one), service=service) == 1
    finally:
        await aengine.dispose()
    assert counters(service)["attempts"] == 3
    assert first_attempts(service) == 2


@pytest.mark.parametrize("refused", [False, True], ids=["connects", "refused"])
def test_a_drop_in_connect_in_an_operation_that_does_not_replay_is_part_of_its_attempt(
    refused: bool,
    *,
    engine: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    otel: Otel,
) -> None:
    """``use_retry=False``: the operation runs once and its drop-in session's connect retries
    on its own. Its first try is the operation's attempt, counted once (it counted 2 for one
    operation); each retry of it is an attempt (a connect refused twice, then given up: 3, not
    4). Alike in health(), Prometheus and OpenTelemetry."""
    _, _, reader = otel
    config = rdb.Config(max_retries=2, failure_threshold=100)
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Connecting = rdb.ResilientSession(proxied, service=service, config=config)

    @rdb.with_self_healing(service=service, use_retry=False, config=config)
    def operation() -> int:
        with Connecting() as session:
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

    if refused:
        fault_proxy.refuse()
    try:
        if refused:
            with pytest.raises(sa.exc.OperationalError):
                operation()
        else:
            assert operation() == 1
    finally:
        fault_proxy.restore()
        proxied.dispose()
    found = counters(service)
    expected = (3, 2, 1) if refused else (1, 0, 0)
    assert (found["attempts"], found["retries"], found["gave_up"]) == expected
    assert prometheus("resilient_db_attempts_total", service) == f"{expected[0]}.0"
    assert otel_points(reader, "resilient_db.attempts")[(("service", service),)] == expected[0]


def test_a_drop_in_connect_in_an_operation_run_once_in_another_services_is_counted_once(
    pg_url: str, engine: sa.Engine, service: str
) -> None:
    """An operation of service A inside one of service B runs once; its drop-in session of
    service A connects: one attempt of A (it counted 2), one of B."""
    inner_service, outer_service = f"{service}-a", f"{service}-b"
    fresh = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)  # (each session connects)
    Connecting = rdb.ResilientSession(fresh, service=inner_service)

    @rdb.with_self_healing(service=inner_service)
    def inner() -> int:
        with Connecting() as session:
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

    try:
        assert rdb.with_self_healing(inner, service=outer_service) == 1
    finally:
        fresh.dispose()
    assert (counters(inner_service)["attempts"], counters(outer_service)["attempts"]) == (1, 1)
