"""A pool timeout (SQLAlchemy's pool ``TimeoutError``: every connection of the engine's pool in
use for the whole ``pool_timeout``) is said as the other self-healing actions are: a
``[SELF-HEAL]`` WARNING naming the service, rate-limited (under load every waiting unit times
out, many a second), a ``pool_timeout`` hook event for each, and the OpenTelemetry counter
``resilient_db.pool.timeouts``, counting what ``health()`` and Prometheus count. A real pool of
one connection, held by a unit that waits on the database (an advisory lock the test holds)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from scenarios import otel_points, waiting_on_lock
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _retry
from resilient_db._state import STATE
from resilient_db.metrics import HealthCollector

pytestmark = pytest.mark.usefixtures("no_backoff")

#: the advisory lock the unit holding the pool's only connection waits for
LOCK_KEY = 4_242_017


def test_a_pool_timeout_is_logged_rate_limited_and_counted_in_otel(
    pg_url: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    tracer, spans, reader = otel
    caplog.set_level(logging.WARNING, logger="resilient_db")
    direct = sa.create_engine(pg_url)
    one = sa.create_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    Sessions = rdb.ResilientSession(one, service=service)
    events: list[rdb.SelfHealEvent] = []
    rdb.add_hook(events.append)

    def held(session: Session) -> int:
        session.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        return 1

    holder = direct.connect()
    holder.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
    holding = threading.Thread(target=Sessions.run, args=(held,))
    try:
        holding.start()
        for _ in range(1000):  # bounded: the pool's only connection waits on the database
            if waiting_on_lock(direct, LOCK_KEY) == 1:
                break
            threading.Event().wait(0.01)
        assert waiting_on_lock(direct, LOCK_KEY) == 1
        with tracer.start_as_current_span("request"):
            for _ in range(3):
                with pytest.raises(sa.exc.TimeoutError):
                    Sessions.run(lambda s: s.scalar(sa.text("SELECT 1")))
        # a new period: the next line says how many the last one left unlogged
        _retry._POOL_LINES.restart((service, STATE.generation))
        with pytest.raises(sa.exc.TimeoutError):
            Sessions.run(lambda s: s.scalar(sa.text("SELECT 1")))
    finally:
        holder.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
        holder.close()
        holding.join(30)
        rdb.remove_hook(events.append)
    assert Sessions.run(lambda s: s.scalar(sa.text("SELECT 1"))) == 1  # the connection is back

    lines = [r for r in caplog.records if "Connection pool timed out" in r.getMessage()]
    assert [line.levelno for line in lines] == [logging.WARNING] * 2
    first, second = (line.getMessage() for line in lines)
    assert first.startswith(f"[SELF-HEAL] Connection pool timed out: service={service} ")
    assert first.endswith("not retried, raising it")  # the first folds none
    assert "more since" not in first
    assert second.endswith("(2 more since the last line)")
    assert "QueuePool" not in first  # nothing of the engine's configuration
    assert lines[0].self_heal["event"] == "pool_timeout"  # type: ignore[attr-defined]
    timeouts = [e for e in events if e.name == "pool_timeout"]
    assert len(timeouts) == 4  # every occurrence reaches the hooks
    assert {e.service for e in timeouts} == {service}
    assert timeouts[0].fields["error"] == "TimeoutError"

    counters = rdb.health()["services"][service]["counters"]
    assert counters["pool_timeouts"] == 4
    assert otel_points(reader, "resilient_db.pool.timeouts") == {(("service", service),): 4}
    assert (
        otel_points(reader, "resilient_db.events")[
            (("event", "pool_timeout"), ("service", service))
        ]
        == 4
    )
    (request,) = [s for s in spans.get_finished_spans() if s.name == "request"]
    assert [e.name for e in request.events] == ["resilient_db.pool_timeout"] * 3
    assert request.events[0].attributes["resilient_db.service"] == service  # type: ignore[index]
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    exposition = generate_latest(registry).decode()
    assert f'resilient_db_pool_timeouts_total{{service="{service}"}} 4.0' in exposition
    direct.dispose()
    one.dispose()
