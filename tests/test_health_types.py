"""health()'s TypedDicts (``rdb.HealthReport`` and the types it nests) say what a real
``health()`` returns, key by key: every key of a result is declared, with a value of its
declared type; every required key is there; and over the services made here (an open breaker,
a half-open one, one opened by hand, a shared one, one whose Redis does not answer, one
switched off, one opted out, one whose storage fails, budgets local and fleet-wide, retries by
class, the guard's counters) every key a type declares is seen at least once, and every value
of each ``Literal``. A key added to health() and not to its type (or the other way round), or a
value of another type, fails here."""

from __future__ import annotations

import contextlib
import gc
from typing import Any, get_args, get_type_hints

import pybreaker
import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import FailingStorage, refuse_moves_every_way
from shapes import Walk
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _budget, _fleet
from resilient_db.examples.tasks import Base
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def tasks(engine: sa.Engine) -> sa.Engine:
    """The example's tasks schema, on the engine with ``raise_code()``."""
    Base.metadata.create_all(engine)
    return engine


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: retried


def entry(service: str) -> Any:
    return rdb.health()["services"][service]


def test_every_key_of_a_real_health_report_is_declared_by_its_types(
    tasks: sa.Engine, redis_server: RedisServer, service: str
) -> None:
    # the guard's counters: illegal moves refused on every path
    refuse_moves_every_way(tasks, f"{service}-guard", trigger=True)

    # open, after retries of a class, with a local budget
    local = rdb.Config(failure_threshold=2, max_retries=1, retry_budget=0.5)
    Opened = rdb.ResilientSession(tasks, service=f"{service}-open", config=local)
    with pytest.raises(sa.exc.OperationalError):
        Opened.run(unavailable)
    assert entry(f"{service}-open")["breaker"]["state"] == "open"

    # opened by hand, with a reason; and one whose opening is over (half-open)
    # (held: a factory gone is no live user of its service's breaker, its "off" no longer shown)
    held = [rdb.ResilientSession(tasks, service=f"{service}-hand")]
    rdb.open_breaker(f"{service}-hand", reason="database upgrade")
    held.append(rdb.ResilientSession(tasks, service=f"{service}-half"))
    rdb.open_breaker(f"{service}-half", seconds=0.001)
    wait_for(lambda: entry(f"{service}-half")["breaker"]["state"] == "half-open", "half-open")

    # shared through Redis, which knows a cluster's timeline (read on joining), with a
    # fleet-wide budget whose figures Redis reported
    with contextlib.closing(redis_server.client()) as client:
        client.hset(_fleet.TIMELINES_KEY, "7100000000000000001", "3 1700000000123456 h:5432")
    shared = rdb.Config(redis_url=redis_server.url, retry_budget=0.2, retry_budget_floor=0)
    Shared = rdb.ResilientSession(tasks, service=f"{service}-shared", config=shared)
    wait_for(lambda: entry(f"{service}-shared")["budget"]["scope"] == "fleet", "the link")
    Shared.run(lambda s: s.execute(sa.text("SELECT 1")))
    _budget.budgets()[f"{service}-shared"].withdraw()
    assert "fleet" in entry(f"{service}-shared")["budget"]
    assert entry(f"{service}-shared")["breaker"]["shared"]["fleet_timelines"]

    # shared through a Redis that does not answer: its problem said
    down = rdb.Config(redis_url="redis://127.0.0.1:1/0", retry_budget=0.2)  # (nothing listens)
    held.append(rdb.ResilientSession(tasks, service=f"{service}-down", config=down))
    wait_for(lambda: entry(f"{service}-down")["breaker"]["shared"]["problem"], "the problem")

    # kept in a storage of the caller's (which other processes may share)
    memory = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    held.append(rdb.ResilientSession(tasks, service=f"{service}-storage", breaker_storage=memory))

    # switched off, opted out, and a storage that fails
    off = rdb.Config(circuit_breaker=False)
    held.append(rdb.ResilientSession(tasks, service=f"{service}-off", config=off))
    rdb.with_self_healing(lambda: 1, service=f"{service}-out", use_circuit_breaker=False)
    storage = FailingStorage()
    held.append(rdb.ResilientSession(tasks, service=f"{service}-failing", breaker_storage=storage))
    storage.down = True
    try:
        gc.collect()  # (every factory not held is gone: those held make the report)
        report = rdb.health()
    finally:
        storage.down = False  # (the factory may outlive this test)

    walk = Walk()
    walk.check(report, rdb.HealthReport, "health()")
    assert report["transitions"]["blocked_transitions"] > 0
    assert report["services"][f"{service}-open"]["counters"]["retries_by_class"]
    assert walk.unseen_keys(walk.typeddicts) == {}
    assert walk.unseen_literals(walk.typeddicts) == {}
    states = get_args(get_type_hints(rdb.BreakerHealth)["state"])
    assert states in walk.literals_seen
    exported = {
        rdb.HealthReport,
        rdb.ServiceHealth,
        rdb.ServiceCounters,
        rdb.BreakerHealth,
        rdb.SharedBreakerHealth,
        rdb.StorageBreakerHealth,
        rdb.FleetTimelineHealth,
        rdb.UnavailableHealth,
        rdb.BudgetHealth,
        rdb.FleetBudgetHealth,
        rdb.TransitionCounters,
    }
    assert walk.typeddicts == exported  # every type was met, and each is public
