"""OpenTelemetry through the public hook API, with the SDK's in-memory span exporter and metric
reader: retries, breaker transitions, commit verifications and blocked transitions from real units
on a real server become span events on the current span and counts on OTel counters."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import Gate, fleet, open_the_fleets_breaker, opener_settings, shared
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from processes import wait_for
from prometheus_client import CollectorRegistry, generate_latest
from scenarios import (
    RAISE_CODE_FUNCTION,
    first_attempt_raises,
    held_and_released,
    otel_points,
    refuse_moves_every_way,
)
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._observability import PREFIX
from resilient_db.examples.tasks import Base, Task, create_task, move_task
from resilient_db.metrics import HealthCollector, register
from resilient_db.otel import install_opentelemetry, uninstall_opentelemetry
from resilient_db.testing import FaultProxy, RedisServer
from resilient_db.web._recorder import NO_SERVICE, Recorder

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    rdb.install_commit_markers(eng)
    with eng.begin() as conn:
        conn.execute(RAISE_CODE_FUNCTION)
    yield eng
    eng.dispose()


def test_retries_and_breaker_transitions_as_span_events_and_counters(
    engine: sa.Engine, otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader], service: str
) -> None:
    tracer, spans, reader = otel
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=2, failure_threshold=3)
    )
    flaky, _calls = first_attempt_raises("40P01", 7)

    with tracer.start_as_current_span("GET /tasks"):
        assert Sessions.run(flaky) == 7
    with tracer.start_as_current_span("GET /outage"), contextlib.suppress(sa.exc.DBAPIError):
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    request, outage = spans.get_finished_spans()
    assert [e.name for e in request.events] == ["resilient_db.retry", "resilient_db.recovered"]
    retry = request.events[0].attributes
    assert retry is not None
    assert retry["resilient_db.service"] == service
    assert retry["resilient_db.sqlstate"] == "40P01"
    assert retry["resilient_db.outcome"] == "conflict"
    assert str(retry["resilient_db.message"]).startswith("Retry attempt 1/2")
    assert [e.name for e in outage.events] == [
        "resilient_db.retry",
        "resilient_db.retry",
        "resilient_db.breaker_opened",
        "resilient_db.gave_up",
    ]
    assert otel_points(reader, "resilient_db.retries") == {
        (("outcome", "conflict"), ("service", service), ("sqlstate", "40P01")): 1,
        (("outcome", "unavailable"), ("service", service), ("sqlstate", "57P03")): 2,
    }
    assert otel_points(reader, "resilient_db.breaker.transitions") == {
        (("opened_here", True), ("service", service), ("state", "open")): 1
    }
    events = otel_points(reader, "resilient_db.events")
    assert events[(("event", "gave_up"), ("service", service))] == 1
    assert events[(("event", "recovered"), ("service", service))] == 1


def test_rejected_calls_count_alike_in_health_and_otel(
    engine: sa.Engine, otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader], service: str
) -> None:
    """The rejections' event goes with their rate-limited line, not with each call: the
    counter is read from health() when the meter collects, so it counts every call."""
    _tracer, _spans, reader = otel
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=0, failure_threshold=1)
    )
    with contextlib.suppress(sa.exc.DBAPIError):
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    for _ in range(5):
        with pytest.raises(rdb.CircuitOpenError):
            Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))
    rejected = rdb.health()["services"][service]["counters"]["breaker_rejections"]
    assert rejected == 5
    counted = otel_points(reader, "resilient_db.breaker.rejections")
    assert counted[(("service", service),)] == 5


def test_attempts_are_read_from_health_so_a_retry_ratio_needs_otel_only(
    engine: sa.Engine, otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader], service: str
) -> None:
    """``resilient_db.retries`` over ``resilient_db.attempts`` is the retry ratio, as
    Prometheus's ``resilient_db_retries_total`` over ``resilient_db_attempts_total`` is (before:
    no attempts in OTel). Read from health() as the meter collects: a unit that succeeds at
    once sends no event, and counts."""
    _tracer, _spans, reader = otel
    Sessions = rdb.ResilientSession(engine, service=service)
    flaky, _calls = first_attempt_raises("40001")

    assert Sessions.run(flaky) == 1
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    counters = rdb.health()["services"][service]["counters"]
    assert (counters["attempts"], counters["retries"]) == (3, 1)
    assert prometheus("resilient_db_attempts_total", service) == 3.0
    assert otel_points(reader, "resilient_db.attempts")[(("service", service),)] == 3
    retries = otel_points(reader, "resilient_db.retries")
    assert sum(n for key, n in retries.items() if ("service", service) in key) == 1
    uninstall_opentelemetry()  # a meter keeps its instruments: nothing read once uninstalled
    assert (("service", service),) not in otel_points(reader, "resilient_db.attempts")


def test_installed_again_on_the_same_provider_every_instrument_reports(
    engine: sa.Engine,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Uninstalled and installed again on the same meter provider (or back from another one):
    the instruments read from health() report for the new hook. Before: the provider's meter
    kept the first hook's observable instruments, whose callbacks observe nothing once it is
    uninstalled, so attempts and the breaker's state and rejections went silent, unsaid."""
    _tracer, _spans, reader = otel
    provider = install_opentelemetry().meter_provider  # (the fixture's hook, installed)
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
    uninstall_opentelemetry()
    install_opentelemetry(meter_provider=provider)
    other = MeterProvider(metric_readers=[InMemoryMetricReader()])
    install_opentelemetry(meter_provider=other)  # to another provider and back
    with caplog.at_level(logging.WARNING, logger="opentelemetry"):
        install_opentelemetry(meter_provider=provider)
    other.shutdown()
    flaky, _calls = first_attempt_raises("40001")

    assert Sessions.run(flaky) == 1
    assert otel_points(reader, "resilient_db.attempts")[(("service", service),)] == 3
    assert otel_points(reader, "resilient_db.breaker.rejections")[(("service", service),)] == 0
    states = otel_points(reader, "resilient_db.breaker.state")
    assert states[(("service", service), ("state", "closed"))] == 1
    retries = otel_points(reader, "resilient_db.retries")
    assert sum(n for key, n in retries.items() if ("service", service) in key) == 1
    # the meter's instruments are made once: no "created already" warnings of the SDK
    assert not [r for r in caplog.records if "created already" in r.getMessage()]


