"""Opening and closing a service's circuit breaker by hand (``rdb.open_breaker``,
``rdb.close_breaker``): an operator's maintenance window and the end of an outage, against a
real PostgreSQL (units refused without a connection being made, counted by a fault proxy), in
one process and in two OS processes sharing the breaker through a real Redis."""

from __future__ import annotations

import logging
import math
import socket
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import ForgetfulForwarder, Gate, fleet
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from processes import wait_for
from prometheus_client import CollectorRegistry, generate_latest
from scenarios import FakeClock, otel_points
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db.metrics import HealthCollector
from resilient_db.testing import FaultProxy, RedisServer

REASON = "database upgrade"


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def select_one(session: sa.orm.Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


@pytest.fixture
def proxied(fault_proxy: FaultProxy, pg_database: str) -> Any:
    engine = sa.create_engine(fault_proxy.url(pg_database))
    yield engine
    engine.dispose()


def test_a_unit_and_a_drop_in_transaction_are_refused_without_a_connection_and_told_why(
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Opened by hand, the service refuses its units and drop-in transactions at once, a
    pooled connection that works included, without reaching the server; the refusal says it
    was opened by hand and why (not "after repeated database failures"), as the line does."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    Session = rdb.ResilientSession(proxied, service=service, config=rdb.Config(reset_timeout=30))
    assert Session.run(select_one) == 1  # a pooled connection that works
    connections = fault_proxy.connections_accepted

    assert rdb.open_breaker(service, reason=REASON) is False  # not shared: this process's
    with pytest.raises(rdb.CircuitOpenError) as refused:
        Session.run(select_one)
    with pytest.raises(rdb.CircuitOpenError) as dropin, Session() as session:
        session.execute(sa.text("SELECT 1"))
    assert fault_proxy.connections_accepted == connections  # nothing reached the server
    for error in (refused.value, dropin.value):
        assert error.by_hand is True
        assert error.cause == f"opened by hand: {REASON}"
        assert error.state == "open"
        assert 29 < error.retry_after <= 30
        assert "repeated database failures" not in str(error)
        assert f"is open: opened by hand: {REASON}; retry in" in str(error)

    (line,) = lines(caplog, "Circuit breaker opened")
    assert line == (
        f"[SELF-HEAL] Circuit breaker opened: service={service} by hand ({REASON}); "
        "rejecting calls for 30.0 s"
    )
    (opened,) = [e for e in events if e.name == "breaker_opened"]
    assert opened.fields["by_hand"] is True
    assert opened.fields["reason"] == REASON
    (rejected,) = lines(caplog, "Circuit breaker rejected")
    assert f"(opened by hand: {REASON})" in rejected
    assert rdb.health()["services"][service]["counters"]["breaker_opens"] == 1


def test_the_private_open_and_close_say_by_hand_too(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``Breaker.open()`` / ``close()`` (what tests and tools called before) are changes by
    hand: the refusals no longer say the database failed, the closing no longer says it
    recovered."""
    from resilient_db._breaker import breakers  # noqa: PLC0415

    caplog.set_level(logging.INFO, logger="resilient_db")
    Session = rdb.ResilientSession(engine, service=service)
    breakers()[service].open()
    with pytest.raises(rdb.CircuitOpenError) as refused:
        Session.run(select_one)
    assert "repeated database failures" not in str(refused.value)
    assert refused.value.cause == "opened by hand"
    assert refused.value.by_hand is True
    breakers()[service].close()
    (closed,) = lines(caplog, "Circuit breaker closed")
    assert closed.endswith(f"service={service} by hand")


def test_an_opening_by_hand_lasts_its_seconds_then_half_opens(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``seconds`` sets the opening's length (not the reset timeout); then the breaker is
    half-open and its probe closes it, as after any opening."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    clock = FakeClock(1.7e9)
    Session = rdb.ResilientSession(
        engine, service=service, wall_clock=clock, config=rdb.Config(reset_timeout=600)
    )
    rdb.open_breaker(service, seconds=5)
    (line,) = lines(caplog, "Circuit breaker opened")
    assert line.endswith("by hand; rejecting calls for 5.0 s")
    clock.advance(4.5)
    with pytest.raises(rdb.CircuitOpenError) as refused:
        Session.run(select_one)
    assert math.isclose(refused.value.retry_after, 0.5, abs_tol=1e-6)
    assert refused.value.cause == "opened by hand"
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    clock.advance(0.6)
    assert rdb.health()["services"][service]["breaker"]["state"] == "half-open"
    assert Session.run(select_one) == 1  # the probe
    assert len(lines(caplog, "Circuit breaker half-open")) == 1
    (closed,) = lines(caplog, "Circuit breaker closed")
    assert closed.endswith("recovered")  # the probe's success: a recovery
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"


def test_close_breaker_lets_units_through_at_once_and_says_it_was_by_hand(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Closed by hand, the service's units go through at once (no reset timeout waited out,
    no probe); the line says the operator closed it, not that the database recovered; the
    failures it had counted are forgotten."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    Session = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=600),
    )
    with pytest.raises(sa.exc.OperationalError):
        Session.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    with pytest.raises(rdb.CircuitOpenError) as refused:
        Session.run(select_one)
    assert refused.value.by_hand is False  # the failures' opening, as before
    assert "after repeated database failures" in str(refused.value)

    assert rdb.close_breaker(service, reason="it is back") is False
    assert Session.run(select_one) == 1
    (line,) = lines(caplog, "Circuit breaker closed")
    assert line == f"[SELF-HEAL] Circuit breaker closed: service={service} by hand (it is back)"
    assert "recovered" not in line
    (closed,) = [e for e in events if e.name == "breaker_closed"]
    assert closed.fields["by_hand"] is True
    (opened,) = [e for e in events if e.name == "breaker_opened"]
    assert opened.fields["by_hand"] is False


def test_close_breaker_forgets_the_failures_counted(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=3, max_retries=0)
    )
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            Session.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    assert rdb.health()["services"][service]["breaker"]["failures"] == 2
    rdb.close_breaker(service)
    assert rdb.health()["services"][service]["breaker"]["failures"] == 0


@pytest.mark.asyncio
async def test_async_units_are_refused_and_let_through_again(
    pg_async_url: str, service: str
) -> None:
    engine = create_async_engine(pg_async_url)
    try:
        Session = rdb.AsyncResilientSession(engine, service=service)

        async def one(session: AsyncSession) -> int:
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

        assert await Session.run(one) == 1
        rdb.open_breaker(service, reason=REASON, seconds=60)
        with pytest.raises(rdb.CircuitOpenError) as refused:
            await Session.run(one)
        assert refused.value.cause == f"opened by hand: {REASON}"
        with pytest.raises(rdb.CircuitOpenError):
            async with Session() as session:
                await session.execute(sa.text("SELECT 1"))
        rdb.close_breaker(service)
        assert await Session.run(one) == 1
    finally:
        await engine.dispose()


# -- bad input ---------------------------------------------------------------------------------


def test_an_unknown_service_is_refused_naming_the_known_ones(
    engine: sa.Engine, service: str
) -> None:
    rdb.ResilientSession(engine, service=service)
    with pytest.raises(ValueError, match="no circuit breaker for service 'nope'") as refused:
        rdb.open_breaker("nope")
    assert repr(service) in str(refused.value)
    with pytest.raises(ValueError, match="no circuit breaker for service 'nope'"):
        rdb.close_breaker("nope")
    with pytest.raises(TypeError, match="service name"):
        rdb.open_breaker(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blank"):
        rdb.open_breaker("  ")


def test_a_breaker_switched_off_or_opted_out_of_is_refused_saying_so(
    engine: sa.Engine, service: str
) -> None:
    # (held: a factory no longer referenced is no live user of its service, and a service
    # none of whose live users has its breaker is one with no breaker)
    factory = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(circuit_breaker=False)
    )
    with pytest.raises(ValueError, match="is switched off"):
        rdb.open_breaker(service)
    assert factory.kw is not None
    opted_out = f"{service}-opted-out"
    rdb.with_self_healing(lambda: 1, service=opted_out, use_circuit_breaker=False)
    with pytest.raises(ValueError, match="use_circuit_breaker=False"):
        rdb.close_breaker(opted_out)


@pytest.mark.parametrize(
    ("reason", "error", "match"),
    [
        (42, TypeError, "reason must be a str"),
        ("", ValueError, "reason is empty"),
        ("   ", ValueError, "reason is blank"),
        ("line\nbreak", ValueError, "control character"),
        ("x" * 201, ValueError, "201 characters long; at most 200"),
        ("\udcff", ValueError, "not valid UTF-8"),
    ],
)
def test_a_bad_reason_is_refused(
    engine: sa.Engine, service: str, reason: object, error: type[Exception], match: str
) -> None:
    rdb.ResilientSession(engine, service=service)
    with pytest.raises(error, match=match):
        rdb.open_breaker(service, reason=reason)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        rdb.close_breaker(service, reason=reason)  # type: ignore[arg-type]
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"  # nothing done


@pytest.mark.parametrize(
    ("seconds", "error"),
    [
        (True, TypeError),
        ("30", TypeError),
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (86_401, ValueError),
    ],
)
def test_bad_seconds_are_refused(
    engine: sa.Engine, service: str, seconds: object, error: type[Exception]
) -> None:
    rdb.ResilientSession(engine, service=service)
    with pytest.raises(error, match="seconds"):
        rdb.open_breaker(service, seconds=seconds)  # type: ignore[arg-type]
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"
    rdb.open_breaker(service, seconds=86_400)  # the bound itself is taken
    assert rdb.health()["services"][service]["breaker"]["retry_after"] > 86_399


def test_health_and_the_metrics_say_an_opening_was_by_hand_and_why(
    engine: sa.Engine,
    service: str,
    otel: tuple[Any, Any, InMemoryMetricReader],
) -> None:
    """health()'s breaker entry says whether the opening in force is an operator's, and why
    (None: not by hand, or no reason given), through its half-open state after it; Prometheus
    and OpenTelemetry have a 0/1 series per service (the reason is no label: one series per
    service whatever operators write)."""
    _, _, reader = otel
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    clock = FakeClock()
    Session = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(reset_timeout=30, failure_threshold=1, retry=False),
    )
    assert Session.policy.breaker is not None
    Session.policy.breaker.set_clocks(clock)

    def entry() -> dict[str, Any]:
        breaker: dict[str, Any] = rdb.health()["services"][service]["breaker"]
        return breaker

    def metrics() -> tuple[str, int]:
        exposition = generate_latest(registry).decode()
        (line,) = [
            x for x in exposition.splitlines() if x.startswith("resilient_db_breaker_by_hand{")
        ]
        gauge = otel_points(reader, "resilient_db.breaker.by_hand")[(("service", service),)]
        return line, gauge

    assert (entry()["by_hand"], entry()["reason"]) == (False, None)
    assert metrics() == (f'resilient_db_breaker_by_hand{{service="{service}"}} 0.0', 0)

    rdb.open_breaker(service, reason=REASON)
    assert (entry()["state"], entry()["by_hand"], entry()["reason"]) == ("open", True, REASON)
    assert metrics() == (f'resilient_db_breaker_by_hand{{service="{service}"}} 1.0', 1)
    clock.advance(31)  # its opening over: half-open after an opening by hand
    assert (entry()["state"], entry()["by_hand"], entry()["reason"]) == ("half-open", True, REASON)

    rdb.close_breaker(service, reason="upgrade done")
    assert (entry()["state"], entry()["by_hand"], entry()["reason"]) == ("closed", False, None)
    assert metrics() == (f'resilient_db_breaker_by_hand{{service="{service}"}} 0.0', 0)

    rdb.open_breaker(service)  # no reason given
    assert (entry()["by_hand"], entry()["reason"]) == (True, None)
    rdb.close_breaker(service)
    with pytest.raises(sa.exc.OperationalError):  # the failures' opening is no operator's
        Session.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    assert (entry()["state"], entry()["by_hand"], entry()["reason"]) == ("open", False, None)
    assert metrics()[1] == 0


# -- shared through Redis ----------------------------------------------------------------------


def test_redis_down_applies_to_this_process_and_says_so(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_db")
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    Session = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(redis_url=f"redis://127.0.0.1:{port}/0"),
    )
    wait_for(
        lambda: rdb.health()["services"][service]["breaker"]["shared"]["problem"] is not None,
        "the link's first attempt",
    )
    assert rdb.open_breaker(service, reason=REASON) is False
    (line,) = lines(caplog, "Circuit breaker opened")
    assert f"by hand ({REASON}), in this process only (Redis does not answer)" in line
    with pytest.raises(rdb.CircuitOpenError):
        Session.run(select_one)
    assert rdb.close_breaker(service) is False
    (closed,) = lines(caplog, "Circuit breaker closed")
    assert closed.endswith("by hand, in this process only (Redis does not answer)")
    assert Session.run(select_one) == 1


def fleet_settings(redis: RedisServer) -> dict[str, str]:
    return {
        "SELF_HEALING_REDIS_URL": redis.url,
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_RESET_TIMEOUT": "60000",
    }


@pytest.mark.slow
def test_two_processes_share_an_opening_and_a_closing_by_hand(
    redis_server: RedisServer,
    fault_proxy: FaultProxy,
    pg_database: str,
    gate: Gate,
    tmp_path: Path,
) -> None:
    """One process opens the shared breaker by hand: the other's units are refused without
    reaching the server, told it was opened by hand in another process and why; a process
    started afterwards reads it so from Redis; the closing by hand lets them all through at
    once, and says so in each."""
    url = fault_proxy.url(pg_database)
    with fleet(2, url, fleet_settings(redis_server), tmp_path) as (operator, other):
        for w in (operator, other):
            assert w.ask("wait", what="connected", timeout=20)["ok"], w.log()
        assert other.ask("try") == {"outcome": "ok"}

        assert operator.ask("open_breaker", reason=REASON, seconds=120) == {"fleet_wide": True}
        assert other.ask("wait", what="open", timeout=10)["ok"], other.log()
        calls, connections = gate.calls(), fault_proxy.connections_accepted
        refused = other.ask("try")
        assert refused["outcome"] == "open"
        assert refused["by_hand"] is True
        assert refused["cause"] == f"opened by hand in another process: {REASON}"
        assert "repeated database failures" not in refused["message"]
        assert gate.calls() == calls
        assert fault_proxy.connections_accepted == connections
        (line,) = other.said("Circuit breaker opened")
        assert f"by hand in another process (shared through Redis) ({REASON})" in line
        assert "rejecting calls for 1" in line  # (the 120 s asked for, less the trip)
        (own,) = operator.said("Circuit breaker opened")
        assert own.endswith(f"by hand ({REASON}); rejecting calls for 120.0 s")
        health = other.ask("health")["services"]["fleet"]["breaker"]
        assert health["state"] == "open"
        assert 100 < health["retry_after"] <= 120
        assert (health["by_hand"], health["reason"]) == (True, REASON)

        # a process started now reads the opening, by hand, from Redis
        (tmp_path / "late").mkdir()
        with fleet(1, url, fleet_settings(redis_server), tmp_path / "late") as (late,):
            assert late.ask("wait", what="open", timeout=20)["ok"], late.log()
            assert late.ask("try")["cause"] == f"opened by hand in another process: {REASON}"
            health = late.ask("health")["services"]["fleet"]["breaker"]
            assert (health["by_hand"], health["reason"]) == (True, REASON)

            assert operator.ask("close_breaker", reason="upgrade done") == {"fleet_wide": True}
            for w in (other, late):
                assert w.ask("wait", what="closed", timeout=10)["ok"], w.log()
                assert w.ask("try") == {"outcome": "ok"}
                health = w.ask("health")["services"]["fleet"]["breaker"]
                assert (health["by_hand"], health["reason"]) == (False, None)
                (closed,) = w.said("Circuit breaker closed")
                assert closed.endswith(
                    "by hand in another process (shared through Redis) (upgrade done)"
                ), closed
        (closed,) = operator.said("Circuit breaker closed")
        assert closed.endswith("by hand (upgrade done)")


@pytest.mark.slow
def test_an_opening_by_hand_made_while_redis_was_down_is_shared_as_one(
    redis_server: RedisServer, pg_url: str, gate: Gate, tmp_path: Path
) -> None:
    """Opened by hand while Redis does not answer, the opening is this process's alone; Redis
    answering again (restarted, empty), it is shared with the fleet as what it is: the other
    process follows an opening by hand, with its reason (its line, refusals and health(), and
    the fleet's record that ``resilient-db breaker status`` reads), not one of "another
    process's failures"; and the process that made it says it once, by hand, not a second
    time as the fleet's failures."""
    from resilient_db._fleet import operator_records  # noqa: PLC0415

    with fleet(2, pg_url, fleet_settings(redis_server), tmp_path) as (operator, other):
        for w in (operator, other):
            assert w.ask("wait", what="connected", timeout=20)["ok"], w.log()
        redis_server.kill()
        for w in (operator, other):
            assert w.ask("wait", what="disconnected", timeout=10)["ok"], w.log()
        assert operator.ask("open_breaker", reason=REASON, seconds=120) == {"fleet_wide": False}
        assert other.ask("try") == {"outcome": "ok"}  # (the other process's own breaker)

        redis_server.start()  # same port, no state
        for w in (operator, other):
            assert w.ask("wait", what="connected", timeout=10)["ok"], w.log()
        assert other.ask("wait", what="open", timeout=10)["ok"], other.log()
        calls = gate.calls()
        refused = other.ask("try")
        assert (refused["outcome"], refused["by_hand"]) == ("open", True)
        assert refused["cause"] == f"opened by hand in another process: {REASON}"
        assert gate.calls() == calls
        (line,) = other.said("Circuit breaker opened")
        assert f"by hand in another process (shared through Redis) ({REASON})" in line, line
        health = other.ask("health")["services"]["fleet"]["breaker"]
        assert (health["by_hand"], health["reason"]) == (True, REASON)
        assert 100 < health["retry_after"] <= 120
        assert health["shared"]["opens_followed"] == 1

        (own,) = operator.said("Circuit breaker opened")
        assert f"by hand ({REASON}), in this process only (Redis does not answer)" in own
        service = operator.ask("health")["services"]["fleet"]
        health = service["breaker"]
        assert (health["by_hand"], health["reason"]) == (True, REASON)
        assert health["shared"]["opened_here"] == 1
        assert service["counters"]["breaker_opens"] == 1  # one opening, counted once
        (record,) = operator_records(redis_server.client(), "fleet")
        assert (record["state"], record["by_hand"], record["reason"]) == ("open", True, REASON)


@pytest.mark.slow
def test_a_short_opening_by_hand_made_while_redis_did_not_answer_is_shared_on_rejoining(
    redis_server: RedisServer, engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An opening by hand for less than the reset timeout, made while Redis did not answer
    (its connections forgotten by a NAT: the command never reached it), is shared when Redis
    answers again, though the shared breaker changed a moment before it was made (it is
    shared unless the breaker changed since): it is not thrown away, the local breaker closed
    as the fleet's record said before the opening."""
    from resilient_db._fleet import operator_records  # noqa: PLC0415

    caplog.set_level(logging.INFO, logger="resilient_db")
    with ForgetfulForwarder(redis_server.port) as forwarder:
        config = rdb.Config(
            redis_url=forwarder.url(redis_server.url), retry=False, reset_timeout=600
        )
        Session = rdb.ResilientSession(engine, service=service, config=config)
        wait_for(lambda: shared_entry(service)["connected"], "the link", 10)
        assert rdb.close_breaker(service, reason="a record") is True  # the fleet's last change
        forwarder.forget()  # (nothing sent reaches Redis, nothing comes back)
        assert rdb.open_breaker(service, reason=REASON, seconds=60) is False
        wait_for(lambda: not shared_entry(service)["connected"], "the link down", 10)
        # its background thread connects anew (new connections pass) and shares the opening
        wait_for(lambda: shared_entry(service)["connected"], "the link back", 20)
        (record,) = operator_records(redis_server.client(), service)
        assert (record["state"], record["by_hand"], record["reason"]) == ("open", True, REASON)
        assert 50 < record["seconds_left"] <= 60
        with pytest.raises(rdb.CircuitOpenError) as refused:
            Session.run(select_one)
        assert refused.value.cause == f"opened by hand: {REASON}"
        assert lines(caplog, "Circuit breaker closed") == [
            f"[SELF-HEAL] Circuit breaker closed: service={service} by hand (a record)"
        ]


def shared_entry(service: str) -> dict[str, Any]:
    entry: dict[str, Any] = rdb.health()["services"][service]["breaker"]["shared"]
    return entry
