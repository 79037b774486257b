"""A COMMIT of an operation's own code (a drop-in block inside ``with_self_healing``) whose
answer was lost is one unknown outcome, and every channel counts it once: ``health()`` and
Prometheus (``unknown_commits``), the hooks and OpenTelemetry
(``resilient_db.commit.verifications{outcome="unknown"}``), the dashboard's events, and an
ERROR ``[SELF-HEAL]`` line. Before, an operation of another service around it said it again
(OpenTelemetry counted two unknown outcomes against health()'s one), and code that caught the
error and went on had it counted in health() and Prometheus only: no line, no event. Real
lost answers through the fault proxy, on a real server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from scenarios import otel_points
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db as rdb
from resilient_db.metrics import HealthCollector
from resilient_db.testing import FaultProxy
from resilient_db.web._recorder import Recorder

pytestmark = pytest.mark.usefixtures("no_backoff")

Otel = tuple[Any, InMemorySpanExporter, InMemoryMetricReader]


@pytest.fixture
def ledger(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ledger (id serial PRIMARY KEY, note text)"))
    rdb.install_commit_markers(engine)
    return engine


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    """The dashboard's recorder, fed by the hooks."""
    found = Recorder()
    rdb.add_hook(found)
    yield found
    rdb.remove_hook(found)


def unknown_everywhere(
    service: str, reader: InMemoryMetricReader, recorder: Recorder
) -> dict[str, Any]:
    """The unknown outcomes each channel counts for ``service``."""
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    prefix = f'resilient_db_commit_outcome_unknown_total{{service="{service}"}} '
    (line,) = [x for x in generate_latest(registry).decode().splitlines() if x.startswith(prefix)]
    points = otel_points(reader, "resilient_db.commit.verifications")
    # the dashboard's events of an unknown outcome: commit_unknown, and partly_committed
    # saying its own COMMIT's outcome is unknown
    said = [
        e
        for e in recorder.snapshot()["events"]
        if e["service"] == service
        and (
            e["name"] == "commit_unknown"
            or (e["name"] == "partly_committed" and e["fields"].get("outcome") == "commit-unknown")
        )
    ]
    return {
        "health": rdb.health()["services"][service]["counters"]["unknown_commits"],
        "prometheus": float(line.removeprefix(prefix)),
        "otel": points.get((("outcome", "unknown"), ("service", service)), 0),
        "dashboard": len(said),
    }


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("[SELF-HEAL]") and r.levelno >= logging.ERROR
    ]