def test_the_breakers_current_state_is_a_gauge_as_in_prometheus(
    engine: sa.Engine, otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader], service: str
) -> None:
    """An alert on an open breaker needs its state now: Prometheus has it
    (``resilient_db_breaker_state``), and OpenTelemetry the same, read from health() as the
    meter collects, not only the transitions counter (whose aggregated points can't say which
    state a breaker is in)."""
    _tracer, _spans, reader = otel
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=0, failure_threshold=1)
    )
    Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))

    def states() -> dict[str, int]:
        points = otel_points(reader, "resilient_db.breaker.state")
        return {dict(k)["state"]: v for k, v in points.items() if dict(k)["service"] == service}

    assert states() == {"closed": 1, "open": 0, "half_open": 0, "off": 0}
    with contextlib.suppress(sa.exc.DBAPIError):
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    assert states() == {"closed": 0, "open": 1, "half_open": 0, "off": 0}


def test_commit_verification_and_blocked_transitions(
    engine: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
    service: str,
) -> None:
    tracer, spans, reader = otel
    rdb.install_transition_trigger(engine, Task)
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service, config=rdb.Config())

    def create(session: Session) -> int:
        task = create_task(session, title="t", idem_key=str(uuid.uuid4()))
        session.flush()
        return task.id

    fault_proxy.lose_commit_answer()
    with tracer.start_as_current_span("POST /tasks"):
        task_id = Sessions.run(create)  # committed, answer lost: verified, not replayed

    def finish(session: Session) -> None:
        task = session.get(Task, task_id)
        assert task is not None
        move_task(session, task, "completed", idem_key=str(uuid.uuid4()))
        session.flush()

    with (
        tracer.start_as_current_span("POST /tasks/1/completed"),
        pytest.raises(rdb.IllegalTransitionError),
    ):
        Sessions.run(finish)
    proxied.dispose()
    created, finished = spans.get_finished_spans()
    assert "resilient_db.commit_verified" in [e.name for e in created.events]
    (blocked,) = [e for e in finished.events if e.name == "resilient_db.transition_blocked"]
    assert blocked.attributes is not None
    assert blocked.attributes["resilient_db.via"] == "flush"
    assert blocked.attributes["resilient_db.to_state"] == "completed"
    assert "resilient_db.pk" not in blocked.attributes  # row keys only when opted in
    assert otel_points(reader, "resilient_db.commit.verifications") == {
        (("outcome", "committed"), ("service", service)): 1
    }
    assert otel_points(reader, "resilient_db.transitions.blocked") == {
        (("model", "Task"), ("via", "flush")): 1
    }


