"""What ``health()`` says of a breaker and a retry budget shared through a real Redis: the
fleet's failure count, and the fleet's budget figures only while they are recent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import Gate
from processes import wait_for

import resilient_db as rdb
from resilient_db import _budget
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

WINDOW = 2  # seconds a first attempt counts as recent, in these tests


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(pg_url)
    yield e
    e.dispose()


def _entry(service: str, part: str) -> dict[str, Any]:
    entry: dict[str, Any] = rdb.health()["services"][service][part]
    return entry


def test_health_shows_the_fleet_failure_count_of_a_shared_breaker(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate
) -> None:
    config = rdb.Config(redis_url=redis_server.url, retry=False, failure_threshold=3)
    Factory = rdb.ResilientSession(engine, service="counted", config=config)
    wait_for(lambda: _entry("counted", "breaker")["shared"]["connected"], "the link")
    gate.set(down=True)
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(lambda s: s.execute(sa.text("SELECT rdb_gate()")))
    assert redis_server.client().get("resilient_db:{counted}:failures") == b"2"
    breaker = _entry("counted", "breaker")
    assert breaker["state"] == "closed"
    assert breaker["failures"] == 2
    gate.set(down=False)
    Factory.run(lambda s: s.execute(sa.text("SELECT rdb_gate()")))
    assert _entry("counted", "breaker")["failures"] == 0


def test_health_drops_the_fleet_budget_figures_once_they_are_past_the_window(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_budget, "WINDOW", WINDOW)
    config = rdb.Config(redis_url=redis_server.url, retry_budget=0.2, retry_budget_floor=0)
    Factory = rdb.ResilientSession(engine, service="stale", config=config)
    wait_for(lambda: _entry("stale", "budget")["scope"] == "fleet", "the budget to be shared")
    for _ in range(50):
        Factory.run(lambda s: s.execute(sa.text("SELECT 1")))
    budget = _budget.budgets()["stale"]
    assert budget.withdraw() is not None  # the fleet's answer: 50 recent first attempts
    figures = _entry("stale", "budget")
    assert figures["fleet"]["first_attempts"] == 50
    assert figures["available"] == 9.0

    # no traffic: every first attempt leaves the window (a condition, polled: not a backoff)
    def past(figures: dict[str, Any]) -> bool:
        return "fleet" not in figures and figures["first_attempts"] == 0

    wait_for(lambda: past(_entry("stale", "budget")), "the window to pass", timeout=WINDOW + 10)
    figures = _entry("stale", "budget")
    assert "fleet" not in figures
    assert figures["first_attempts"] == 0
    assert figures["available"] == 0.0


def test_openings_made_alone_count_in_breaker_opens_and_only_shared_ones_in_opened_here(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate
) -> None:
    """health()'s two counts of openings made here: ``counters.breaker_opens`` counts every
    opening this process made (its line says so), those made on its own while Redis was down
    included; ``breaker.shared.opened_here`` counts its openings of the shared breaker, the
    fleet's openings (``fleet_opens``) this process caused. Two openings made alone, then one
    through Redis: 3 and 1, fleet_opens 1."""
    reset = 0.3
    # (Redis's answers awaited up to 5 s: with the default 0.1 s a loaded machine's link gave up
    # on the failure script after the restart, and the opening stayed this process's own)
    config = rdb.Config(
        redis_url=redis_server.url,
        retry=False,
        failure_threshold=2,
        reset_timeout=reset,
        redis_timeout=5.0,
    )
    Factory = rdb.ResilientSession(engine, service="alone", config=config)
    wait_for(lambda: _entry("alone", "breaker")["shared"]["connected"], "the link")

    def unit() -> None:
        Factory.run(lambda s: s.execute(sa.text("SELECT rdb_gate()")))

    def figures() -> tuple[int, int, int]:
        service = rdb.health()["services"]["alone"]
        shared = service["breaker"]["shared"]
        return service["counters"]["breaker_opens"], shared["opened_here"], shared["fleet_opens"]

    redis_server.kill()
    wait_for(lambda: not _entry("alone", "breaker")["shared"]["connected"], "the link down")
    gate.set(down=True)
    for _ in range(2):  # the second failure opens this process's own breaker
        with pytest.raises(sa.exc.OperationalError):
            unit()
    assert _entry("alone", "breaker")["state"] == "open"
    assert figures() == (1, 0, 0)
    # its open time over (the breaker's own period, not a backoff), the probe fails: again
    wait_for(lambda: _entry("alone", "breaker")["state"] == "half-open", "the open time over")
    with pytest.raises(sa.exc.OperationalError):
        unit()
    assert figures() == (2, 0, 0)
    wait_for(lambda: _entry("alone", "breaker")["state"] == "half-open", "the opening over")

    redis_server.start()  # empty, on the same port: the link rejoins (no opening to share)
    wait_for(lambda: _entry("alone", "breaker")["shared"]["connected"], "the link back")
    assert figures() == (2, 0, 0)
    wait_for(lambda: _entry("alone", "breaker")["state"] == "closed", "the fleet's state read")
    for _ in range(2):  # the fleet's breaker, opened by this process's second failure
        with pytest.raises(sa.exc.OperationalError):
            unit()
    assert redis_server.client().hget("resilient_db:{alone}:breaker", "st") == b"open"
    assert figures() == (3, 1, 1)
