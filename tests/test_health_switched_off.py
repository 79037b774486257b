"""``health()`` lists the service of a ``with_self_healing`` operation while self-healing is
switched off, as it lists a factory's: made off (``Config(enabled=False)``,
``SELF_HEALING_ENABLED=false`` at start), its breaker and budget ``None``; switched off by a
reload, its breaker ``off`` (an opening it held rejects nothing and leaves ``healthy`` True),
and switched on again, it starts over."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")


def entry(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]
    return found


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: a failure


@pytest.mark.asyncio
async def test_an_operation_made_off_by_its_config_is_listed_as_a_factory_is(
    engine: sa.Engine, service: str
) -> None:
    off = rdb.Config(enabled=False)
    # (held: a factory no longer referenced is no live user of its service)
    factory = rdb.ResilientSession(engine, service=f"{service}-factory", config=off)
    made_off = entry(f"{service}-factory")
    assert made_off["breaker"] == {
        "state": "off",
        "failures": 0,
        "failure_threshold": off.failure_threshold,
        "reset_timeout": off.reset_timeout,
        "by_hand": False,
        "reason": None,
    }
    assert made_off["budget"] is None

    @rdb.with_self_healing(service=f"{service}-sync", config=off)
    def sync_op() -> int:
        return 1

    @rdb.with_self_healing(service=f"{service}-async", config=off)
    async def async_op() -> int:
        return 2

    assert sync_op() == 1
    assert await async_op() == 2
    assert rdb.with_self_healing(lambda: 3, service=f"{service}-call", config=off) == 3
    for kind in ("sync", "async", "call"):
        assert entry(f"{service}-{kind}") == made_off
    assert rdb.health()["healthy"] is True
    assert factory.kw is not None


def test_an_operation_of_a_process_started_off_is_listed_as_a_factory_is(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("SELF_HEALING_ENABLED", "false")
    rdb.reload_config()
    # (held: a factory no longer referenced is no live user of its service)
    factory = rdb.ResilientSession(engine, service=f"{service}-factory")
    assert rdb.with_self_healing(lambda: 1, service=f"{service}-op") == 1
    assert entry(f"{service}-op") == entry(f"{service}-factory")
    assert entry(f"{service}-op")["breaker"]["state"] == "off"
    assert factory.kw is not None


def test_an_operation_switched_off_by_a_reload_shows_its_breaker_off_as_a_factory_does(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """Its breaker stayed as the operation left it: open, ``healthy`` False while nothing was
    rejected any more, and the opening still held when self-healing was switched on again."""
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "1")
    clean_env.setenv("SELF_HEALING_MAX_RETRIES", "0")
    rdb.reload_config()
    factory = rdb.ResilientSession(engine, service=f"{service}-factory")
    op_service = f"{service}-op"
    with pytest.raises(sa.exc.OperationalError):
        factory.run(unavailable)

    @rdb.with_self_healing(service=op_service)
    def failing() -> None:
        with Session(engine) as session:
            unavailable(session)

    with pytest.raises(sa.exc.OperationalError):
        failing()
    for name in (f"{service}-factory", op_service):
        assert entry(name)["breaker"]["state"] == "open"

    clean_env.setenv("SELF_HEALING_ENABLED", "false")
    rdb.reload_config()
    with pytest.raises(sa.exc.OperationalError):
        failing()  # runs plainly
    assert entry(op_service)["breaker"] == entry(f"{service}-factory")["breaker"]
    assert entry(op_service)["breaker"]["state"] == "off"
    assert rdb.health()["healthy"] is True

    clean_env.setenv("SELF_HEALING_ENABLED", "true")
    rdb.reload_config()
    # on again, each starts over: the opening was not kept while off
    assert entry(op_service)["breaker"]["state"] == "closed"
    assert entry(f"{service}-factory")["breaker"]["state"] == "closed"
    assert rdb.with_self_healing(lambda: 1, service=op_service) == 1


@pytest.mark.parametrize("switch", ["SELF_HEALING_CIRCUIT_BREAKER", "SELF_HEALING_ENABLED"])
def test_a_breaker_switched_off_at_start_shows_off_as_one_switched_off_by_a_reload(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch, switch: str
) -> None:
    """The same switch said ``None`` when set at start and ``off`` when a reload set it: a
    dashboard or an alert on the ``off`` state saw a breaker switched off only after a reload."""
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "7")
    clean_env.setenv(switch, "false")
    rdb.reload_config()
    factory = rdb.ResilientSession(engine, service=f"{service}-factory")
    assert rdb.with_self_healing(lambda: 1, service=f"{service}-op") == 1
    off = {
        "state": "off",
        "failures": 0,
        "failure_threshold": 7,
        "reset_timeout": 30.0,
        "by_hand": False,
        "reason": None,
    }
    assert entry(f"{service}-factory")["breaker"] == off
    assert entry(f"{service}-op")["breaker"] == off
    assert rdb.health()["healthy"] is True

    clean_env.setenv(switch, "true")
    rdb.reload_config()
    factory.run(lambda session: session.execute(sa.text("SELECT 1")))
    assert entry(f"{service}-factory")["breaker"]["state"] == "closed"
    clean_env.setenv(switch, "false")
    rdb.reload_config()
    assert entry(f"{service}-factory")["breaker"] == off  # as at start


def test_a_service_that_opted_out_of_the_breaker_has_none(engine: sa.Engine, service: str) -> None:
    assert rdb.with_self_healing(lambda: 1, service=service, use_circuit_breaker=False) == 1
    assert entry(service)["breaker"] is None