def test_install_is_idempotent_and_uninstall_stops_it(
    engine: sa.Engine, otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader], service: str
) -> None:
    tracer, spans, _ = otel
    first = install_opentelemetry()  # again, no provider given: the installed hook
    assert install_opentelemetry() is first
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    flaky, calls = first_attempt_raises("40001", None)

    with tracer.start_as_current_span("once"):
        Sessions.run(flaky)
    (span,) = spans.get_finished_spans()
    assert [e.name for e in span.events].count("resilient_db.retry") == 1  # one hook, not two
    uninstall_opentelemetry()
    calls.clear()
    with tracer.start_as_current_span("after"):
        Sessions.run(flaky)
    assert spans.get_finished_spans()[-1].events == ()


def test_registering_the_prometheus_collector_again_reports_each_series_once() -> None:
    """Registered twice (two modules of an application each calling register()), every series
    was exported twice, which the OpenMetrics parser refuses ("Clashing name")."""
    registry = CollectorRegistry()
    collector = register(registry)
    assert register(registry) is collector
    text = generate_latest(registry).decode()
    assert [line for line in text.splitlines() if line.startswith("resilient_db_healthy ")] == [
        "resilient_db_healthy 1.0"
    ]
    registry.unregister(collector)  # the application took it out: registered again
    assert register(registry) is collector
    assert registry.get_sample_value("resilient_db_healthy") == 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(HealthCollector())  # another of the same metrics: refused


def prometheus(name: str, service: str | None = None) -> float:
    """The value the Prometheus collector exports for ``name`` (read from ``health()``)."""
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    value = registry.get_sample_value(name, {"service": service} if service else None)
    assert value is not None, name
    return value


def test_a_replaced_pool_counts_alike_in_health_prometheus_and_otel(
    engine: sa.Engine,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server ends a unit's connection with 57P01 (a shutdown, ``pg_terminate_backend``),
    which SQLAlchemy does not take for a lost connection: the pool's connections are replaced,
    said in a line and an event, and counted, as every other self-healing action is, in
    ``health()``, Prometheus and OpenTelemetry (a failover's replaced pools were in the logs
    only)."""
    _tracer, _spans, reader = otel
    caplog.set_level(logging.INFO, logger="resilient_db")
    Sessions = rdb.ResilientSession(engine, service=service)
    ended_once, _calls = first_attempt_raises("57P01")

    assert Sessions.run(ended_once) == 1
    (line,) = [r for r in caplog.records if "Replacing the pooled connections" in r.getMessage()]
    assert f"service={service} " in line.getMessage()
    counters = rdb.health()["services"][service]["counters"]
    assert counters["pool_invalidations"] == 1
    assert counters["retries"] == counters["recovered"] == 1
    assert prometheus("resilient_db_pool_invalidations_total", service) == 1.0
    assert otel_points(reader, "resilient_db.pool.invalidations") == {
        (("service", service), ("sqlstate", "57P01")): 1
    }


def test_a_dead_pooled_connection_counts_alike_in_health_prometheus_and_otel(
    engine: sa.Engine,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
    service: str,
    pg_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pooled connection whose backend was ended (``pg_terminate_backend``, as a restart or a
    failover ends them) is found dead at checkout and replaced: its line and event had no
    figure, so pool churn from killed backends showed in no metric. Counted where one is found
    only: the units on live connections count nothing."""
    _tracer, _spans, reader = otel
    caplog.set_level(logging.INFO, logger="resilient_db")
    Sessions = rdb.ResilientSession(engine, service=service)
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    assert pg_server.terminate_backends(database=engine.url.database) >= 1
    for _ in range(3):
        assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    lines = [r for r in caplog.records if "Discarded a dead pooled connection" in r.getMessage()]
    assert len(lines) == 1
    counters = rdb.health()["services"][service]["counters"]
    assert counters["dead_pooled_connections"] == 1
    assert counters["retries"] == counters["gave_up"] == 0  # (replaced before the unit ran)
    assert prometheus("resilient_db_dead_pooled_connections_total", service) == 1.0
    assert otel_points(reader, "resilient_db.pool.dead_connections") == {(("service", service),): 1}


def test_blocked_transitions_count_rows_alike_in_health_prometheus_and_otel(
    engine: sa.Engine, otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader], service: str
) -> None:
    """One meaning everywhere: a row whose illegal move was refused. A filtered bulk UPDATE
    that leaves four rows unchanged counts four (as filtered and as blocked), one by primary
    key one per parameter set skipped, a bulk UPDATE refused in raise mode the rows it names,
    a flush one; a stale move is counted apart, never as blocked."""
    _, _, reader = otel
    refuse_moves_every_way(engine, service)

    filtered, blocked = 4 + 1, 4 + 1 + 4 + 1
    transitions = rdb.health()["transitions"]
    assert transitions["bulk_rows_filtered"] == filtered
    assert transitions["blocked_transitions"] == blocked
    assert transitions["stale_transitions"] == 1
    assert prometheus("resilient_db_transition_rows_filtered_total") == filtered
    assert prometheus("resilient_db_transitions_blocked_total") == blocked
    assert prometheus("resilient_db_transitions_stale_total") == 1
    assert otel_points(reader, "resilient_db.transitions.blocked") == {
        (("model", "Task"), ("via", "orm-update")): blocked - 1,
        (("model", "Task"), ("via", "flush")): 1,
    }
    assert otel_points(reader, "resilient_db.transitions.stale") == {
        (("model", "Task"), ("via", "flush")): 1
    }


