"""A service has one circuit breaker, whoever asks for it: a factory's ``config=`` decides its
settings over the environment's (``with_self_healing``, default factories, reloads), and two
``config=`` that differ are warned about."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.usefixtures("no_backoff")


def threshold(service: str) -> int:
    return int(rdb.health()["services"][service]["breaker"]["failure_threshold"])


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: a failure


def test_the_environment_does_not_replace_a_factorys_breaker_settings(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """The factory's ``Config(failure_threshold=50)`` was replaced by the environment's 5 at
    the first ``with_self_healing`` call of the same service: its circuit opened after 5."""
    Session = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=50, max_retries=0)
    )
    assert rdb.with_self_healing(lambda: 1, service=service) == 1
    assert threshold(service) == 50
    for _ in range(8):
        with pytest.raises(sa.exc.OperationalError):
            Session.run(unavailable)
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"

    # nor do a default factory of the service, or a reload, made afterwards
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "7")
    rdb.ResilientSession(engine, service=service)
    rdb.reload_config()
    assert threshold(service) == 50


def test_a_factorys_settings_replace_the_environments(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "7")
    # kept: a factory that is gone (garbage-collected) no longer holds the breaker's settings
    default = rdb.ResilientSession(engine, service=service)
    assert threshold(service) == 7
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        own = rdb.ResilientSession(engine, service=service, config=rdb.Config(failure_threshold=50))
        gc.collect()  # (as a long run's collector may, at any moment)
        rdb.reload_config()  # the environment's again: the factory's config= stays
    assert threshold(service) == 50
    assert not [r for r in caplog.records if "settings differ" in r.getMessage()]
    assert [default.service, own.service] == [service] * 2  # (held to here)


def test_two_factories_asking_for_different_breaker_settings_are_warned_about(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    # kept: a factory that is gone (garbage-collected) no longer holds the breaker's settings
    kept = [
        rdb.ResilientSession(engine, service=service, config=rdb.Config(failure_threshold=50)),
        rdb.ResilientSession(
            engine, service=service, config=rdb.Config(failure_threshold=50, max_retries=9)
        ),
    ]
    assert threshold(service) == 50
    gc.collect()  # (as a long run's collector may, at any moment)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        rdb.ResilientSession(engine, service=service, config=rdb.Config(failure_threshold=20))
    assert len(kept) == 2
    (line,) = [r.getMessage() for r in caplog.records if "settings differ" in r.getMessage()]
    assert f"service={service}" in line
    assert "failure_threshold=50" in line
    assert "failure_threshold=20" in line
    assert threshold(service) == 20


def test_a_reload_gives_with_self_healings_breaker_its_numbers_at_once(
    service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """A reload changing the breaker's numbers left an operation's breaker with the old ones,
    in health() and for anything that read it, until the operation's next call."""
    assert rdb.with_self_healing(lambda: 1, service=service) == 1
    assert threshold(service) == 5
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "2")
    clean_env.setenv("SELF_HEALING_RESET_TIMEOUT", "200")
    rdb.reload_config()
    breaker = rdb.health()["services"][service]["breaker"]
    assert (breaker["failure_threshold"], breaker["reset_timeout"]) == (2, 0.2)
    assert rdb.with_self_healing(lambda: 2, service=service) == 2
    assert threshold(service) == 2


