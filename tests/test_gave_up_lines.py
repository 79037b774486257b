"""How a unit that retried ends, as operators see it: a ``Gave up`` line, a ``gave_up`` count
and event naming the error raised, also when the last attempt failed with an error that is not
retried (a unit that retried, then met a constraint, ended with its retries said and then
nothing)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._breaker import breakers

pytestmark = pytest.mark.usefixtures("no_backoff")

README = Path(__file__).resolve().parent.parent / "README.md"


class PaymentFailed(Exception):
    """An application's own error, raised from the driver's."""


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def gave_up(service: str) -> int:
    return int(rdb.health()["services"][service]["counters"]["gave_up"])


@pytest.fixture
def table(engine: sa.Engine) -> str:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS gave_up_rows")
        conn.exec_driver_sql("CREATE TABLE gave_up_rows (id int PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO gave_up_rows VALUES (1)")
    return "gave_up_rows"


def test_a_unit_that_retried_then_met_an_error_not_retried_gives_up_visibly(
    engine: sa.Engine,
    service: str,
    table: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    Factory = rdb.ResilientSession(engine, service=service, config=rdb.Config(max_retries=3))
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        if len(calls) == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))  # a conflict: replayed
        session.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))  # 23505: not replayed

    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(sa.exc.IntegrityError) as raised:
        Factory.run(unit)
    assert raised.value.orig is not None
    assert getattr(raised.value.orig, "sqlstate", None) == "23505"
    assert len(calls) == 2
    assert lines(caplog, "Gave up") == [
        f"[SELF-HEAL] Gave up: service={service} after 1 retry: the last attempt failed with "
        "IntegrityError (SQLSTATE 23505), which is not retried; raising it"
    ]
    # the documentation quotes this line as an example (it said "after 1 retries"): the
    # README's or its reference's in docs/ (docs/units-of-work.md)
    texts = [README, *sorted((README.parent / "docs").glob("*.md"))]
    readme = " ".join(" ".join(p.read_text(encoding="utf-8").split()) for p in texts)
    quoted = lines(caplog, "Gave up")[0].removeprefix("[SELF-HEAL] ")
    assert f"`{quoted.replace(f'service={service}', 'service=...')}`" in readme
    assert gave_up(service) == 1
    (event,) = [e for e in events if e.name == "gave_up" and e.service == service]
    assert event.fields["limit"] == "not_retried"
    assert event.fields["error"] == "IntegrityError"
    assert event.fields["sqlstate"] == "23505"

    # a unit that never retried raises its error as before: no line, no count
    caplog.clear()
    with pytest.raises(sa.exc.IntegrityError):
        Factory.run(lambda session: session.execute(sa.text(f"INSERT INTO {table} VALUES (1)")))
    assert lines(caplog, "Gave up") == []
    assert gave_up(service) == 1


def test_a_gave_up_line_names_the_error_raised(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """An application error raised ``from`` the driver's is classified by its cause and
    replayed; when the retries run out, the line said "raising the original error" while the
    application's error was raised."""
    Factory = rdb.ResilientSession(engine, service=service, config=rdb.Config(max_retries=1))

    def unit(session: Session) -> None:
        try:
            session.execute(sa.text("SELECT raise_code('40001')"))
        except sa.exc.OperationalError as exc:
            raise PaymentFailed("the payment could not be booked") from exc

    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(PaymentFailed):
        Factory.run(unit)
    assert lines(caplog, "Gave up") == [
        f"[SELF-HEAL] Gave up: service={service} conflict (SQLSTATE 40001) after 1 retry; "
        "raising PaymentFailed"
    ]
    (event,) = [e for e in events if e.name == "gave_up" and e.service == service]
    assert event.fields["error"] == "PaymentFailed"
    assert event.fields["limit"] == "max_retries"


def conflict(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('40001')"))  # a serialization failure


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: a failure


def test_a_unit_the_breaker_stops_gives_up_naming_circuit_open_error(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """A unit whose next retry the breaker refused (other units' failures opened it while it
    backed off) had a ``gave_up`` event without ``error``; one whose own failure opened it
    named the database's error, while both raise ``CircuitOpenError``, as their lines say."""

    def opened_meanwhile(seconds: float) -> None:  # as other units' failures would open it
        breakers()[service].open()

    config = rdb.Config(max_retries=3, failure_threshold=50)
    Factory = rdb.ResilientSession(engine, service=service, config=config, sleep=opened_meanwhile)
    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(rdb.CircuitOpenError) as raised:
        Factory.run(conflict)
    assert isinstance(raised.value.__cause__, sa.exc.OperationalError)
    (line,) = lines(caplog, "Gave up")
    assert line.endswith("raising CircuitOpenError")
    (event,) = [e for e in events if e.name == "gave_up" and e.service == service]
    assert dict(event.fields) == {
        "service": service,
        "event": "gave_up",
        "retries": 0,
        "outcome": "conflict",
        "sqlstate": "40001",
        "limit": "breaker",
        "error": "CircuitOpenError",
        "circuit_opened": True,
    }

    # the unit's own failure opens it, with retries left
    own = f"{service}-own"
    Own = rdb.ResilientSession(
        engine, service=own, config=rdb.Config(max_retries=3, failure_threshold=1)
    )
    with pytest.raises(rdb.CircuitOpenError):
        Own.run(unavailable)
    (line,) = [x for x in lines(caplog, "Gave up") if f"service={own} " in x]
    assert line.endswith("raising CircuitOpenError")
    (event,) = [e for e in events if e.name == "gave_up" and e.service == own]
    assert (event.fields["limit"], event.fields["error"]) == ("breaker", "CircuitOpenError")
    assert event.fields["sqlstate"] == "57P03"


def test_a_retry_refused_after_self_healing_was_switched_off_is_not_a_give_up(
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload switching self-healing off as the breaker refused a unit's retry: the unit was
    counted in ``gave_up`` all the same (the other ways to give up count nothing then, as the
    hooks are told nothing)."""
    env = {"SELF_HEALING_MAX_RETRIES": "3", "SELF_HEALING_FAILURE_THRESHOLD": "50"}
    rdb.reload_config(env)

    def opened_meanwhile(seconds: float) -> None:  # as other units' failures would open it
        breakers()[service].open()

    def switch_off(event: rdb.SelfHealEvent) -> None:  # (told as the breaker refuses)
        if event.name == "breaker_rejected" and event.service == service:
            rdb.reload_config({**env, "SELF_HEALING_ENABLED": "false"})

    Factory = rdb.ResilientSession(engine, service=service, sleep=opened_meanwhile)
    caplog.set_level(logging.INFO, logger="resilient_db")
    rdb.add_hook(switch_off)
    try:
        with pytest.raises(rdb.CircuitOpenError) as raised:
            Factory.run(conflict)
    finally:
        rdb.remove_hook(switch_off)
    assert isinstance(raised.value.__cause__, sa.exc.OperationalError)
    assert not Factory.config.enabled
    assert lines(caplog, "Retry attempt 1/3") != []
    assert lines(caplog, "Gave up") == []
    assert gave_up(service) == 0