def test_validation_failures_count_alike_in_health_prometheus_and_otel(
    engine: sa.Engine, otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader], service: str
) -> None:
    _, _, reader = otel
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config())

    def positive(value: int) -> bool:
        return value > 0

    assert Sessions.run(lambda s: 1, validate=positive) == 1
    for bad in (0, -1):
        with pytest.raises(rdb.ResponseValidationError):
            Sessions.run(lambda s, bad=bad: bad, validate=positive)
    assert rdb.health()["services"][service]["counters"]["response_validation_failures"] == 2
    assert prometheus("resilient_db_response_validation_failures_total", service) == 2
    name = positive.__qualname__
    assert otel_points(reader, "resilient_db.response_validation.failures") == {
        (("service", service), ("validator", name)): 2
    }


@pytest.mark.parametrize("call", ["register", "serve"])
def test_prometheus_without_its_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Without prometheus_client, both entry points say which extra to install (``register()``
    raised importlib's bare ModuleNotFoundError)."""
    import sys  # noqa: PLC0415

    from resilient_db import metrics  # noqa: PLC0415

    for name in [m for m in sys.modules if m == "prometheus_client" or m.startswith("prometheus_")]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'resilient-db\[prometheus\]'"):
        metrics.register() if call == "register" else metrics.serve(0)


def test_an_interrupted_commit_of_unknown_outcome_counts_as_unknown(
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader], service: str
) -> None:
    """The ``commit_interrupted`` event (a unit cancelled with its COMMIT in flight: see
    tests/test_commit_interrupted.py for the real fault) is an unknown outcome, as health()'s
    ``unknown_commits`` counts it; one interrupted after its COMMIT succeeded is none."""
    from resilient_db._observability import emit  # noqa: PLC0415
    from resilient_db._unit import log_session  # noqa: PLC0415

    _, _, reader = otel
    for outcome in ("unknown", "committed"):
        emit(
            rdb.Config(),
            log_session,
            logging.ERROR,
            "Commit interrupted: service=%s",
            service,
            service=service,
            event="commit_interrupted",
            outcome=outcome,
        )
    assert otel_points(reader, "resilient_db.commit.verifications") == {
        (("outcome", "unknown"), ("service", service)): 1
    }


def test_a_lost_commit_verified_not_committed_is_counted_once_everywhere(
    engine: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
    service: str,
) -> None:
    """A COMMIT swallowed on its way, then its connection dropped: the check on a new
    connection finds no marker ("Commit outcome verified: ... did not commit; it may be run
    again") and the unit runs again. health(), Prometheus, OpenTelemetry and the hook count that
    verification once each, apart from the verified commits."""
    _, _, reader = otel
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service, config=rdb.Config())
    key = str(uuid.uuid4())
    calls: list[int] = []

    def create(session: Session) -> int:
        calls.append(1)
        task = create_task(session, title="t", idem_key=key)
        session.flush()
        return task.id

    events: list[rdb.SelfHealEvent] = []
    rdb.add_hook(events.append)
    fault_proxy.swallow_commit()
    releaser = held_and_released(fault_proxy)  # the COMMIT never reaches the server
    try:
        Sessions.run(create)
    finally:
        rdb.remove_hook(events.append)
    releaser.join()
    proxied.dispose()
    assert (fault_proxy.commits_swallowed, len(calls)) == (1, 2)  # not committed: run again
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(Task.idem_key == key)).scalar() == 1
    assert [e.name for e in events if e.name.startswith("commit_")] == ["commit_not_applied"]
    counters = rdb.health()["services"][service]["counters"]
    assert (counters["verified_not_committed"], counters["verified_commits"]) == (1, 0)
    exposition = generate_latest(registry).decode()
    labels = f'{{service="{service}"}}'
    assert f"resilient_db_commits_verified_not_committed_total{labels} 1.0" in exposition
    assert f"resilient_db_commits_verified_total{labels} 0.0" in exposition
    assert otel_points(reader, "resilient_db.commit.verifications") == {
        (("outcome", "not_committed"), ("service", service)): 1
    }


