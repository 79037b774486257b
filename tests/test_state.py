"""One home for what resilient_db keeps per process, and one reset of it for test suites."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa
from fleet import forked, held_by_another_thread

import resilient_db as rdb
from resilient_db import _state
from resilient_db._observability import stats_for
from resilient_db._retry import Policy
from resilient_db._state import STATE


def test_reset_state_forgets_breakers_and_zeroes_every_counter(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    Sessions = rdb.ResilientSession(engine, service="state-reset", config=rdb.Config())
    Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
    breaker = Sessions.policy.breaker
    assert breaker is not None
    breaker.open()
    rdb.with_self_healing(lambda: None, service="state-reset-wrapper")
    assert STATE.wrapper_policies
    before = rdb.health()
    assert before["services"]["state-reset"]["counters"]["attempts"] == 1
    assert before["services"]["state-reset"]["breaker"]["state"] == "open"
    assert not before["healthy"]

    rdb.reset_state()

    after = rdb.health()
    assert after["healthy"]
    assert "state-reset" not in after["services"]  # its breaker and counters forgotten
    assert all(v == 0 for v in after["transitions"].values())
    assert not STATE.wrapper_policies  # the wrapper's cached policies dropped
    # the factory keeps working, with its breaker closed and its counters zeroed
    assert breaker.state == "closed"
    assert Sessions.policy.stats.attempts == 0
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 2")).scalar()) == 2
    engine.dispose()


def test_a_factory_made_before_reset_state_is_seen_by_health_after_it(
    engine: sa.Engine, service: str
) -> None:
    """A module-level factory outlives reset_state() between tests: what it does afterwards
    (its breaker opening, its counters) shows in health(), and a factory made later for the
    same service shares its breaker (one per service), instead of each keeping its own."""
    config = rdb.Config(retry=False, failure_threshold=2, reset_timeout=30)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
    rdb.reset_state()

    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    with pytest.raises(rdb.CircuitOpenError):
        Sessions.run(lambda s: 1)
    health = rdb.health()
    entry = health["services"][service]
    assert not health["healthy"]
    assert entry["breaker"]["state"] == "open"
    assert (entry["counters"]["attempts"], entry["counters"]["breaker_rejections"]) == (2, 1)
    later = rdb.ResilientSession(engine, service=service, config=config)
    with pytest.raises(rdb.CircuitOpenError):
        later.run(lambda s: 1)
    assert later.policy.breaker is Sessions.policy.breaker


def test_service_names_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Service names are configuration: past MAX_SERVICES distinct ones a new one is refused
    with a clear error (each would keep a breaker, counters and metric series for good)."""
    monkeypatch.setattr(_state, "MAX_SERVICES", 3)
    for n in range(3):
        Policy(f"bounded-{n}", rdb.Config())
    Policy("bounded-0", rdb.Config())  # a known name is fine
    with pytest.raises(ValueError, match="not data: don't make one per tenant"):
        Policy("bounded-3", rdb.Config())
    with pytest.raises(ValueError, match="at most 3"):
        rdb.with_self_healing(lambda: 1, service="bounded-4")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_holds_the_state_lock_makes_factories() -> None:
    """The lock of every registry, held by a thread of the parent when it forked, is renewed
    in the child: its first factory (and health()) do not wait for a thread it does not have."""
    with held_by_another_thread(STATE.lock):

        def child() -> bool:
            engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/db")  # never connected
            rdb.ResilientSession(engine, service="forked-state", config=rdb.Config())
            return "forked-state" in rdb.health()["services"]

        with forked(child) as proc:
            assert proc.result(timeout=30) is True, "the child hung on the state lock"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_adds_to_a_services_counters_counts() -> None:
    """A service's counters have a lock of their own, held for one addition: taken by another
    thread of the parent when it forked, the child's first unit waited on it forever."""
    stats = stats_for("forked-counters")
    with held_by_another_thread(stats._lock):

        def child() -> bool:
            stats_for("forked-counters").add("retries")
            return rdb.health()["services"]["forked-counters"]["counters"]["retries"] == 1

        with forked(child) as proc:
            assert proc.result(timeout=30) is True, "the child hung on the counters' lock"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_by_the_thread_holding_the_state_lock_keeps_it() -> None:
    """Forked from inside the lock (a factory made in a hook, say): the child's thread goes on
    holding it and releases it itself."""

    def child() -> bool:
        rdb.health()  # re-entrant: this thread holds it
        STATE.lock.release()  # the parent's acquisition, carried on here
        return True

    with STATE.lock, forked(child) as proc:
        assert proc.result(timeout=30) is True