def test_a_reload_a_factory_cant_take_changes_nothing(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """A factory made with the breaker off, whose service then got a breaker with another
    storage, can't take the breaker a reload switches on: the reload raised half-way, the
    factories before it changed and those after it not."""
    pybreaker = pytest.importorskip("pybreaker")
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    rdb.reload_config()
    off = rdb.ResilientSession(
        engine, service=service, breaker_storage=pybreaker.CircuitMemoryStorage("closed")
    )
    rdb.ResilientSession(
        sa.create_engine(engine.url),
        service=service,
        config=rdb.Config(),
        breaker_storage=pybreaker.CircuitMemoryStorage("closed"),
    )
    other = rdb.ResilientSession(sa.create_engine(engine.url), service=f"{service}-other")
    before = rdb.load_config()
    clean_env.delenv("SELF_HEALING_CIRCUIT_BREAKER")
    clean_env.setenv("SELF_HEALING_MAX_RETRIES", "7")
    with pytest.raises(ValueError, match=r"nothing changed: service .* already has a circuit"):
        rdb.reload_config()
    assert off.config == other.config == before
    assert off.policy.breaker is None
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    assert rdb.reload_config().max_retries == 7  # one it can take: applied to every factory
    assert off.config.max_retries == other.config.max_retries == 7
    del off, other
    gc.collect()  # (the environment restored after the test switches the breaker on again)


def test_a_reload_switching_the_breaker_off_applies_to_a_unit_backing_off(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """A unit retrying when the breaker opened (another unit's failure) and a reload switched
    it off: its retry loop asked the breaker it started with, still open, and gave up with
    CircuitOpenError while ``health()`` said ``off`` and new units were admitted. It retries
    on, as a unit begun after the reload does."""
    env = {"SELF_HEALING_FAILURE_THRESHOLD": "2", "SELF_HEALING_MAX_RETRIES": "5"}
    rdb.reload_config(env)
    Session = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []
    other: list[BaseException] = []

    def another_request() -> None:  # (a thread: not nested in the unit)
        try:
            Session.run(unavailable)
        except BaseException as exc:
            other.append(exc)

    def unit(session: Session) -> str:
        calls.append(1)
        if len(calls) == 2:
            thread = threading.Thread(target=another_request)
            thread.start()
            thread.join()
            assert rdb.health()["services"][service]["breaker"]["state"] == "open"
            rdb.reload_config({**env, "SELF_HEALING_CIRCUIT_BREAKER": "false"})
            assert rdb.health()["services"][service]["breaker"]["state"] == "off"
        if len(calls) <= 2:
            unavailable(session)
        return "done"

    assert Session.run(unit) == "done"
    assert len(calls) == 3
    assert [type(e) for e in other] == [rdb.CircuitOpenError]


def test_a_reload_changing_the_retry_limit_applies_to_a_unit_backing_off(
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The unit kept the limit it started with while its lines counted to the new one
    ("Retry attempt 2/1", "3/1"); it stops at the new one, its line saying so."""
    breaker_off = {"SELF_HEALING_CIRCUIT_BREAKER": "false"}
    rdb.reload_config({"SELF_HEALING_MAX_RETRIES": "3", **breaker_off})
    Session = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        if len(calls) == 2:  # (backing off: the retry loop runs)
            rdb.reload_config({"SELF_HEALING_MAX_RETRIES": "1", **breaker_off})
        unavailable(session)

    logs = caplog.at_level(logging.WARNING, logger="resilient_db")
    with logs, pytest.raises(sa.exc.OperationalError):
        Session.run(unit)
    assert len(calls) == 2
    assert "/1:" not in caplog.text
    assert "after 1 retry; raising OperationalError" in caplog.text


def budget(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["budget"]
    return found


def test_the_environment_does_not_take_a_factorys_retry_budget_off_redis(
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retry budget followed the last configuration applied, whoever gave it: an
    operation of the environment's configuration (a budget, no Redis) took the factory's
    budget off Redis, and changed its ratio, while the breaker stayed shared with the other
    processes. It follows the breaker's rule: the factory's ``config=`` decides."""
    own = rdb.Config(redis_url=redis_server.url, retry_budget=0.2, retry_budget_floor=3)
    Session = rdb.ResilientSession(engine, service=service, config=own)
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "0.5")
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        assert rdb.with_self_healing(lambda: 1, service=service) == 1
        rdb.ResilientSession(engine, service=service)  # (a default factory of the service)
        rdb.reload_config()
    found = budget(service)
    assert found["redis"] == rdb.health()["services"][service]["breaker"]["shared"]["redis"]
    assert (found["ratio"], found["floor_per_second"]) == (0.2, 3)
    assert not [r for r in caplog.records if "settings differ" in r.getMessage()]
    assert Session.service == service  # (held to here)


def test_two_factories_asking_for_different_retry_budgets_are_warned_about(
    engine: sa.Engine,
    service: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    # kept: a factory that is gone (garbage-collected) no longer holds the budget's settings
    kept = [
        rdb.ResilientSession(engine, service=service, config=rdb.Config(retry_budget=0.2)),
        rdb.ResilientSession(
            engine, service=service, config=rdb.Config(retry_budget=0.2, max_retries=9)
        ),
    ]
    gc.collect()  # (as a long run's collector may, at any moment)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        rdb.with_self_healing(lambda: 1, service=service, config=rdb.Config(retry_budget=0.5))
    (line,) = [r.getMessage() for r in caplog.records if "settings differ" in r.getMessage()]
    assert line == (
        f"[SELF-HEAL] Retry budget settings differ for service={service}: (ratio=0.2, "
        "floor=10/s, local) asked for before, (ratio=0.5, floor=10/s, local) now; a service "
        "has one retry budget, which follows the later. Give both the same settings, or each "
        "its own service name"
    )
    assert budget(service)["ratio"] == 0.5
    (event,) = [e for e in events if e.name == "budget_settings_conflict"]
    assert event.service == service

    # a config= sharing it through Redis, the breaker's settings unchanged: the budget's line
    # alone, and both are shared now
    caplog.clear()
    shared = rdb.Config(retry_budget=0.5, redis_url=redis_server.url, circuit_breaker=False)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        rdb.ResilientSession(engine, service=service, config=shared)
    (line,) = [r.getMessage() for r in caplog.records if "settings differ" in r.getMessage()]
    assert "(ratio=0.5, floor=10/s, local) asked for before, (ratio=0.5, floor=10/s, shared)" in (
        line
    )
    assert "redis" in budget(service)
    assert len(kept) == 2