def lose_own_commit(fault_proxy: FaultProxy, pg_database: str, service: str, where: str) -> None:
    """A COMMIT of the code's own loses its answer: a drop-in block's inside a
    ``with_self_healing`` operation (``where="operation"``), or a unit's own
    ``session.commit()`` (``"unit"``: without the commit markers, whose claim would settle it;
    ``"unit_marked"``: with them); the driver's error is raised."""
    if where == "unit":
        direct = sa.create_engine(fault_proxy.url(pg_database))
        try:
            rdb.uninstall_commit_markers(direct)
        finally:
            direct.dispose()
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service, config=rdb.Config())

    def write(session: Session) -> None:
        create_task(session, title="t", idem_key=str(uuid.uuid4()))
        session.flush()
        fault_proxy.lose_commit_answer()

    @rdb.with_self_healing(service=service)
    def operation() -> None:
        with Sessions.begin() as session:
            write(session)

    def unit(session: Session) -> None:
        write(session)
        session.commit()

    try:
        with pytest.raises(sa.exc.OperationalError):
            operation() if where == "operation" else Sessions.run(unit)
    finally:
        proxied.dispose()
    assert fault_proxy.commits_lost == 1


@pytest.mark.parametrize("where", ["operation", "unit"])
def test_an_own_commit_whose_answer_was_lost_counts_as_unknown_everywhere(
    where: str,
    *,
    engine: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
    service: str,
) -> None:
    """A COMMIT of the code's own (a drop-in block inside a ``with_self_healing`` operation, a
    unit's own ``session.commit()`` without the commit markers) loses its answer: not
    replayed, an unknown outcome.
    health() and Prometheus counted it in ``unknown_commits``; OpenTelemetry's
    ``resilient_db.commit.verifications{outcome="unknown"}`` did not (its one event is
    ``partly_committed``, not ``commit_unknown``)."""
    _, _, reader = otel
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    lose_own_commit(fault_proxy, pg_database, service, where)
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 1
    exposition = generate_latest(registry).decode()
    assert f'resilient_db_commit_outcome_unknown_total{{service="{service}"}} 1.0' in exposition
    assert otel_points(reader, "resilient_db.commit.verifications") == {
        (("outcome", "unknown"), ("service", service)): 1
    }


def test_a_units_own_commit_whose_lost_answer_its_marker_settles_counts_as_verified(
    engine: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
    service: str,
) -> None:
    """With the commit markers a unit's own ``session.commit()`` carries a marker, and the
    claim settles its lost answer: committed, counted as a verified commit everywhere, not as
    an unknown outcome."""
    _, _, reader = otel
    lose_own_commit(fault_proxy, pg_database, service, "unit_marked")
    counters = rdb.health()["services"][service]["counters"]
    assert (counters["unknown_commits"], counters["verified_commits"]) == (0, 1), counters
    assert otel_points(reader, "resilient_db.commit.verifications") == {
        (("outcome", "committed"), ("service", service)): 1
    }


