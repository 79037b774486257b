"""A retry the circuit breaker refuses (it opened while the unit backed off) is no retry: no
attempt of it ran. It is counted nowhere (``health()``, Prometheus, OpenTelemetry, the
dashboard's and every hook's ``retry`` events), and the retry budget's first attempts
(``attempts - retries``) stay the units started. A retry that does run is counted once, when
its attempt starts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._breaker import breakers
from resilient_db.metrics import HealthCollector
from resilient_db.otel import install_opentelemetry, uninstall_opentelemetry

pytestmark = pytest.mark.usefixtures("no_backoff")

CONFIG = rdb.Config(max_retries=3, failure_threshold=50, reset_timeout=30.0, retry_budget=0.5)


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    install_opentelemetry(meter_provider=provider)
    yield reader
    uninstall_opentelemetry()
    provider.shutdown()


def otel_retries(reader: InMemoryMetricReader, service: str) -> int:
    total = 0
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "resilient_db.retries":
                    for point in metric.data.data_points:
                        if dict(point.attributes or {}).get("service") == service:
                            total += int(point.value)  # type: ignore[union-attr]
    return total


def prometheus_retries(service: str) -> float:
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    value = registry.get_sample_value(
        "resilient_db_retries_total", {"service": service, "class": "conflict"}
    )
    return value or 0.0


def conflict(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('40001')"))  # a serialization failure


def entry(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]
    return found


def assert_no_retry_counted(
    service: str,
    events: list[rdb.SelfHealEvent],
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service_entry = entry(service)
    counters = service_entry["counters"]
    assert counters["attempts"] == 1
    assert counters["retries"] == 0
    assert counters["retries_by_class"] == {}
    assert counters["gave_up"] == 1
    assert service_entry["budget"]["first_attempts"] == 1  # one unit started
    assert prometheus_retries(service) == 0
    assert otel_retries(reader, service) == 0
    assert [e.name for e in events if e.name == "retry"] == []
    (gave_up,) = [e for e in events if e.name == "gave_up"]
    assert gave_up.fields["retries"] == 0
    assert gave_up.fields["circuit_opened"] is True
    # the lines: the retry announced (before its backoff), then refused after it
    messages = [r.getMessage() for r in caplog.records if "[SELF-HEAL]" in r.getMessage()]
    (announced,) = [m for m in messages if "Retry attempt 1/3" in m]
    (line,) = [m for m in messages if "Gave up" in m]
    assert messages.index(announced) < messages.index(line)
    assert "after 0 retries; the circuit breaker opened while it retried and refused retry 1" in (
        line
    )


def test_a_retry_the_breaker_refuses_is_not_counted_as_a_retry(
    engine: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_db")
    counted_while_backing_off: list[int] = []

    def opened_meanwhile(seconds: float) -> None:  # as other units' failures would open it
        counted_while_backing_off.append(entry(service)["counters"]["retries"])
        breakers()[service].open()

    Factory = rdb.ResilientSession(engine, service=service, config=CONFIG, sleep=opened_meanwhile)
    runs = {"n": 0}

    def unit(session: Session) -> None:
        runs["n"] += 1
        conflict(session)

    with pytest.raises(rdb.CircuitOpenError) as info:
        Factory.run(unit)
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)
    assert runs["n"] == 1  # the unit's body ran once: no retry ran
    assert counted_while_backing_off == [0]  # a retry is counted when it starts, not before
    assert_no_retry_counted(service, events, reader, caplog)


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")  # (installs raise_code in the test's database)
async def test_an_async_retry_the_breaker_refuses_is_not_counted_either(
    pg_async_url: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_db")

    async def opened_meanwhile(seconds: float) -> None:
        breakers()[service].open()

    async_engine: AsyncEngine = create_async_engine(pg_async_url)
    try:
        Factory = rdb.AsyncResilientSession(
            async_engine, service=service, config=CONFIG, asleep=opened_meanwhile
        )
        runs = {"n": 0}

        async def unit(session: AsyncSession) -> None:
            runs["n"] += 1
            await session.execute(sa.text("SELECT raise_code('40001')"))

        with pytest.raises(rdb.CircuitOpenError):
            await Factory.run(unit)
        assert runs["n"] == 1
        assert_no_retry_counted(service, events, reader, caplog)
    finally:
        await async_engine.dispose()


def test_retries_that_run_are_counted_once_each_when_they_start(
    engine: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
    reader: InMemoryMetricReader,
) -> None:
    """Counted when the breaker lets its attempt through, before it ends: a hook's ``retry``
    event sees it counted; every count agrees; the budget's first attempts are the units."""
    counted_at_event: list[int] = []

    def hook(event: rdb.SelfHealEvent) -> None:
        if event.name == "retry" and event.service == service:
            counted_at_event.append(entry(service)["counters"]["retries"])

    Factory = rdb.ResilientSession(engine, service=service, config=CONFIG)
    runs = {"n": 0}

    def flaky(session: Session) -> int:
        runs["n"] += 1
        if runs["n"] <= 2:
            conflict(session)
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    rdb.add_hook(hook)
    try:
        assert Factory.run(flaky) == 1
        assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    finally:
        rdb.remove_hook(hook)
    assert counted_at_event == [1, 2]
    service_entry = entry(service)
    counters = service_entry["counters"]
    assert (counters["attempts"], counters["retries"]) == (4, 2)
    assert counters["retries_by_class"] == {"conflict": 2}
    assert counters["recovered"] == 1
    assert service_entry["budget"]["first_attempts"] == 2  # two units started
    assert prometheus_retries(service) == 2
    assert otel_retries(reader, service) == 2
    assert [e.fields["attempt"] for e in events if e.name == "retry"] == [1, 2]