def test_a_lost_answer_in_an_operation_of_another_service_is_counted_once_everywhere(
    ledger: sa.Engine,
    *,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    otel: Otel,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operation of service A inside one of service B: A's drop-in COMMIT loses its answer,
    the error leaves both. A says it (its line, its event); B, failing with that same error,
    does not say it again."""
    _, _, reader = otel
    inner_service, outer_service = f"{service}-a", f"{service}-b"
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=inner_service)

    @rdb.with_self_healing(service=inner_service)
    def inner() -> None:
        with Sessions.begin() as session:
            session.execute(sa.text("INSERT INTO ledger (note) VALUES ('inner')"))
            fault_proxy.lose_commit_answer()

    @rdb.with_self_healing(service=outer_service)
    def outer() -> None:
        inner()

    caplog.set_level(logging.INFO, logger="resilient_db")
    try:
        with pytest.raises(sa.exc.OperationalError):
            outer()
    finally:
        proxied.dispose()
    assert fault_proxy.commits_lost == 1
    assert unknown_everywhere(inner_service, reader, recorder) == {
        "health": 1,
        "prometheus": 1.0,
        "otel": 1,
        "dashboard": 1,
    }
    assert unknown_everywhere(outer_service, reader, recorder) == {
        "health": 0,
        "prometheus": 0.0,
        "otel": 0,
        "dashboard": 0,
    }
    (line,) = error_lines(caplog)
    assert f"service={inner_service} " in line


@pytest.mark.parametrize("then", ["returns", "raises another error"])
def test_a_lost_answer_the_code_caught_is_said_and_counted_once_everywhere(
    then: str,
    *,
    ledger: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    otel: Otel,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The operation's code catches the error of its drop-in COMMIT whose answer was lost and
    goes on: the outcome is unknown all the same, said in an ERROR line (``commit_unknown``)
    when the attempt ends, and counted once in every channel."""
    _, _, reader = otel
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls: list[int] = []

    @rdb.with_self_healing(service=service)
    def operation() -> int:
        calls.append(1)
        try:
            with Sessions.begin() as session:
                session.execute(sa.text("INSERT INTO ledger (note) VALUES ('op')"))
                fault_proxy.lose_commit_answer()
        except sa.exc.OperationalError:
            if then != "returns":
                raise ValueError("the code's own error") from None
        return 7

    caplog.set_level(logging.INFO, logger="resilient_db")
    try:
        if then == "returns":
            assert operation() == 7
        else:
            with pytest.raises(ValueError, match="the code's own error"):
                operation()
    finally:
        proxied.dispose()
    assert (calls, fault_proxy.commits_lost) == ([1], 1)
    assert unknown_everywhere(service, reader, recorder) == {
        "health": 1,
        "prometheus": 1.0,
        "otel": 1,
        "dashboard": 1,
    }
    (line,) = error_lines(caplog)
    assert line.startswith(f"[SELF-HEAL] Commit outcome unknown: service={service} "), line


def test_two_lost_answers_the_code_caught_in_one_attempt_are_each_said_and_counted_once(
    ledger: sa.Engine,
    *,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    otel: Otel,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two drop-in blocks of one operation attempt each lose their COMMIT's answer, the code
    catching both: two unknown outcomes, each said (``commit_unknown``) and counted once in
    every channel when the attempt ends; the operation is never called again, each row
    written once."""
    _, _, reader = otel
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls: list[int] = []

    @rdb.with_self_healing(service=service)
    def operation() -> int:
        calls.append(1)
        for note in ("one", "two"):
            try:
                with Sessions.begin() as session:
                    session.execute(sa.text("INSERT INTO ledger (note) VALUES (:n)"), {"n": note})
                    fault_proxy.lose_commit_answer()
            except sa.exc.OperationalError:
                pass
        return 7

    caplog.set_level(logging.INFO, logger="resilient_db")
    try:
        assert operation() == 7
    finally:
        proxied.dispose()
    assert (calls, fault_proxy.commits_lost) == ([1], 2)
    assert unknown_everywhere(service, reader, recorder) == {
        "health": 2,
        "prometheus": 2.0,
        "otel": 2,
        "dashboard": 2,
    }
    lines = error_lines(caplog)
    assert len(lines) == 2, lines
    assert all(
        x.startswith(f"[SELF-HEAL] Commit outcome unknown: service={service} ") for x in lines
    )
    with ledger.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT note, count(*) FROM ledger GROUP BY note ORDER BY note")
        )
        assert [tuple(row) for row in rows] == [("one", 1), ("two", 1)]


@pytest.mark.asyncio
async def test_an_async_operations_caught_lost_answer_is_said_and_counted_once(
    ledger: sa.Engine,
    *,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    otel: Otel,
    recorder: Recorder,
) -> None:
    _, _, reader = otel
    proxied = create_async_engine(fault_proxy.url(pg_database, driver="asyncpg"))
    Sessions = rdb.AsyncResilientSession(proxied, service=service)

    @rdb.with_self_healing(service=service)
    async def operation() -> int:
        try:
            async with Sessions.begin() as session:
                await session.execute(sa.text("INSERT INTO ledger (note) VALUES ('op')"))
                fault_proxy.lose_commit_answer()
        except sa.exc.DBAPIError:
            pass
        return 7

    try:
        assert await operation() == 7
    finally:
        await proxied.dispose()
    assert fault_proxy.commits_lost == 1
    assert unknown_everywhere(service, reader, recorder) == {
        "health": 1,
        "prometheus": 1.0,
        "otel": 1,
        "dashboard": 1,
    }