@pytest.mark.parametrize("where", ["operation", "unit"])
def test_an_own_commit_whose_answer_was_lost_is_said_at_error_level(
    where: str,
    *,
    engine: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its one line is at ERROR, as every other unknown commit outcome's is (a drop-in
    COMMIT's, a unit's, an interrupted one's): it was a WARNING, missed by alerts on errors."""
    with caplog.at_level(logging.INFO, logger="resilient_db"):
        lose_own_commit(fault_proxy, pg_database, service, where)
    (line,) = [r for r in caplog.records if "the outcome is unknown" in r.getMessage()]
    assert line.getMessage().startswith("[SELF-HEAL] Not replaying: service=")
    assert line.levelno == logging.ERROR


def test_an_opening_followed_from_the_fleet_is_told_apart_as_prometheus_does(
    redis_server: RedisServer,
    *,
    pg_url: str,
    engine: sa.Engine,
    gate: Gate,
    tmp_path: Path,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    """Another process opens the breaker shared through Redis; this one follows. Prometheus
    counts it in ``breaker_opens_followed``, not ``breaker_opens`` (a sum over the fleet counts
    each opening once); OpenTelemetry counted it as an opening like the opener's, so summed
    over the fleet it counted every opening once per process."""
    _, _, reader = otel
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    config = rdb.Config(
        redis_url=redis_server.url, max_retries=0, failure_threshold=5, reset_timeout=600.0
    )
    Sessions = rdb.ResilientSession(engine, service="fleet", config=config)
    Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))
    wait_for(lambda: shared("fleet")["connected"], "the link to Redis to be up")
    gate.set(down=True)
    with fleet(1, pg_url, opener_settings(redis_server.url), tmp_path) as (opener,):
        open_the_fleets_breaker(opener)
        wait_for(
            lambda: rdb.health()["services"]["fleet"]["breaker"]["state"] == "open",
            "this process to follow the opening",
        )
    exposition = generate_latest(registry).decode()
    assert 'resilient_db_breaker_opens_total{service="fleet"} 0.0' in exposition
    assert 'resilient_db_breaker_opens_followed_total{service="fleet"} 1.0' in exposition
    assert otel_points(reader, "resilient_db.breaker.transitions") == {
        (("opened_here", False), ("service", "fleet"), ("state", "open")): 1
    }


def test_redis_lost_and_back_are_events_of_each_service_using_it(
    redis_server: RedisServer,
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    """Two services share their breakers through one Redis, killed then restarted. Every other
    action's event names its service, and operators filter by it: Redis lost (and back) is an
    event of each service whose breaker and budget run on local state meanwhile, in the hooks,
    OpenTelemetry and the dashboard alike, not one event of no service (counted under
    ``service=""``, listed by the dashboard as the transition guard's). The log says it once,
    naming both."""
    _, _, reader = otel
    caplog.set_level(logging.INFO, logger="resilient_db")
    events: list[rdb.SelfHealEvent] = []
    rdb.add_hook(events.append)
    recorder = Recorder()
    rdb.add_hook(recorder)
    engine = sa.create_engine(pg_url)
    config = rdb.Config(redis_url=redis_server.url)
    factories = [
        rdb.ResilientSession(engine, service=s, config=config) for s in ("orders", "billing")
    ]
    try:
        for name in ("orders", "billing"):
            wait_for(lambda name=name: shared(name)["connected"], "the link", 10)
        redis_server.kill()
        wait_for(lambda: len([e for e in events if e.name == "shared_state_down"]) == 2, "down")
        redis_server.start()  # the same port
        wait_for(lambda: len([e for e in events if e.name == "shared_state_restored"]) == 2, "back")
    finally:
        rdb.remove_hook(events.append)
        rdb.remove_hook(recorder)
    for name in ("shared_state_down", "shared_state_restored"):
        said = [e for e in events if e.name == name]
        assert sorted(e.service or "" for e in said) == ["billing", "orders"]
        assert {e.fields["services"] for e in said} == {"billing, orders"}
        assert len({e.message for e in said}) == 1  # the one line's words
        assert (
            otel_points(reader, "resilient_db.events").get((("event", name), ("service", "")), 0)
            == 0
        )
        for service in ("billing", "orders"):
            assert (
                otel_points(reader, "resilient_db.events")[(("event", name), ("service", service))]
                == 1
            )
        (line,) = [r for r in caplog.records if getattr(r, "self_heal", {}).get("event") == name]
        assert line.getMessage() == PREFIX + said[0].message
        fields = line.self_heal  # type: ignore[attr-defined]
        assert fields["services"] == "billing, orders"
        assert fields["service"] is None  # (it names two, in services)
    snapshot = recorder.snapshot()
    listed = sorted((e["name"], e["service"]) for e in snapshot["events"])
    assert listed == [
        ("shared_state_down", "billing"),
        ("shared_state_down", "orders"),
        ("shared_state_restored", "billing"),
        ("shared_state_restored", "orders"),
    ]
    assert NO_SERVICE not in snapshot["series"]
    del factories
    engine.dispose()
