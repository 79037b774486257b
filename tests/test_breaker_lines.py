"""What the circuit breaker says: calls it rejects have their ``[SELF-HEAL]`` line and hook event
(rate-limited: an open breaker may reject thousands of calls a second), and a unit whose retry
it refuses gives up visibly."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import RAISE_CODE_FUNCTION
from sqlalchemy.orm import Session

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(RAISE_CODE_FUNCTION)
    yield engine
    engine.dispose()


@pytest.fixture
def events() -> Iterator[list[rdb.SelfHealEvent]]:
    seen: list[rdb.SelfHealEvent] = []
    rdb.add_hook(seen.append)
    yield seen
    rdb.remove_hook(seen.append)


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: a failure


def healthy(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def counters(service: str) -> dict[str, int]:
    return rdb.health()["services"][service]["counters"]  # type: ignore[no-any-return]


# -- rejected calls ----------------------------------------------------------------------------
def test_rejected_calls_have_a_line_and_an_event_the_first_after_each_opening_then_one_a_period(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    clock = FakeClock()
    Factory = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(failure_threshold=2, max_retries=0, reset_timeout=30.0),
        wall_clock=clock,
    )
    caplog.set_level(logging.INFO, logger="resilient_db")
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(unavailable)
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"

    def reject(n: int) -> None:
        for _ in range(n):
            with pytest.raises(rdb.CircuitOpenError):
                Factory.run(healthy)

    def rejected_events() -> list[rdb.SelfHealEvent]:
        return [e for e in events if e.name == "breaker_rejected"]

    reject(1000)
    assert counters(service)["breaker_rejections"] == 1000
    # the first rejection after the opening has its line; the next 999 wait for the period
    (first,) = lines(caplog, "Circuit breaker rejected")
    assert first.startswith("[SELF-HEAL] Circuit breaker rejected 1 call(s) since the last line")
    assert f"service={service} open" in first
    assert "retry in 30.0 s" in first
    # hooks get one event per line, not per rejection: its fields say how many it stands for
    (event,) = rejected_events()
    assert event.service == service
    assert event.level == logging.WARNING
    assert (event.fields["rejected"], event.fields["state"]) == (1, "open")
    assert event.fields["retry_after"] == pytest.approx(30.0)

    clock.advance(11)  # past the 10 s period, still open
    reject(1)
    assert lines(caplog, "Circuit breaker rejected")[1].startswith(
        "[SELF-HEAL] Circuit breaker rejected 1000 call(s) since the last line"
    )
    assert [e.fields["rejected"] for e in rejected_events()] == [1, 1000]
    assert rejected_events()[1].fields["retry_after"] == pytest.approx(19.0)

    # half-open, the probe fails: opened again, its first rejection has its line at once
    clock.advance(20)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)  # the probe
    reject(5)
    assert [e.fields["rejected"] for e in rejected_events()] == [1, 1000, 1]
    assert counters(service)["breaker_rejections"] == 1006
    assert len(lines(caplog, "Circuit breaker rejected")) == 3


def test_rejection_events_reach_the_hooks_whatever_the_logging_switch(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    Factory = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(failure_threshold=1, max_retries=0, logging=False),
    )
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    for _ in range(3):
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(healthy)
    assert [e.fields["rejected"] for e in events if e.name == "breaker_rejected"] == [1]


# -- a retry the breaker refuses ---------------------------------------------------------------
def test_a_unit_whose_retry_the_breaker_refuses_gives_up_visibly(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """While the unit backs off, other units' failures open the breaker: its next retry is
    refused. It ends with CircuitOpenError as before, now counted and logged as given up, its
    last failure the error's cause."""
    config = rdb.Config(failure_threshold=3, max_retries=5, reset_timeout=30.0)
    others = rdb.ResilientSession(engine, service=service, config=config.replace(max_retries=0))

    def other_units_fail(seconds: float) -> None:
        def run() -> None:
            for _ in range(2):  # with the unit's own first failure: 3, the threshold
                with pytest.raises(sa.exc.OperationalError):
                    others.run(unavailable)

        thread = threading.Thread(target=run)  # other requests, meanwhile
        thread.start()
        thread.join()
        gave_up_before.append(counters(service)["gave_up"])

    gave_up_before: list[int] = []

    Factory = rdb.ResilientSession(engine, service=service, config=config, sleep=other_units_fail)
    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(rdb.CircuitOpenError) as info:
        Factory.run(unavailable)
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)
    assert "57P03" in str(info.value.__cause__)
    (line,) = lines(caplog, "refused retry")  # the other units gave up too, their own way
    assert line.startswith(
        f"[SELF-HEAL] Gave up: service={service} unavailable (SQLSTATE 57P03) after 0 retries"
    )
    assert "the circuit breaker opened while it retried and refused retry 1" in line
    assert line.endswith("raising CircuitOpenError")
    c = counters(service)
    assert c["gave_up"] == gave_up_before[0] + 1
    assert c["breaker_rejections"] == 1
    (gave_up,) = [e for e in events if e.name == "gave_up" and "circuit_opened" in e.fields]
    assert gave_up.fields["circuit_opened"] is True
    assert (gave_up.fields["retries"], gave_up.fields["sqlstate"]) == (0, "57P03")
