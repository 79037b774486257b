"""What ``health()`` says of a breaker and a retry budget shared through a real Redis: the
fleet's failure count, and the fleet's budget figures only while they are recent."""

from __future__ import annotations

import time
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
    time.sleep(WINDOW + 1)  # no traffic: every first attempt is past the window
    figures = _entry("stale", "budget")
    assert "fleet" not in figures
    assert figures["first_attempts"] == 0
    assert figures["available"] == 0.0
