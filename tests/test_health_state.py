"""What ``health()`` (and the Prometheus state gauge reading it) says of a breaker whose
opening is over while no call has come yet: what the next call meets, a half-open probe, not
an opening that lasts for good with a negative ``retry_after``."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for
from prometheus_client import CollectorRegistry
from scenarios import FailingStorage, FakeClock
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.metrics import HealthCollector
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.usefixtures("no_backoff")


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: a failure


def healthy(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def breaker(service: str) -> dict[str, Any]:
    entry: dict[str, Any] = rdb.health()["services"][service]["breaker"]
    return entry


def gauges(service: str) -> dict[str, float | None]:
    """``resilient_db_breaker_state{state}`` of ``service`` and ``resilient_db_healthy``."""
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    found: dict[str, float | None] = {
        state: registry.get_sample_value(
            "resilient_db_breaker_state", {"service": service, "state": state}
        )
        for state in ("closed", "open", "half-open")
    }
    found["healthy"] = registry.get_sample_value("resilient_db_healthy")
    return found


def test_an_opening_past_its_reset_timeout_is_reported_half_open_until_a_call_comes(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """No call arrives after the opening (a readiness probe built on ``healthy`` keeps the
    instance out of traffic): the breaker stays stored as open, and ``health()`` said "open"
    for good with an ever more negative ``retry_after``. It says what the next call meets: a
    half-open probe, ``healthy`` as for any half-open breaker, no ``retry_after``."""
    clock = FakeClock()
    config = rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=30.0)
    Factory = rdb.ResilientSession(engine, service=service, config=config, wall_clock=clock)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    assert breaker(service)["state"] == "open"
    assert breaker(service)["retry_after"] == pytest.approx(30.0)
    assert rdb.health()["healthy"] is False
    assert gauges(service) == {"closed": 0, "open": 1, "half-open": 0, "healthy": 0}

    clock.advance(29.5)
    assert breaker(service)["retry_after"] == pytest.approx(0.5)  # still open

    clock.advance(0.5)  # the open time is over, to the microsecond
    for _ in range(2):  # and stays over, however late health() is asked
        info = breaker(service)
        assert info["state"] == "half-open"
        assert "retry_after" not in info  # as for any half-open breaker: never negative
        assert rdb.health()["healthy"] is True
        assert gauges(service) == {"closed": 0, "open": 0, "half-open": 1, "healthy": 1}
        clock.advance(3600.0)
    # health() only reads: the breaker moves to half-open when a call comes, as pybreaker does
    assert [e.name for e in events if e.name.startswith("breaker_")] == ["breaker_opened"]

    assert Factory.run(healthy) == 1  # the probe, let through
    assert breaker(service)["state"] == "closed"
    names = [e.name for e in events if e.name.startswith("breaker_")]
    assert names == ["breaker_opened", "breaker_half_open", "breaker_closed"]
    assert rdb.health()["services"][service]["counters"]["breaker_rejections"] == 0


def test_failures_count_toward_the_next_opening_and_are_zero_while_open_or_half_open(
    engine: sa.Engine, service: str
) -> None:
    """A local breaker kept the count that opened it (and a failed probe's on top) while open
    and half-open, where a shared one said 0: both say the failures counted toward the next
    opening, none while it is open or half-open (no call is counted then: they are rejected,
    or a probe decides alone)."""
    clock = FakeClock()
    config = rdb.Config(failure_threshold=2, max_retries=0, reset_timeout=30.0)
    Factory = rdb.ResilientSession(engine, service=service, config=config, wall_clock=clock)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    assert (breaker(service)["state"], breaker(service)["failures"]) == ("closed", 1)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    assert (breaker(service)["state"], breaker(service)["failures"]) == ("open", 0)
    clock.advance(30.0)
    assert (breaker(service)["state"], breaker(service)["failures"]) == ("half-open", 0)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)  # the probe fails: open again
    assert (breaker(service)["state"], breaker(service)["failures"]) == ("open", 0)
    clock.advance(30.0)
    assert Factory.run(healthy) == 1
    assert (breaker(service)["state"], breaker(service)["failures"]) == ("closed", 0)


@pytest.mark.slow
def test_a_shared_opening_past_its_reset_timeout_is_reported_half_open(
    redis_server: RedisServer, engine: sa.Engine, service: str
) -> None:
    """The same for a breaker shared through Redis: its view's end of the opening decides
    (the next call asks Redis for a probe), and ``retry_after`` never goes negative."""
    config = rdb.Config(
        redis_url=redis_server.url, failure_threshold=1, max_retries=0, reset_timeout=0.5
    )
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: bool(breaker(service)["shared"]["connected"]), "the link")
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    info = breaker(service)
    assert (info["state"], info["failures"]) == ("open", 0)
    assert 0 < info["retry_after"] <= 0.5
    assert rdb.health()["healthy"] is False
    seen: list[dict[str, Any]] = []

    def half_open() -> bool:  # polling a state, not a backoff
        seen.append(breaker(service))
        return bool(seen[-1]["state"] == "half-open")

    wait_for(half_open, "the opening to end", timeout=10.0)
    assert all(s["state"] in ("open", "half-open") for s in seen)
    assert all(s["retry_after"] > 0 for s in seen if s["state"] == "open")
    assert "retry_after" not in seen[-1]
    assert rdb.health()["healthy"] is True
    assert gauges(service)["half-open"] == 1
    assert Factory.run(healthy) == 1  # Redis lets the probe through
    wait_for(lambda: breaker(service)["state"] == "closed", "the fleet's closing")


def test_a_breaker_storage_that_fails_is_reported_unknown_as_the_readme_says(
    service: str,
) -> None:
    """health() answers while a ``breaker_storage=`` given fails: the breaker's state is
    ``unknown`` with the error's class (not its text, which may hold a secret), ``healthy``
    does not take it for open, and the state gauge has 0 for each state."""
    storage = FailingStorage()
    rdb.ResilientSession(None, service=service, breaker_storage=storage)
    assert breaker(service)["state"] == "closed"
    storage.down = True
    try:
        assert breaker(service) == {"state": "unknown", "error": "ConnectionError"}
        assert rdb.health()["healthy"] is True
        assert gauges(service) == {"closed": 0, "open": 0, "half-open": 0, "healthy": 1}
        assert "hunter2" not in repr(rdb.health())
    finally:
        # the factory lives on until Python's next full collection (it is in a reference
        # cycle): its storage must not fail a later test's reload_config() meanwhile
        storage.down = False


def test_a_reload_goes_on_past_a_breaker_storage_that_fails(
    service: str, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload switching the breakers on again while one factory's ``breaker_storage=`` can't
    be read (a store down) does not raise from ``reload_config()``: every other factory gets
    its breaker back, and a line says which part failed for which service (the error's class,
    not its text)."""
    storage = FailingStorage()
    failing = rdb.ResilientSession(None, service=service, breaker_storage=storage)
    other = rdb.ResilientSession(None, service=f"{service}-other")
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    rdb.reload_config()
    assert failing.policy.breaker is None
    assert other.policy.breaker is None
    clean_env.delenv("SELF_HEALING_CIRCUIT_BREAKER")
    storage.down = True
    try:
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            rdb.reload_config()
        assert other.policy.breaker is not None
        assert breaker(f"{service}-other")["state"] == "closed"
        assert failing.policy.breaker is not None  # on, its storage failing as at any call
        said = [r.getMessage() for r in caplog.records if "switching on failed" in r.getMessage()]
        assert said == [
            f"[SELF-HEAL] circuit breaker switching on failed for service={service} "
            "(ConnectionError); switched on without reading its state"
        ]
        assert "hunter2" not in caplog.text
    finally:
        storage.down = False
