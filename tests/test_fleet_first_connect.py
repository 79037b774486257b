"""A process just started connects to Redis in the background: until its link is up it runs on
its own state, a closed breaker and a full floor of retries. Its failure path waits for the
link's first attempt (at most ``SELF_HEALING_REDIS_TIMEOUT``) and then follows the fleet: a
worker started during an outage sends no retry past the fleet's open breaker, and spends the
fleet's retry budget, not a floor of its own. Its success path never waits: the first unit is
admitted on the process's own closed breaker.

Redis is paused (SIGSTOP) while the link makes its first attempt, so "not up yet" lasts as long
as the test needs: the unit's failure is made while the link is surely not up, and Redis
resumes only once the failure path waits for it (or once the unit has ended, without waiting)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import Gate, fleet, open_the_fleets_breaker, opener_settings
from processes import wait_for

import resilient_db as rdb
from resilient_db import _breaker, _budget, _fleet
from resilient_db.testing import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_backoff")]

GATE = sa.text("SELECT rdb_gate()")


class Unit(threading.Thread):
    """One unit of ``factory`` run in a thread; :attr:`outcome` is its error (or ``"ok"``)."""

    def __init__(self, factory: Any) -> None:
        super().__init__(daemon=True)
        self.factory = factory
        self.outcome: object = None

    def run(self) -> None:
        try:
            self.factory.run(lambda s: s.execute(GATE).scalar_one())
            self.outcome = "ok"
        except Exception as exc:
            self.outcome = exc


def _first_attempt_waited_for(link: Any) -> bool:
    """Whether a failure-path call waited (or waits) for ``link``'s first attempt."""
    return getattr(link, "_first_wait_until", None) is not None


def _run_while_the_link_first_connects(
    redis: RedisServer, make: Callable[[], Any], link_of: Callable[[], Any]
) -> tuple[object, bool]:
    """Pause Redis, make the factory (its link starts and waits for Redis), run one unit;
    resume Redis once the unit's failure path waits for the link, or once the unit ended
    without waiting. The unit's outcome, and whether it ended while Redis was paused."""
    redis.pause()
    try:
        factory = make()
        link = link_of()
        assert not link.up
        unit = Unit(factory)
        unit.start()
        wait_for(
            lambda: not unit.is_alive() or _first_attempt_waited_for(link),
            "the unit to end or to wait for the link",
        )
        ended_while_paused = not unit.is_alive()
    finally:
        redis.resume()
    unit.join(timeout=30)
    assert not unit.is_alive()
    return unit.outcome, ended_while_paused


def test_a_new_process_follows_the_fleets_open_breaker_from_its_first_failure(
    redis_server: RedisServer, pg_url: str, engine: sa.Engine, gate: Gate, tmp_path: Path
) -> None:
    """Another process opened the shared breaker. A process started meanwhile admits its
    first unit on its own closed breaker (the success path does not wait for Redis); the
    unit's failure waits for the link and is answered by the fleet: open, so the unit ends
    with CircuitOpenError instead of retrying past the fleet's open breaker."""
    gate.set(down=True)
    with fleet(1, pg_url, opener_settings(redis_server.url), tmp_path) as (opener,):
        open_the_fleets_breaker(opener)
    calls = gate.calls()
    config = rdb.Config(
        redis_url=redis_server.url,
        redis_timeout=10.0,  # the link's first attempt waits as long as Redis is paused
        max_retries=3,
        failure_threshold=5,
        reset_timeout=600.0,
    )
    outcome, ended_while_paused = _run_while_the_link_first_connects(
        redis_server,
        lambda: rdb.ResilientSession(engine, service="fleet", config=config),
        lambda: _breaker.breakers()["fleet"]._fleet,
    )
    assert not ended_while_paused  # its failure waited for the link
    assert isinstance(outcome, rdb.CircuitOpenError), outcome
    assert isinstance(outcome.__cause__, sa.exc.OperationalError)
    # one attempt reached the database: the first, admitted without waiting; no retry
    assert gate.calls() == calls + 1
    service = rdb.health()["services"]["fleet"]
    assert service["breaker"]["state"] == "open"
    assert service["breaker"]["shared"]["opens_followed"] == 1
    assert service["counters"]["breaker_opens"] == 0  # the opener's, not this process's
    assert service["counters"]["retries"] == 0


def test_a_new_process_spends_the_fleets_retry_budget_not_a_floor_of_its_own(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate
) -> None:
    """The fleet's retry budget is spent (its floor bucket empty, and kept so: it refills
    from a time to come). A process started meanwhile, with a full floor of its own, asks the
    fleet for its first retry once its link is up: refused, the unit gives up at once."""
    service = "storm"
    key = _fleet._keys(service).budget
    redis_server.client().hset(key, mapping={"ft": "0", "fts": str(time.time() + 3600)})
    gate.set(down=True)
    calls = gate.calls()
    config = rdb.Config(
        redis_url=redis_server.url,
        redis_timeout=10.0,
        circuit_breaker=False,
        max_retries=3,
        retry_budget=0.1,
        retry_budget_floor=10,  # this process alone would grant its first 10 retries
    )
    outcome, ended_while_paused = _run_while_the_link_first_connects(
        redis_server,
        lambda: rdb.ResilientSession(engine, service=service, config=config),
        lambda: _budget.budgets()[service]._fleet,
    )
    assert not ended_while_paused  # its retry waited for the link
    assert isinstance(outcome, sa.exc.OperationalError), outcome
    assert gate.calls() == calls + 1  # no retry: the fleet's budget is spent
    entry = rdb.health()["services"][service]
    assert entry["budget"]["scope"] == "fleet"
    assert entry["budget"]["exhausted"] == 1
    assert entry["budget"]["granted"] == 0
    assert entry["counters"]["retries"] == 0


def test_a_link_whose_first_attempt_gets_no_answer_leaves_the_process_to_decide_alone(
    redis_server: RedisServer,
) -> None:
    """Redis hangs through the link's first attempt: a retry to pay for waits no longer than
    the Redis timeout, then this process's own floor pays for it; the calls after it do not
    wait again for that attempt (one bound for them all)."""
    config = rdb.Config(redis_url=redis_server.url, redis_timeout=0.05, retry_budget=0.1)
    redis_server.pause()
    try:
        budget = _budget.budget_for("hung", config, user=redis_server)
        assert budget is not None
        link = budget._fleet
        first = budget.withdraw()
        assert first is not None
        assert (first.fleet, first.paid_by) == (None, "floor")
        bound = link._first_wait_until
        assert bound is not None
        second = budget.withdraw()
        assert second is not None
        assert second.fleet is None
        assert link._first_wait_until == bound  # the same bound, not a new wait
        assert not link.up
    finally:
        redis_server.resume()
