"""One home for what resilient_db keeps per process, and one reset of it for test suites."""

from __future__ import annotations

import sqlalchemy as sa

import resilient_db as rdb
from resilient_db._state import STATE


def test_reset_state_forgets_breakers_and_zeroes_every_counter(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    Sessions = rdb.ResilientSession(engine, service="state-reset", config=rdb.Config())
    Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
    breaker = Sessions.policy.breaker
    assert breaker is not None
    breaker.open()
    with STATE.lock:
        STATE.resetters["probe"] = lambda: STATE.resetters.pop("probe")
    before = rdb.health()
    assert before["services"]["state-reset"]["counters"]["attempts"] == 1
    assert before["services"]["state-reset"]["breaker"]["state"] == "open"
    assert not before["healthy"]

    rdb.reset_state()

    after = rdb.health()
    assert after["healthy"]
    assert after["services"]["state-reset"]["counters"]["attempts"] == 0
    assert after["services"]["state-reset"]["breaker"] is None  # forgotten
    assert all(v == 0 for v in after["transitions"].values())
    assert "probe" not in STATE.resetters  # other modules' resetters ran
    # the factory keeps working, with its breaker closed
    assert breaker.state == "closed"
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 2")).scalar()) == 2
    engine.dispose()
